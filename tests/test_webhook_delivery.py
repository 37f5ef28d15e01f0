"""Webhook delivery against a real HTTP receiver and a real Redis (workers.webhook_delivery)."""

from __future__ import annotations

import email.utils
import json
import random
import socket

import pytest

from tests.fixtures_services import free_ports
from workers.webhook_delivery import (
    backoff_delay,
    deliver_event,
    event_id,
    event_payload,
    parse_retry_after,
)

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


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(10, usegmt=True), now=1_000) == 0.0


def test_backoff_is_full_jitter_below_an_exponential_cap():
    rng = random.Random(0)
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 60.0)]:
        delays = [backoff_delay(attempt, 1.0, 60.0, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap / 2  # jitter spreads over the whole range


# ----------------------------------------------------------------------------- real receiver


@pytest.mark.services
def test_fails_twice_then_delivered_on_attempt_three(webhook_receiver, redis_client):
    webhook_receiver.fail_next(2, status=500)
    delays: list[float] = []
    outcome = deliver_event(
        webhook_receiver.url,
        _event(),
        secret=webhook_receiver.secret,
        redis_client=redis_client,
        attempts_key="scalecap:webhook:b_1",
        sleep=delays.append,
        allow_private=True,
    )
    assert outcome.delivered and outcome.attempts == 3 and outcome.last_status == 200
    got = webhook_receiver.wait_for(3, timeout=5)
    assert len(got) == 3
    assert all(r.verified for r in got)
    assert {r.headers["webhook-id"] for r in got} == {outcome.webhook_id}
    assert got[-1].json()["data"]["counts"] == COUNTS
    attempts = _attempts(redis_client, "scalecap:webhook:b_1")
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status"] for a in attempts] == [500, 500, 200]
    assert [a["error"] for a in attempts] == ["HTTP 500", "HTTP 500", None]
    assert all(a["duration_ms"] >= 0 and a["at"] for a in attempts)
    assert redis_client.ttl("scalecap:webhook:b_1") > 0
    assert len(delays) == 2 and 0 <= delays[0] <= 1.0 and 0 <= delays[1] <= 2.0


@pytest.mark.services
def test_retry_after_is_honoured_and_capped(webhook_receiver, redis_client):
    webhook_receiver.fail_next(1, status=429, retry_after=7)
    webhook_receiver.fail_next(1, status=503, retry_after=3600)
    date = email.utils.formatdate(usegmt=True)  # "now": no wait
    webhook_receiver.fail_next(1, status=503, retry_after=date)
    delays: list[float] = []
    outcome = deliver_event(
        webhook_receiver.url,
        _event(),
        secret=webhook_receiver.secret,
        redis_client=redis_client,
        attempts_key="k",
        max_delay=60.0,
        sleep=delays.append,
        allow_private=True,
    )
    assert outcome.delivered and outcome.attempts == 4
    assert delays[:2] == [7.0, 60.0]
    assert 0 <= delays[2] <= 1.0


@pytest.mark.services
def test_one_attempt_reports_the_receivers_retry_after(webhook_receiver, redis_client):
    # The webhook task makes one attempt per run and schedules the next itself: it needs the
    # receiver's Retry-After from the outcome.
    webhook_receiver.fail_next(1, status=429, retry_after=42)
    outcome = deliver_event(webhook_receiver.url, _event(), secret=webhook_receiver.secret,
                            redis_client=redis_client, attempts_key="k1", max_attempts=1,
                            allow_private=True)
    assert not outcome.delivered and outcome.last_status == 429 and outcome.retry_after == 42.0
    ok = deliver_event(webhook_receiver.url, _event(), secret=webhook_receiver.secret,
                       redis_client=redis_client, attempts_key="k1", max_attempts=1, allow_private=True)
    assert ok.delivered and ok.retry_after is None


@pytest.mark.services
def test_client_error_is_final(webhook_receiver, redis_client):
    webhook_receiver.fail_next(1, status=410)
    delays: list[float] = []
    outcome = deliver_event(
        webhook_receiver.url,
        _event(),
        secret=webhook_receiver.secret,
        redis_client=redis_client,
        attempts_key="k",
        sleep=delays.append,
        allow_private=True,
    )
    assert not outcome.delivered
    assert (outcome.attempts, outcome.last_status, outcome.last_error) == (1, 410, "HTTP 410")
    assert delays == []
    assert len(webhook_receiver.requests) == 1


@pytest.mark.services
def test_dead_receiver_is_bounded_and_never_raises(redis_client):
    (port,) = free_ports(1)  # nothing listens there
    delays: list[float] = []
    outcome = deliver_event(
        f"http://127.0.0.1:{port}/hook",
        _event(),
        secret="whsec_" + "A" * 32,
        redis_client=redis_client,
        attempts_key="dead",
        max_attempts=4,
        sleep=delays.append,
        allow_private=True,
    )
    assert not outcome.delivered and outcome.attempts == 4 and outcome.last_status is None
    assert "ConnectError" in outcome.last_error
    attempts = _attempts(redis_client, "dead")
    assert [a["status"] for a in attempts] == [None] * 4
    assert all("ConnectError" in a["error"] for a in attempts)
    assert len(delays) == 3  # no sleep after the last attempt


@pytest.mark.services
def test_a_receiver_that_never_answers_times_out_and_retries(redis_client):
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
            max_attempts=2,
            sleep=lambda s: None,
            allow_private=True,
        )
    assert not outcome.delivered and outcome.attempts == 2
    assert "Timeout" in outcome.last_error
    assert len(_attempts(redis_client, "slow")) == 2


@pytest.mark.services
def test_private_address_is_refused_without_sending(webhook_receiver, redis_client):
    outcome = deliver_event(
        webhook_receiver.url,
        _event(),
        secret=webhook_receiver.secret,
        redis_client=redis_client,
        attempts_key="refused",
        sleep=lambda s: pytest.fail("must not retry a refused URL"),
    )
    assert not outcome.delivered and outcome.attempts == 0
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
                            attempts_key="rebind", sleep=lambda s: pytest.fail("no retry"))  # fmt: skip
    assert not outcome.delivered and outcome.attempts == 1
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
