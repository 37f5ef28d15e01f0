"""Protocol v3 against the faults a real fleet meets (issue 13), each at its exact moment, on real
redis-server, SeaweedFS and `scalecap worker` processes:

- a worker frozen (SIGSTOP of its process group) past its lease, woken after another worker
  finished its jobs: it writes nothing, and every record is the credited run's;
- a task message lost between kombu's pop and its unacked write (failpoint `after_pop`), and a
  quarantine-lane message deleted from the broker: the audit publishes them again;
- a worker and a reconciler whose clocks run an hour ahead (libfaketime): no live lease is taken
  back, no result discarded;
- a Redis sink down for longer than any retry budget: jobs are parked, not dead-lettered, and the
  worker claims nothing for that sink until it answers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from scalecap.fleet.protocol import UNPUBLISHED_KEY, quarantine_queue
from tests.fixtures_services import RedisServer
from tests.fleet_support import Fleet, make_images, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]

FAST = {  # a lease lasts 1.5 x 2 + 2 = 5 s; the audit runs every 10 reconcile passes (10 s)
    "SCALECAP_VISIBILITY_TIMEOUT": "5",
    "SCALECAP_JOB_TIMEOUT": "2",
    "SCALECAP_RECONCILE_INTERVAL": "1",
    "SCALECAP_MAX_ATTEMPTS": "2",
    "SCALECAP_CHUNK_SIZE": "4",
}
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def _fleet(redis_server, tmp: Path, s3_server, name: str, **env: str) -> Fleet:
    tmp = tmp / name
    tmp.mkdir()
    url = f"{redis_server.url}/{redis_server.fresh_db()}"
    return Fleet(url, tmp, env={**s3_server.env(), **FAST, **env})


def _redis_records(client, batch_id: str) -> dict[str, dict]:
    """Every record of the batch in the Redis sink, by key."""
    r = client.results_redis
    return {k.decode(): json.loads(r.get(k)) for k in r.scan_iter(f"scalecap:result:{batch_id}:*")}


def _credited_only(client, batch_id: str, n: int) -> dict[str, dict]:
    """The batch is done, once per image, and the sink holds the credited records and no other."""
    st = client.status(batch_id)
    assert (st["state"], st["done"], st["failed"], st["dead_lettered"]) == ("finished", n, 0, 0), st
    records = _redis_records(client, batch_id)
    credited = {j["job_id"]: client.store.job(batch_id, j["job_id"])["location"]
                for j in client.jobs(batch_id, limit=1000)}
    assert sorted("redis://" + k for k in records) == sorted(credited.values()), "a record not credited"
    for key, row in records.items():
        assert key.endswith(":" + row["scalecap_record"]["meta"]["attempt"])
    assert [j["attempts"] for j in client.jobs(batch_id, limit=1000)] == [0] * n
    return records


def test_a_worker_frozen_past_its_lease_writes_nothing_when_it_wakes(redis_server, tmp_path, s3_server):
    """A claims a chunk and makes its records; it is frozen (SIGSTOP) just before the sink write
    and stays frozen past its lease. The reconciler takes the jobs back, B runs them. A wakes:
    it finds its lease lost and writes nothing; every record is B's."""
    fleet = _fleet(redis_server, tmp_path, s3_server, "frozen")
    try:
        images = make_images(fleet.tmp / "imgs", ["red", "green", "blue", "white"])
        a = fleet.scripted(concurrency=1, env={"SCALECAP_FAILPOINT": "before_sink_write:sleep=2"})
        client = fleet.client()
        sub = client.submit([str(p) for p in images], sink="redis", model="scripted")
        wait_until(lambda: "failpoint before_sink_write" in a.log(), timeout=60, what="A at the sink")
        os.killpg(a.pid, signal.SIGSTOP)  # the process group: every thread of A stops
        try:
            lease = client.redis.zrange("scalecap:leases", 0, 0, withscores=True)[0][1]
            wait_until(lambda: client.store.now() > lease + 0.5, timeout=30, what="A's lease to lapse")
            fleet.io()  # the reconciler: takes the lapsed lease back, into the quarantine lane
            b = fleet.scripted(concurrency=2)
            client.wait(sub.batch_id, timeout=120)
        finally:
            os.killpg(a.pid, signal.SIGCONT)
        wait_until(lambda: "lost its lease" in a.log(), timeout=30, what="A to find its lease lost")
        time.sleep(1.0)
        assert a.alive
        records = _credited_only(client, sub.batch_id, 4)
        workers = {r["scalecap_record"]["meta"]["worker"] for r in records.values()}
        assert workers == {f"{_host()}:{b.pid}"}, "a record of the frozen run"
        assert client.status(sub.batch_id)["stale_results"] == 0  # A never finished: nothing to discard
    finally:
        fleet.close()


def _host() -> str:
    import socket

    return socket.gethostname()


def test_a_message_lost_between_pop_and_unacked_write_is_restored(redis_server, tmp_path, s3_server):
    """A dies right after kombu popped its first message, before the unacked write: that
    message is gone from the broker. The audit finds its jobs unreachable and publishes them
    again; the batch finishes, each image captioned once."""
    fleet = _fleet(redis_server, tmp_path, s3_server, "popped")
    try:
        images = make_images(fleet.tmp / "imgs", ["red", "green", "blue", "white"])
        client = fleet.client()
        sub = client.submit([str(p) for p in images], sink="redis", model="scripted")
        a = fleet.scripted(concurrency=1, env={"SCALECAP_FAILPOINT": "after_pop:exit"}, start=False)
        _start_dying(fleet, a)
        q = client.store.queue_of(sub.batch_id)
        assert client.redis.llen(q) == 0 and client.redis.hlen("unacked") == 0, "the message is not gone"
        assert client.status(sub.batch_id)["queued"] == 4
        fleet.io()
        fleet.scripted(concurrency=2)
        started = time.monotonic()
        client.wait(sub.batch_id, timeout=120)
        assert time.monotonic() - started < 2 * 10 + 10, "later than two audits and a pass"
        _credited_only(client, sub.batch_id, 4)
        assert len(fleet.vlm_calls()) == 4, "an image captioned twice"
    finally:
        fleet.close()


