"""Webhook delivery against a real HTTP receiver and a real Redis (workers.webhook_delivery)."""

from __future__ import annotations

import email.utils
import json
import socket
import time

import pytest

from tests.fixtures_services import free_ports
from workers.webhook_delivery import deliver_event, event_id, event_payload

COUNTS = {"total": 3, "done": 2, "failed": 1, "cancelled": 0}


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _attempts(redis_client, key: str) -> list[dict]:
    return [json.loads(x) for x in redis_client.lrange(key, 0, -1)]


def _event() -> dict:
    return event_payload("batch.completed", "b_1", COUNTS, "s3://bucket/out/b_1/")


# ----------------------------------------------------------------------------- pure helpers


def test_event_payload_is_thin_and_its_id_is_stable():
    event = _event()
    assert event["type"] == "batch.completed"
    assert event["data"] == {"batch_id": "b_1", "counts": COUNTS, "results": "s3://bucket/out/b_1/"}
    assert event["timestamp"].endswith("Z")
    later = event_payload("batch.completed", "b_1", COUNTS, "s3://bucket/out/b_1/")
    assert event_id(event) == event_id(later)
    job = event_payload("job.completed", "b_1", COUNTS, None, job_id="j_1", status="done")
    assert event_id(job) != event_id(event)
    with pytest.raises(ValueError, match="captions"):
        event_payload("job.completed", "b", COUNTS, None, extra={"final_caption": "a cat"})
    with pytest.raises(ValueError, match="event type"):
        event_payload("batch.finished", "b", COUNTS, None)


# ----------------------------------------------------------------------------- real receiver


@pytest.mark.services
def test_one_attempt_per_call_each_recorded_until_delivered(webhook_receiver, redis_client):
    """Retries belong to the webhook task; each call is one signed POST with the same id."""
    webhook_receiver.fail_next(2, status=500)
    outcomes = [
        deliver_event(webhook_receiver.url, _event(), secret=webhook_receiver.secret,
                      redis_client=redis_client, attempts_key="scalecap:webhook:b_1",
                      allow_private=True, attempt=n)
        for n in (1, 2, 3)
    ]  # fmt: skip
    assert [(o.delivered, o.attempts, o.last_status, o.temporary) for o in outcomes] == [
        (False, 1, 500, True), (False, 1, 500, True), (True, 1, 200, False)]  # fmt: skip
    got = webhook_receiver.wait_for(3, timeout=5)
    assert len(got) == 3
    assert all(r.verified for r in got)
    assert {r.headers["webhook-id"] for r in got} == {outcomes[0].webhook_id}
    assert got[-1].json()["data"]["counts"] == COUNTS
    attempts = _attempts(redis_client, "scalecap:webhook:b_1")
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status"] for a in attempts] == [500, 500, 200]
    assert [a["error"] for a in attempts] == ["HTTP 500", "HTTP 500", None]
    assert all(a["duration_ms"] >= 0 and a["at"] for a in attempts)
    assert redis_client.ttl("scalecap:webhook:b_1") > 0


@pytest.mark.services
def test_retry_after_is_reported_in_seconds_or_as_a_date(webhook_receiver, redis_client):
    webhook_receiver.fail_next(1, status=503, retry_after=3600)
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    webhook_receiver.fail_next(1, status=429, retry_after=in_30s)

    def once():
        return deliver_event(webhook_receiver.url, _event(), secret=webhook_receiver.secret,
                             redis_client=redis_client, attempts_key="k", allow_private=True)  # fmt: skip

    first, second = once(), once()
    assert first.temporary and first.retry_after == 3600.0  # the task caps it
    assert second.temporary and 20 < second.retry_after <= 31


@pytest.mark.services
def test_one_attempt_reports_the_receivers_retry_after(webhook_receiver, redis_client):
    # The webhook task makes one attempt per run and schedules the next itself: it needs the
    # receiver's Retry-After from the outcome.
    webhook_receiver.fail_next(1, status=429, retry_after=42)
    outcome = deliver_event(webhook_receiver.url, _event(), secret=webhook_receiver.secret,
                            redis_client=redis_client, attempts_key="k1", allow_private=True)
    assert not outcome.delivered and outcome.last_status == 429 and outcome.retry_after == 42.0
    ok = deliver_event(webhook_receiver.url, _event(), secret=webhook_receiver.secret,
                       redis_client=redis_client, attempts_key="k1", allow_private=True)
    assert ok.delivered and ok.retry_after is None


@pytest.mark.services
def test_client_error_is_final(webhook_receiver, redis_client):
    webhook_receiver.fail_next(1, status=410)
    outcome = deliver_event(
        webhook_receiver.url,
        _event(),
        secret=webhook_receiver.secret,
        redis_client=redis_client,
        attempts_key="k",
        allow_private=True,
    )
    assert not outcome.delivered and not outcome.temporary
    assert (outcome.attempts, outcome.last_status, outcome.last_error) == (1, 410, "HTTP 410")
    assert len(webhook_receiver.requests) == 1


