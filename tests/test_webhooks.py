"""Standard Webhooks signing and verification (scalecap.fleet.signatures): pure functions, no services."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from scalecap.fleet.signatures import generate_secret, make_headers, sign, verify_webhook

KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
BODY = b'{"type":"batch.completed","data":{"batch_id":"b1"}}'


def test_sign_matches_an_independent_hmac():
    expected = base64.b64encode(
        hmac.new(KEY, b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330." + BODY, hashlib.sha256).digest()
    ).decode()
    assert sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, BODY) == "v1," + expected


def test_sign_standard_webhooks_reference_vector():
    # The example in the Standard Webhooks spec / reference libraries.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    got = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_make_headers_roundtrip():
    headers = make_headers(SECRET, "evt_1", BODY, timestamp=1_700_000_000)
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["content-type"] == "application/json"
    assert verify_webhook(SECRET, headers, BODY, now=1_700_000_010)


def test_verify_rejects_tampering_wrong_secret_and_missing_headers():
    headers = make_headers(SECRET, "evt_1", BODY, timestamp=1_700_000_000)
    now = 1_700_000_000
    assert not verify_webhook(SECRET, headers, BODY + b" ", now=now)
    assert not verify_webhook(generate_secret(), headers, BODY, now=now)
    assert not verify_webhook(SECRET, dict(headers, **{"webhook-id": "evt_2"}), BODY, now=now)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        partial = {k: v for k, v in headers.items() if k != name}
        assert not verify_webhook(SECRET, partial, BODY, now=now)
    assert not verify_webhook(SECRET, dict(headers, **{"webhook-timestamp": "soon"}), BODY, now=now)


def test_verify_rejects_stale_and_future_timestamps():
    headers = make_headers(SECRET, "evt_1", BODY, timestamp=1_700_000_000)
    assert not verify_webhook(SECRET, headers, BODY, now=1_700_000_000 + 301)
    assert not verify_webhook(SECRET, headers, BODY, now=1_700_000_000 - 301)
    assert verify_webhook(SECRET, headers, BODY, tolerance=600, now=1_700_000_000 + 301)


def test_verify_accepts_any_of_several_signatures_and_any_header_case():
    headers = make_headers(SECRET, "evt_1", BODY, timestamp=1_700_000_000)
    rotated = f"v1,{base64.b64encode(b'x' * 32).decode()} v2,zzz {headers['webhook-signature']}"
    upper = {k.upper(): v for k, v in headers.items()}
    upper["WEBHOOK-SIGNATURE"] = rotated
    assert verify_webhook(SECRET, upper, BODY, now=1_700_000_000)


def test_generate_secret_is_random_and_usable():
    a, b = generate_secret(), generate_secret()
    assert a != b and a.startswith("whsec_")
    assert len(base64.b64decode(a.removeprefix("whsec_"))) == 32
    assert verify_webhook(a, make_headers(a, "m", b"{}"), b"{}")


def test_bad_secret_is_a_value_error():
    with pytest.raises(ValueError, match="whsec_"):
        sign("whsec_not base64!", "m", 1, b"")
