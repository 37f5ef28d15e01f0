"""Signed webhook delivery: one attempt per call, every attempt recorded.

A dead or slow endpoint must never fail a job or a batch, so `deliver_event` never raises: it
returns a `DeliveryOutcome` saying whether another try is worth it (scalecap.retry decides).
Retries belong to the webhook task (workers/tasks.py), which schedules the next attempt instead
of sleeping. One event keeps one `webhook-id` across all its attempts (and across re-creations of
the same logical event), so receivers can deduplicate; each attempt is re-signed with its own
timestamp, as Standard Webhooks asks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from scalecap.fleet.redact import redact_text, redact_url
from scalecap.fleet.signatures import make_headers
from scalecap.netguard import AddressPolicy, AddressRefused, guarded_transport, parse_networks
from scalecap.retry import is_temporary_error, is_temporary_status, retry_after

log = logging.getLogger(__name__)

EVENT_TYPES = ("batch.completed", "job.completed")
ATTEMPTS_TTL = 7 * 24 * 3600
"""Seconds the attempt log of one event lives in Redis."""
_CAPTION_KEYS = frozenset({"scalecap_record", "final_caption", "init_caption", "caption"})
USER_AGENT = "scalecap-webhooks/1"


@dataclass(frozen=True)
class DeliveryOutcome:
    delivered: bool
    attempts: int
    """HTTP requests actually sent (0 when the URL was refused)."""
    last_status: int | None
    last_error: str | None
    webhook_id: str | None = None
    retry_after: float | None = None
    """Seconds the receiver asked us to wait (its Retry-After), when it said so."""
    temporary: bool = False
    """The failure is worth another attempt (a temporary status or network error)."""


class WebhookRefused(Exception):
    """The URL is not one we may POST to (scheme, private address): final."""


class WebhookUnresolved(WebhookRefused):
    """The host name does not resolve now: temporary, retried like a refused connection."""


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_payload(
    kind: str,
    batch_id: str,
    counts: Mapping[str, int],
    results_location: str | None,
    *,
    job_id: str | None = None,
    status: str | None = None,
    timestamp: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A thin Standard Webhooks payload: counts and where the results are, never captions."""
    if kind not in EVENT_TYPES:
        raise ValueError(f"event type must be one of {EVENT_TYPES}, not {kind!r}")
    data: dict[str, Any] = {
        "batch_id": batch_id,
        "counts": dict(counts),
        "results": results_location,
    }
    if job_id is not None:
        data["job_id"] = job_id
    if status is not None:
        data["status"] = status
    if extra:
        leaked = _CAPTION_KEYS & set(extra)
        if leaked:
            raise ValueError(f"webhook payloads are thin; captions not allowed: {sorted(leaked)}")
        data.update(extra)
    return {"type": kind, "timestamp": timestamp or _now_iso(), "data": data}


def event_id(event: Mapping[str, Any]) -> str:
    """A deterministic webhook-id: the same logical event (type, batch, job) gets the same id."""
    data = event.get("data") or {}
    if isinstance(data, Mapping) and data.get("batch_id"):
        basis = f"{event.get('type')}:{data.get('batch_id')}:{data.get('job_id') or ''}"
    else:
        basis = json.dumps(event, sort_keys=True, default=str)
    return "msg_" + hashlib.sha256(basis.encode()).hexdigest()[:32]


def _policy(allow_private: bool, allowed_networks: Sequence[str]) -> AddressPolicy:
    return AddressPolicy(allow_private, parse_networks(allowed_networks), "SCALECAP_ALLOW_PRIVATE_URLS")


