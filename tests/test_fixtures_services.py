"""The service fixtures themselves: real servers that start, answer, restart and isolate tests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from scalecap.fleet.signatures import make_headers

pytestmark = pytest.mark.services


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After")


def test_redis_url_is_a_fresh_db_each_time(redis_server, redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.set("k", "v")
    other = redis.Redis.from_url(f"{redis_server.url}/{redis_server.fresh_db()}")
    assert other.get("k") is None


def test_redis_restart_keeps_the_port(tmp_path):
    # A server of its own: restarting the session's server (no persistence) would wipe what
    # session-scoped stacks keep there, such as the HTTP API's keys.
    import redis

    from tests.fixtures_services import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        port = server.port
        url = f"{server.url}/{server.fresh_db()}"
        server.restart()
        assert server.port == port
        assert redis.Redis.from_url(url).ping()
    finally:
        server.stop()


def test_s3_bucket_roundtrip_and_env(s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="a/b.json", Body=b"{}")
    assert client.get_object(Bucket=s3_bucket, Key="a/b.json")["Body"].read() == b"{}"
    env = s3_server.env()
    assert env["SCALECAP_S3_ENDPOINT_URL"] == s3_server.endpoint_url
    assert s3_server.settings().s3_client_kwargs()["aws_access_key_id"] == s3_server.access_key


def test_webhook_receiver_verifies_and_fails_on_request(webhook_receiver):
    body = json.dumps({"type": "batch.completed"}).encode()
    webhook_receiver.fail_next(1, status=429, retry_after=3)
    headers = make_headers(webhook_receiver.secret, "msg_1", body)
    assert _post(webhook_receiver.url, body, headers) == (429, "3")
    assert _post(webhook_receiver.url, body, headers)[0] == 200
    bad = dict(headers, **{"webhook-signature": "v1,AAAA"})
    assert _post(webhook_receiver.url, body, bad)[0] == 200
    got = webhook_receiver.wait_for(3, timeout=5)
    assert [r.verified for r in got] == [True, True, False]
    assert [r.status for r in got] == [429, 200, 200]
    assert got[0].json() == {"type": "batch.completed"}
