"""Whose session is it now: keys re-read from a real Redis on every request, bootstrap keys
(SCALECAP_API_KEYS) re-checked by a keyed hash, so revoking or removing a key ends its sessions."""

from __future__ import annotations

import pytest

from producer.api.session import SessionEnds, SessionSigner
from producer.api.web import Web, _may_view, _session_key
from scalecap.fleet.keys import KeyStore
from scalecap.settings import Settings

pytestmark = pytest.mark.services


def test_sessions_follow_the_keys(redis_url: str):
    import redis

    keys = KeyStore(redis.Redis.from_url(redis_url))
    signer = SessionSigner("secret")
    w = Web(Settings(broker_url=redis_url, api_keys=["boot-one", "boot-two"]), None, keys, signer,
            SessionEnds(keys.r))

    _, reader, _ = keys.create("dash", scopes=("read",))
    _, writer, _ = keys.create("writer", scopes=("submit",))
    session = signer.read(signer.issue(reader.key_id))
    assert _may_view(_session_key(w, session))
    assert not _may_view(_session_key(w, signer.read(signer.issue(writer.key_id)))), "needs read"
    keys.revoke(reader.key_id)
    assert not _may_view(_session_key(w, session)), "revoked: the same cookie no longer works"

    boot = signer.read(signer.issue("env-2", fingerprint=signer.fingerprint("boot-two")))
    key = _session_key(w, boot)
    assert key is not None and key.key_id == "env-2" and key.is_admin and _may_view(key)
    # a cookie naming env-1 with env-2's fingerprint is refused, and so is a removed key
    mixed = signer.read(signer.issue("env-1", fingerprint=signer.fingerprint("boot-two")))
    assert _session_key(w, mixed) is None
    w.settings = Settings(broker_url=redis_url, api_keys=["boot-one"])
    assert _session_key(w, boot) is None


def test_logout_ends_the_session_on_the_server(redis_url: str):
    """The cookie is still validly signed after logout; the server no longer takes it."""
    import time

    import redis

    r = redis.Redis.from_url(redis_url)
    ends, signer = SessionEnds(r), SessionSigner("secret", max_age=60)
    session = signer.read(signer.issue("0123456789abcdef"))
    other = signer.read(signer.issue("0123456789abcdef"))
    assert session is not None and other is not None and not ends.ended(session)
    ends.end(session)
    assert ends.ended(session) and not ends.ended(other), "only that session ends"
    ttl = r.ttl(next(iter(r.scan_iter("scalecap:session:ended:*"))))
    assert 0 < ttl <= 62 and session.expires > time.time()  # kept no longer than the cookie lives
    assert session.nonce.encode() not in b"".join(r.keys("*")), "the nonce itself is not stored"