def check_url(url: str, *, allow_private: bool = False, allowed_networks: Sequence[str] = ()) -> None:
    """Raise WebhookRefused unless `url` is http(s) to an allowed address (SSRF guard).

    An early, friendly refusal: the same check runs again on the socket itself when delivering
    (scalecap.netguard), so a DNS answer that changes in between (rebinding) cannot slip
    through. Cloud metadata addresses are refused even with `allow_private`.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"not a valid URL: {shown}") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise WebhookRefused(f"not an http(s) URL: {shown}")
    try:
        _policy(allow_private, allowed_networks).vetted_addresses(host, port or 443)
    except AddressRefused as exc:
        raise WebhookRefused(str(exc)) from exc
    except UnicodeError as exc:
        raise WebhookRefused(f"not a valid host name: {shown}") from exc
    except OSError as exc:  # the resolver: no answer now, which may change (retried)
        raise WebhookUnresolved(f"cannot resolve {host!r}: {exc}") from exc


def _record(redis_client: Any, key: str, entry: dict[str, Any]) -> None:
    if redis_client is None:
        return
    try:
        pipe = redis_client.pipeline()
        pipe.rpush(key, json.dumps(entry))
        pipe.expire(key, ATTEMPTS_TTL)
        pipe.execute()
    except Exception as exc:  # the attempt log is for operators; never fail delivery over it
        log.warning("could not record webhook attempt in %s: %s", key, exc)


def deliver_event(
    url: str,
    event: dict[str, Any],
    *,
    secret: str,
    redis_client: Any,
    attempts_key: str,
    timeout: float = 10,
    allow_private: bool = False,
    msg_id: str | None = None,
    allowed_networks: Sequence[str] = (),
    attempt: int = 1,
) -> DeliveryOutcome:
    """POST `event` as signed JSON once; never raises.

    The outcome says whether the failure is temporary (a 5xx, 408, 425, 429, a network error or
    timeout: scalecap.retry; a host name that does not resolve, like a refused connection) and
    carries the receiver's Retry-After; the caller schedules the next attempt. Redirects are not
    followed (a redirect could point inside the network), and every connection is vetted on the
    socket, so a host that resolves elsewhere at connect time is refused (final). The attempt is
    appended to the Redis list `attempts_key` (when `redis_client` is given) as JSON `{type,
    webhook_id, [job_id,] attempt, at, status, error, duration_ms}`; `attempt` is its number there.
    """
    wid = msg_id or event_id(event)
    try:
        body = json.dumps(event, separators=(",", ":"), default=str).encode()
        check_url(url, allow_private=allow_private, allowed_networks=allowed_networks)
    except WebhookUnresolved as exc:  # a DNS failure: like a refused connection, try again later
        error = redact_text(str(exc))
        log.warning("webhook %s to %s: attempt %d: %s", wid, redact_url(url), attempt, error)
        _record(redis_client, attempts_key, _entry(attempt, None, error, time.monotonic(), event, wid))
        return DeliveryOutcome(False, 0, None, error, wid, temporary=True)
    except Exception as exc:
        error = f"refused: {exc}"
        log.warning("webhook %s to %s not sent: %s", wid, redact_url(url), error)
        _record(redis_client, attempts_key, _entry(0, None, error, 0.0, event, wid))
        return DeliveryOutcome(False, 0, None, error, wid)

    status: int | None = None
    error: str | None = None
    wait: float | None = None
    temporary = False
    transport = guarded_transport(_policy(allow_private, allowed_networks))
    client = httpx.Client(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False)
    started = time.monotonic()
    with client:
        try:
            headers = make_headers(secret, wid, body)
            headers["user-agent"] = USER_AGENT
            response = client.post(url, content=body, headers=headers)
            status = response.status_code
            wait = retry_after(response.headers.get("retry-after"))
            if not 200 <= status < 300:
                error = f"HTTP {status}"
                temporary = is_temporary_status(status)
        except AddressRefused as exc:  # resolved elsewhere since check_url: final
            error = f"refused at connect: {exc}"
        except httpx.TransportError as exc:
            error = redact_text(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            temporary = is_temporary_error(exc)
        except Exception as exc:  # anything else is a bug or bad input: final, not raised
            error = redact_text(f"{type(exc).__name__}: {exc}")
    _record(redis_client, attempts_key, _entry(attempt, status, error, started, event, wid))
    if error is None:
        return DeliveryOutcome(True, 1, status, None, wid)
    log.warning("webhook %s to %s: attempt %d failed: %s", wid, redact_url(url), attempt, error)
    return DeliveryOutcome(False, 1, status, error, wid, wait, temporary)


def _entry(
    attempt: int,
    status: int | None,
    error: str | None,
    started: float,
    event: Mapping[str, Any],
    wid: str,
) -> dict[str, Any]:
    duration = (time.monotonic() - started) * 1000 if started else 0.0
    data = event.get("data") if isinstance(event.get("data"), Mapping) else {}
    return {
        "type": event.get("type"),
        "webhook_id": wid,
        **({"job_id": data["job_id"]} if data.get("job_id") else {}),
        "attempt": attempt,
        "at": _now_iso(),
        "status": status,
        "error": error,
        "duration_ms": round(duration, 1),
    }
