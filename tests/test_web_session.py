"""Whose session is it now: keys re-read from a real Redis on every request, bootstrap keys
(SCALECAP_API_KEYS) re-checked by a keyed hash, so revoking or removing a key ends its sessions."""

from __future__ import annotations

import pytest

from producer.api.session import SessionSigner
from producer.api.web import Web, _may_view, _session_key
from scalecap.fleet.keys import KeyStore
from scalecap.settings import Settings

pytestmark = pytest.mark.services


def test_sessions_follow_the_keys(redis_url: str):
    import redis

    keys = KeyStore(redis.Redis.from_url(redis_url))
    signer = SessionSigner("secret")
    w = Web(Settings(broker_url=redis_url, api_keys=["boot-one", "boot-two"]), None, keys, signer)

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