def _start_dying(fleet: Fleet, w) -> None:
    """Start a worker whose failpoint kills it on its first message; wait until it died."""
    try:
        w.start(timeout=60)
    except RuntimeError:
        pass  # it may die before it logs "ready."
    fleet.wait_dead(w)


def test_a_quarantine_lane_message_deleted_from_the_broker_is_restored(redis_server, tmp_path, s3_server):
    """A worker dies after its claim; the reconciler sends the jobs to the quarantine lane, and
    that lane's messages are deleted. A resubmit does not reach them (they wait in quarantine);
    the audit publishes them again to the quarantine lane, where they run."""
    fleet = _fleet(redis_server, tmp_path, s3_server, "quarantine")
    try:
        images = make_images(fleet.tmp / "imgs", ["red", "green", "blue", "white"])
        client = fleet.client()
        a = fleet.scripted(concurrency=1, env={"SCALECAP_FAILPOINT": "after_claim:exit"})
        sub = client.submit([str(p) for p in images], sink="redis", model="scripted")
        fleet.wait_dead(a)
        qlane = quarantine_queue(client.store.queue_of(sub.batch_id))
        assert main_reconcile(fleet) == 0
        wait_until(lambda: main_reconcile(fleet) == 0 and client.redis.llen(qlane) == 4, timeout=30,
                   what="the jobs in the quarantine lane")
        client.redis.delete(qlane)  # lost
        assert client.redis.zcard(UNPUBLISHED_KEY) == 0
        fleet.io()
        fleet.scripted(concurrency=2)
        client.wait(sub.batch_id, timeout=120)
        _credited_only(client, sub.batch_id, 4)
        assert len(fleet.vlm_calls()) == 4
    finally:
        fleet.close()


def main_reconcile(fleet: Fleet) -> int:
    from producer.cli import main

    return main(["reconcile", "--grace", "0", "--broker-url", fleet.redis_url])


@pytest.mark.skipif(not Path(FAKETIME_LIB).exists(), reason="apt-get install -y faketime")
def test_a_worker_and_a_reconciler_an_hour_ahead_discard_no_live_result(redis_server, tmp_path, s3_server):
    """The I/O worker (the reconciler) and one of two workers run an hour ahead (libfaketime);
    each image takes 2 s. v2 took back every lease of the worker on time at once (the
    reconciler's "now" was its own clock), so its images ran twice and its results were
    discarded as stale."""
    slow = {"SCALECAP_JOB_TIMEOUT": "10", "SCALECAP_VISIBILITY_TIMEOUT": "20"}
    ahead = {"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": "+1h", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    fleet = _fleet(redis_server, tmp_path, s3_server, "skew", **slow)
    try:
        images = make_images(fleet.tmp / "imgs", ["red"] * 6)
        fleet.scripted(concurrency=1, env=ahead, slow_colour="red", slow_seconds=2)
        fleet.scripted(concurrency=1, slow_colour="red", slow_seconds=2)
        fleet.io(**ahead)
        client = fleet.client()
        sub = client.submit([str(p) for p in images], sink="redis", model="scripted", chunk_size=2)
        client.wait(sub.batch_id, timeout=120)
        st = client.status(sub.batch_id)
        assert (st["done"], st["stale_results"], st["dead_lettered"]) == (6, 0, 0), st
        assert len(fleet.vlm_calls()) == 6, "an image ran twice: a live lease was taken back"
        _credited_only(client, sub.batch_id, 6)
    finally:
        fleet.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server")
def test_a_sink_outage_parks_jobs_and_the_worker_stops_claiming(redis_server, tmp_path, s3_server):
    """The results Redis (the sink) is down far longer than the retry budget: no job is charged
    or dead-lettered, the worker stops claiming (runs stay put), and all finish once it is back."""
    sink_dir = tmp_path / "sink-redis"
    sink_dir.mkdir()
    sink = RedisServer(sink_dir)
    sink.start()
    fleet = _fleet(redis_server, tmp_path, s3_server, "outage", SCALECAP_RESULTS_URL=f"{sink.url}/0")
    try:
        images = make_images(fleet.tmp / "imgs", ["red", "green", "blue", "white"])
        fleet.scripted(concurrency=2)
        client = fleet.client()
        sink.stop()
        sub = client.submit([str(p) for p in images], sink="redis", model="scripted", chunk_size=2)

        def runs() -> int:
            return sum(int(client.store.job(sub.batch_id, j["job_id"])["runs"])
                       for j in client.jobs(sub.batch_id))

        wait_until(lambda: runs() >= 1, timeout=60, what="a first run")
        time.sleep(12.0)  # v2 would have run these jobs again and again (up to 10 runs each)
        held = runs()
        assert held <= 4, f"the worker kept claiming while its sink was down ({held} runs)"
        st = client.status(sub.batch_id)
        assert (st["done"], st["failed"], st["dead_lettered"]) == (0, 0, 0), st
        sink.start()
        client.wait(sub.batch_id, timeout=120)
        st = client.status(sub.batch_id)
        assert (st["done"], st["failed"], st["dead_lettered"]) == (4, 0, 0), st
        assert [j["attempts"] for j in client.jobs(sub.batch_id)] == [0] * 4
    finally:
        fleet.close()
        sink.stop()
