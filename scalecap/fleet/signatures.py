"""Standard Webhooks signatures (https://www.standardwebhooks.com), stdlib only.

Pure standard library so that a receiver which installs only the producer (or copies this one
file) can verify what the fleet sends. The signed content is
`{webhook-id}.{webhook-timestamp}.{body}`; the signature header is `v1,<base64 HMAC-SHA256>`
and may hold several space-separated signatures while a secret is being rotated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE = 300
"""Seconds a timestamp may differ from the receiver's clock (replay guard), either way."""

__all__ = ["generate_secret", "make_headers", "sign", "verify_webhook"]


def _key(secret: str) -> bytes:
    raw = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook secret must be 'whsec_' followed by base64") from exc


def generate_secret(nbytes: int = 32) -> str:
    """A fresh random secret in the `whsec_<base64 key>` form."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(nbytes)).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for one message: `v1,<base64 HMAC-SHA256>`."""
    content = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def make_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The headers of one signed JSON POST. Keep `msg_id` fixed across retries of one event."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
        "content-type": "application/json",
    }


def _lower(headers: Mapping[str, str] | Any) -> dict[str, str]:
    items = headers.items() if hasattr(headers, "items") else headers
    return {str(k).lower(): str(v) for k, v in items}


def verify_webhook(
    secret: str,
    headers: Mapping[str, str] | Any,
    body: bytes,
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """True when one of the `v1` signatures matches and the timestamp is fresh.

    `headers` is any mapping (or object with `.items()`, such as http.server's message), in any
    letter case. Never raises on malformed input: a bad request is simply not verified.
    """
    h = _lower(headers)
    msg_id, ts_raw, sig_header = (
        h.get("webhook-id"),
        h.get("webhook-timestamp"),
        h.get("webhook-signature"),
    )
    if not msg_id or not ts_raw or not sig_header:
        return False
    try:
        ts = int(ts_raw)
        expected = sign(secret, msg_id, ts, body).split(",", 1)[1]
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        return False
    for candidate in sig_header.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected.encode()):
            return True
    return False
