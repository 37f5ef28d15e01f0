"""Workers that die: `kill -9` mid-batch, and a poison job that kills every worker it reaches.

Late acks leave a dead worker's reserved jobs unacknowledged in Redis; after the (short, test)
visibility timeout another worker gets them. Jobs whose run was lost go to the quarantine lane
and run there alone, uncharged; a job that kills its worker there is charged, and after
max_attempts it goes to the dead-letter list instead of looping. The other jobs are never charged.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.fleet_support import Fleet, make_images, s3_objects, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]

VISIBILITY_TIMEOUT = 5


@pytest.fixture
def fleet(redis_url, tmp_path, s3_server):
    f = Fleet(redis_url, tmp_path, env={
        **s3_server.env(),
        "SCALECAP_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        "SCALECAP_JOB_TIMEOUT": "2",
        "SCALECAP_MAX_ATTEMPTS": "2",
    })
    try:
        yield f
    finally:
        f.close()


def test_kill_9_mid_batch_every_job_finishes_exactly_once(fleet: Fleet, s3_server, s3_bucket):
    images = make_images(fleet.tmp / "imgs", ["green"] * 12)
    a = fleet.scripted(concurrency=2, slow_colour="green", slow_seconds=0.5)
    b = fleet.scripted(concurrency=2, slow_colour="green", slow_seconds=0.5)
    # The reconciler takes back A's leases once they lapse: A renewed them while it lived, so a
    # copy of its message that kombu hands B before then finds the jobs busy (and is acked).
    fleet.io()
    client = fleet.client()
    sink = f"s3://{s3_bucket}/k"
    sub = client.submit([str(p) for p in images], sink=sink, model="scripted")

    # Kill A while it holds jobs: it has started at least one and the batch is not done.
    wait_until(lambda: any(pid == a.pid for pid, _ in fleet.vlm_calls()), timeout=30, what="A at work")
    a.kill()
    st = client.status(sub.batch_id)
    assert st["finished_at"] is None, "the batch finished before the kill; nothing was tested"

    st = client.wait(sub.batch_id, timeout=90)
    assert (st["done"], st["failed"], st["dead_lettered"]) == (12, 0, 0)
    keys = s3_objects(s3_server.client(), s3_bucket, f"k/{sub.batch_id}/")
    credited = {client.store.job(sub.batch_id, j["job_id"])["location"] for j in client.jobs(sub.batch_id)}
    assert len(credited) == 12 and {c.removeprefix(f"s3://{s3_bucket}/") for c in credited} <= set(keys)
    assert len(keys) <= 12 + 4, "more records than A's runs could leave (2 chunks of 2)"
    rows = list(client.results(sub.batch_id))
    assert sorted(r["image"] for r in rows) == sorted(map(str, images))
    assert len({r["scalecap_record"]["meta"]["job_id"] for r in rows}) == 12
    calls = fleet.vlm_calls()
    assert {pid for pid, _ in calls} == {a.pid, b.pid}
    # A's unfinished jobs ran again on B: more model calls than images, never fewer.
    assert len(calls) >= 12
    assert b.alive


def test_poison_job_reaches_dead_letter_after_bounded_attempts(fleet: Fleet):
    images = make_images(fleet.tmp / "imgs", ["red", "black", "blue", "green"])
    workers = [fleet.scripted(concurrency=1, poison_colour="black") for _ in range(2)]
    # An operator's supervisor: restart whatever dies, until the test is over.
    stop = threading.Event()
    restarts: list[int] = []

    def supervise() -> None:
        while not stop.is_set():
            for i, w in enumerate(workers):
                if not w.alive and not stop.is_set():
                    restarts.append(w.pid)
                    workers[i] = fleet.scripted(concurrency=1, poison_colour="black")
            time.sleep(0.2)

    sup = threading.Thread(target=supervise, daemon=True)
    sup.start()
    try:
        client = fleet.client()
        sub = client.submit([str(p) for p in images], sink="redis", model="scripted")
        st = client.wait(sub.batch_id, timeout=120)
    finally:
        stop.set()
        sup.join(30)

    assert (st["done"], st["failed"], st["dead_lettered"]) == (3, 1, 1)
    poison_runs = [c for _, c in fleet.vlm_calls() if c == "black"]
    # One uncharged run beside other jobs, then max_attempts runs alone in the quarantine lane;
    # the next delivery was not run.
    assert len(poison_runs) == 3
    assert len(restarts) == 3
    entries = [json.loads(x) for x in client.redis.lrange("scalecap:dead_letter", 0, -1)]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["ref"] == str(images[1]) and entry["attempts"] == 2
    assert entry["error"]["type"] == "WorkerLost"
    others = [j for j in client.jobs(sub.batch_id) if j["image"] != str(images[1])]
    assert len(others) == 3 and all(j["attempts"] == 0 for j in others), "charged for another's crash"
    rows = {r["image"]: r["scalecap_record"] for r in client.results(sub.batch_id)}
    assert rows[str(images[1])]["error"]["type"] == "WorkerLost"
    assert "final_caption" in rows[str(images[0])]
