"""The fleet rides out its services restarting mid-batch: S3 (records are retried until the
sink is back) and Redis (a persistent broker comes back; workers and producer reconnect)."""

from __future__ import annotations

import time

import pytest

from tests.fixtures_services import RedisServer
from tests.fleet_support import Fleet, make_images, s3_objects, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_s3_restart_mid_batch_every_record_lands_once(fleet: Fleet, s3_server, s3_bucket):
    fleet.env["SCALECAP_MAX_ATTEMPTS"] = "8"  # enough retries to outlast the outage
    images = make_images(fleet.tmp / "imgs", ["green"] * 10)
    fleet.scripted(concurrency=2, slow_colour="green", slow_seconds=0.3)
    client = fleet.client()
    sub = client.submit([str(p) for p in images], sink=f"s3://{s3_bucket}/r", model="scripted")
    wait_until(lambda: client.status(sub.batch_id)["done"] >= 1, timeout=30, what="a first record")
    s3_server.stop()
    time.sleep(2.0)  # jobs keep finishing and fail to write while S3 is down
    assert client.status(sub.batch_id)["finished_at"] is None, "finished before the outage"
    s3_server.start()
    st = client.wait(sub.batch_id, timeout=120)
    assert (st["done"], st["failed"], st["dead_lettered"]) == (10, 0, 0)
    keys = s3_objects(s3_server.client(), s3_bucket, f"r/{sub.batch_id}/")
    assert len(keys) == 10
    assert sorted(r["image"] for r in client.results(sub.batch_id)) == sorted(map(str, images))


def test_redis_restart_mid_batch_batch_completes(tmp_path, s3_server, s3_bucket, webhook_receiver):
    """Redis restarted with its append-only file mid-batch: every record once, and the batch's
    event (outbox) delivered once."""
    broker = RedisServer(tmp_path / "redis-data", persistent=True)
    (tmp_path / "redis-data").mkdir()
    broker.start()
    fleet = Fleet(f"{broker.url}/0", tmp_path, env=s3_server.env())
    try:
        images = make_images(tmp_path / "imgs", ["green"] * 10)
        fleet.scripted(concurrency=2, slow_colour="green", slow_seconds=0.3)
        fleet.io(SCALECAP_WEBHOOK_SECRET=webhook_receiver.secret)
        client = fleet.client()
        sub = client.submit([str(p) for p in images], sink=f"s3://{s3_bucket}/q", model="scripted",
                            webhook=webhook_receiver.url)
        wait_until(lambda: client.status(sub.batch_id)["done"] >= 1, timeout=30, what="a first record")
        broker.restart()
        st = wait_until(lambda: _status_or_none(fleet, sub.batch_id), timeout=20, what="Redis back")
        assert st["finished_at"] is None, "finished before the restart"
        st = fleet.client().wait(sub.batch_id, timeout=120)
        assert (st["done"], st["failed"], st["dead_lettered"]) == (10, 0, 0)
        keys = s3_objects(s3_server.client(), s3_bucket, f"q/{sub.batch_id}/")
        client = fleet.client()
        credited = {client.store.job(sub.batch_id, j["job_id"])["location"]
                    for j in client.jobs(sub.batch_id)}
        assert len(credited) == 10, "every image once, credited to one run"
        assert {c.removeprefix(f"s3://{s3_bucket}/") for c in credited} <= set(keys)
        # A run whose finish met the restart leaves its records beside the credited ones (fenced:
        # its own keys, never credited): at most the chunks in flight (2 threads x 2 images).
        assert len(keys) <= 10 + 4
        assert all(w.alive for w in fleet.workers), "workers reconnected instead of dying"
        got = webhook_receiver.wait_for(1, timeout=30)
        time.sleep(1.5)
        got = list(webhook_receiver.requests)
        assert [r.json()["type"] for r in got] == ["batch.completed"] and got[0].verified
    finally:
        fleet.close()
        broker.stop()


def _status_or_none(fleet: Fleet, batch_id: str):
    try:
        return fleet.client().status(batch_id)
    except Exception:
        return None
