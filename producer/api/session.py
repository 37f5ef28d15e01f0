"""Browser sessions for the viewer: a signed cookie that names an API key, never holds it.

The login form takes an API key once; the cookie then carries only the key's id, a random nonce
and an expiry, signed with HMAC-SHA256. The key itself is looked up again on every request, so
revoking a key ends its sessions at once. The cookie is HttpOnly and SameSite=Lax (a cross-site
POST arrives without it), and every state-changing form (logout, cancel) also carries a token
derived from the session's nonce, checked in constant time, so a forged form cannot act.
Logout ends the session on the server too: its nonce is noted in Redis until the cookie would
have expired (`SessionEnds`), so a copy of the cookie taken before logout no longer works.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

COOKIE = "scalecap_session"
MAX_AGE = 12 * 3600
"""Seconds a session lasts after login."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    key_id: str
    nonce: str
    expires: float
    fingerprint: str = ""
    """For keys that live outside Redis (SCALECAP_API_KEYS): a hash that must still match one."""


class SessionSigner:
    """Issues and reads session cookies and their CSRF tokens with one secret.

    Without a configured secret a random one is made per process: sessions then end when the
    API restarts, and several API replicas behind one address need SCALECAP_SESSION_SECRET.
    """

    def __init__(self, secret: str | bytes | None = None, *, max_age: int = MAX_AGE) -> None:
        if not secret:
            log.info("no session secret configured: viewer logins last until this API process stops")
            secret = secrets.token_bytes(32)
        raw = secret.encode() if isinstance(secret, str) else secret
        # Separate keys for the two uses, so a CSRF token can never pass as a cookie signature.
        self._sign_key = hmac.new(raw, b"scalecap-session", hashlib.sha256).digest()
        self._csrf_key = hmac.new(raw, b"scalecap-csrf", hashlib.sha256).digest()
        self.max_age = max_age

    def issue(self, key_id: str, *, fingerprint: str = "", now: float | None = None) -> str:
        payload = {"k": key_id, "n": secrets.token_urlsafe(16), "e": int((now or time.time()) + self.max_age)}
        if fingerprint:
            payload["f"] = fingerprint
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return body + "." + _b64(self._mac(body))

    def read(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        """The session in a cookie, or None when it is missing, forged, malformed or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, sig = cookie.split(".")
        try:
            if not hmac.compare_digest(_unb64(sig), self._mac(body)):
                return None
            data: Any = json.loads(_unb64(body))
            session = Session(str(data["k"]), str(data["n"]), float(data["e"]), str(data.get("f") or ""))
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires <= (now or time.time()):
            return None
        return session

    def fingerprint(self, raw_key: str) -> str:
        """A keyed hash of a raw key: names it in a cookie without revealing it."""
        return _b64(hmac.new(self._sign_key, b"key:" + raw_key.encode(), hashlib.sha256).digest()[:18])

    def csrf_token(self, session: Session) -> str:
        return _b64(hmac.new(self._csrf_key, session.nonce.encode(), hashlib.sha256).digest())

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), str(token))

    def _mac(self, body: str) -> bytes:
        return hmac.new(self._sign_key, body.encode("ascii"), hashlib.sha256).digest()


_ENDED = "scalecap:session:ended:"


class SessionEnds:
    """Sessions ended before their expiry (logout), by nonce, in Redis: one key each, with a TTL
    of the cookie's remaining life, so the set never outgrows the sessions still alive."""

    def __init__(self, redis_client: Any) -> None:
        self.r = redis_client

    def end(self, session: Session, *, now: float | None = None) -> None:
        ttl = max(1, int(session.expires - (now or time.time())) + 1)
        self.r.set(_ENDED + _nonce_id(session.nonce), "1", ex=ttl)

    def ended(self, session: Session) -> bool:
        return bool(self.r.exists(_ENDED + _nonce_id(session.nonce)))


def _nonce_id(nonce: str) -> str:
    return hashlib.sha256(nonce.encode("utf-8")).hexdigest()[:32]


def same_origin(headers: Any, host: str | None) -> bool:
    """False when the browser says the request comes from another site (Origin / Sec-Fetch-Site).

    Browsers send these on POSTs; their absence (curl, old clients) is not a cross-site request.
    """
    site = headers.get("sec-fetch-site")
    if site and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin and origin != "null":
        netloc = origin.split("://", 1)[-1]
        return host is not None and netloc == host
    return origin != "null"


__all__ = ["COOKIE", "MAX_AGE", "Session", "SessionEnds", "SessionSigner", "same_origin"]
