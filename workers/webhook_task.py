"""The webhook task's body: one attempt at one handed-over event, settled only at the end.

The drainer handed the event over as `member` (scalecap/fleet/outbox.py): it is pending, due
again when its lease lapses. This attempt settles it (delivered, refused for good, or replaced by
its next attempt due after the backoff) as its LAST step, so a Redis or network error anywhere
before that, or a worker killed mid-way, leaves the event due: it is handed over again.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from scalecap.fleet import failpoints
from scalecap.fleet.layout import results_prefix
from scalecap.fleet.outbox import PENDING_KEY, Outbox
from scalecap.fleet.protocol import (
    EVENT_JOB_COMPLETED,
    WEBHOOK_ATTEMPTS_KEPT,
    batch_key,
    counts,
    webhook_attempts_key,
)
from scalecap.retry import next_delay
from scalecap.settings import Settings

log = logging.getLogger(__name__)

WEBHOOK_BACKOFF_BASE = 2.0
"""Seconds: the first webhook retry waits up to this, then up to 4x more each time (2, 8, 32...)."""


def results_location(batch: dict[str, str], batch_id: str) -> str:
    """Where a batch's records are, for thin payloads: an S3 prefix or the Redis key prefix.

    Complete: a record reused from an earlier batch is copied under this batch's prefix."""
    sink = batch.get("sink", "")
    if sink.startswith("s3://"):
        return f"{sink.rstrip('/')}/{batch_id}/"
    return "redis://" + results_prefix(batch_id)


def webhook_secret(redis_client: Any, batch: dict[str, str], default: str | None) -> str | None:
    """The batch owner's own secret (HTTP API keys) when there is one, else the fleet's."""
    owner = batch.get("owner")
    if owner:
        try:
            from scalecap.fleet.keys import KeyStore  # the HTTP API's key store, when installed
        except ImportError:
            KeyStore = None
        if KeyStore is not None:
            try:
                secret = KeyStore(redis_client).webhook_secret(owner)
            except Exception as exc:  # a broken key record must not stop the fleet's webhooks
                log.warning("batch owner %s: webhook secret lookup failed: %s", owner, exc)
                secret = None
            if secret:
                return secret
    return default


def _iso(at: Any) -> str | None:
    try:
        t = datetime.fromtimestamp(float(at), UTC)
    except (TypeError, ValueError):
        return None
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def deliver_webhook_event(ctx: Any, settings: Settings, event: dict[str, Any], member: str | None) -> bool:
    """Build the thin payload, POST it once, record the attempt, then settle the event."""
    from workers.webhook_delivery import deliver_event, event_payload

    outbox = Outbox(ctx.redis, settings.webhook_lease)

    def settle(next_attempt: dict[str, Any] | None = None, delay: float = 0.0) -> None:
        if member is not None:
            outbox.settle(member, next_attempt, delay)
        elif next_attempt is not None:  # a message from before hand-overs: schedule as it did
            ctx.redis.zadd(PENDING_KEY, {json.dumps(next_attempt, sort_keys=True): ctx.store.now() + delay})

    batch_id, kind, job_id = event["batch_id"], event["type"], event.get("job_id")
    attempt = int(event.get("attempt", 1))
    batch = ctx.store.batch(batch_id)
    if not batch or not batch.get("webhook"):
        settle()  # purged, or no webhook: nothing to deliver
        return False
    key = webhook_attempts_key(batch_id)
    if kind == EVENT_JOB_COMPLETED and job_id:
        job = ctx.store.job(batch_id, job_id) or {}
        payload = event_payload(kind, batch_id, counts(batch), job.get("location") or None,
                                job_id=job_id, status=job.get("state"), timestamp=_iso(event.get("at")))
    else:
        status = "cancelled" if batch.get("cancel_requested") == "1" else "completed"
        payload = event_payload(kind, batch_id, counts(batch), results_location(batch, batch_id),
                                status=status, timestamp=_iso(event.get("at")))
    secret = webhook_secret(ctx.redis, batch, settings.webhook_secret)

    def record(entry: dict[str, Any], status_field: str | None) -> None:
        pipe = ctx.redis.pipeline(transaction=False)
        pipe.rpush(key, json.dumps({"type": kind, "webhook_id": event["id"],
                                    **({"job_id": job_id} if job_id else {}), **entry}))
        pipe.ltrim(key, -WEBHOOK_ATTEMPTS_KEPT, -1)
        if settings.retention > 0:
            pipe.expire(key, settings.retention)
        if status_field and kind != EVENT_JOB_COMPLETED:
            pipe.hset(batch_key(batch_id), "webhook_status", status_field)
        pipe.execute()

    if not secret:
        log.error("batch %s: no SCALECAP_WEBHOOK_SECRET on this worker; webhook not sent", batch_id)
        record({"attempt": 0, "status": None, "error": "no webhook secret configured"}, "failed")
        settle()
        return False
    started = time.monotonic()
    outcome = deliver_event(
        batch["webhook"], payload, secret=secret, redis_client=None, attempts_key=key,
        timeout=settings.webhook_timeout, allow_private=settings.allow_private_urls,
        msg_id=event["id"], attempt=attempt,
    )
    failpoints.hit("webhook_after_send")
    retry = not outcome.delivered and outcome.temporary and attempt < settings.webhook_max_attempts
    status_field = "delivered" if outcome.delivered else "retrying" if retry else "failed"
    record({"attempt": attempt, "at": _iso(time.time()), "status": outcome.last_status,
            "error": outcome.last_error, "duration_ms": round((time.monotonic() - started) * 1000, 1)},
           status_field)
    if retry:  # the receiver's Retry-After when it said when to come back, else the backoff
        delay = next_delay(attempt, base=WEBHOOK_BACKOFF_BASE, factor=4.0,
                           cap=settings.webhook_retry_max_delay, server_says=outcome.retry_after)
        settle({**event, "attempt": attempt + 1}, delay)
    else:
        settle()
    return outcome.delivered


__all__ = ["deliver_webhook_event"]