@pytest.mark.services
def test_dead_receiver_is_a_temporary_failure_and_never_raises(redis_client):
    (port,) = free_ports(1)  # nothing listens there
    outcome = deliver_event(
        f"http://127.0.0.1:{port}/hook",
        _event(),
        secret="whsec_" + "A" * 32,
        redis_client=redis_client,
        attempts_key="dead",
        allow_private=True,
    )
    assert not outcome.delivered and outcome.attempts == 1 and outcome.last_status is None
    assert outcome.temporary and "ConnectError" in outcome.last_error
    (entry,) = _attempts(redis_client, "dead")
    assert entry["status"] is None and "ConnectError" in entry["error"]


@pytest.mark.services
def test_a_name_that_does_not_resolve_is_temporary_like_a_refused_connection(redis_client):
    """An .invalid name never resolves (RFC 6761): nothing is sent, and the failure is temporary
    (retried), not a refusal of the URL."""
    outcome = deliver_event("http://scalecap-receiver.invalid/hook", _event(), secret="whsec_" + "A" * 32,
                            redis_client=redis_client, attempts_key="nodns", attempt=3)
    assert not outcome.delivered and outcome.attempts == 0 and outcome.temporary
    assert "cannot resolve" in outcome.last_error
    (entry,) = _attempts(redis_client, "nodns")
    assert entry["attempt"] == 3 and "cannot resolve" in entry["error"]


@pytest.mark.services
def test_a_receiver_that_never_answers_times_out_temporarily(redis_client):
    with socket.socket() as silent:  # accepts connections (kernel backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        outcome = deliver_event(
            f"http://127.0.0.1:{silent.getsockname()[1]}/hook",
            _event(),
            secret="whsec_" + "A" * 32,
            redis_client=redis_client,
            attempts_key="slow",
            timeout=0.3,
            allow_private=True,
        )
    assert not outcome.delivered and outcome.attempts == 1 and outcome.temporary
    assert "Timeout" in outcome.last_error
    assert len(_attempts(redis_client, "slow")) == 1


@pytest.mark.services
def test_private_address_is_refused_without_sending(webhook_receiver, redis_client):
    outcome = deliver_event(
        webhook_receiver.url,
        _event(),
        secret=webhook_receiver.secret,
        redis_client=redis_client,
        attempts_key="refused",
    )
    assert not outcome.delivered and outcome.attempts == 0 and not outcome.temporary
    assert "a loopback address" in outcome.last_error
    assert webhook_receiver.requests == []
    (entry,) = _attempts(redis_client, "refused")
    assert entry["attempt"] == 0 and entry["error"].startswith("refused")
    bad_scheme = deliver_event(
        "file:///etc/passwd", _event(), secret="whsec_AAAA", redis_client=None, attempts_key="x"
    )
    assert not bad_scheme.delivered and "http(s)" in bad_scheme.last_error


def test_dns_rebinding_is_refused_at_connect_time(webhook_receiver, redis_client, monkeypatch, caplog):
    """The name resolves to a public address when checked, then to loopback when connecting.

    Only the DNS answers are played (they are what an attacker controls); the receiver is real
    and must see nothing.
    """
    port = int(webhook_receiver.url.split(":")[2].split("/")[0])
    real = socket.getaddrinfo
    answers = iter(["93.184.216.34", "127.0.0.1"])

    def rebinding(host, *args, **kwargs):
        if host == "hooks.rebind.test":
            addr = next(answers, "127.0.0.1")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://hooks.rebind.test:{port}/hook?token=tok-secret-42"
    outcome = deliver_event(url, _event(), secret=webhook_receiver.secret, redis_client=redis_client,
                            attempts_key="rebind")  # fmt: skip
    assert not outcome.delivered and outcome.attempts == 1 and not outcome.temporary
    assert "refused at connect" in outcome.last_error and "127.0.0.1" in outcome.last_error
    assert webhook_receiver.requests == []
    (entry,) = _attempts(redis_client, "rebind")
    assert entry["error"].startswith("refused at connect")
    assert "tok-secret-42" not in caplog.text and "/hook?…" in caplog.text


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/",
     "http://192.0.0.192/opc/v2/", "http://100.100.100.200/latest/meta-data/",
     "http://[::ffff:169.254.169.254]/"],
)  # fmt: skip
def test_cloud_metadata_is_refused_even_with_private_urls_allowed(url, redis_client):
    everywhere = ["0.0.0.0/0", "::/0"]
    outcome = deliver_event(url, _event(), secret="whsec_AAAA", redis_client=redis_client,
                            attempts_key="meta", allow_private=True, allowed_networks=everywhere)  # fmt: skip
    assert not outcome.delivered and outcome.attempts == 0
    assert "cloud metadata address: always refused" in outcome.last_error


def test_private_receiver_is_reached_when_allowed(webhook_receiver, redis_client):
    outcome = deliver_event(webhook_receiver.url, _event(), secret=webhook_receiver.secret,
                            redis_client=redis_client, attempts_key="ok", allow_private=True)  # fmt: skip
    assert outcome.delivered and len(webhook_receiver.requests) == 1
    by_network = deliver_event(webhook_receiver.url, _event(), secret=webhook_receiver.secret,
                               redis_client=redis_client, attempts_key="ok2",
                               allowed_networks=["127.0.0.0/8"])  # fmt: skip
    assert by_network.delivered
