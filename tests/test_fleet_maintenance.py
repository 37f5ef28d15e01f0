"""The repair side against a real Redis, without workers: the reconciler, the outbox's two lanes,
webhook retry scheduling, per-key webhook secrets, submit backpressure, purge and the worker's
timeout check. Celery's Redis transport keeps each queue as a Redis list of that name, so what
was published is read back with LLEN/LRANGE."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from producer.client import FleetClient
from scalecap.fleet.protocol import (
    BATCHES_KEY,
    IO_JOBS_QUEUE,
    IO_QUEUE,
    OUTBOX_KEY,
    UNPUBLISHED_KEY,
    WEBHOOK_RETRIES_KEY,
    BatchMismatch,
    Outcome,
    RunOutcome,
    queue_queued_key,
)
from scalecap.fleet.reconcile import RECONCILE_LOCK, Reconciler, lock_ttl
from scalecap.settings import Settings
from tests.fleet_support import REPO, wait_until

pytestmark = pytest.mark.services

Q = "scalecap.gpu.nobody"


def _client(redis_url: str, **kw) -> FleetClient:
    return FleetClient(Settings(broker_url=redis_url, **kw))


def _bodies(r, queue: str) -> list[dict]:
    """The task arguments of every message waiting in a Celery queue (kombu's Redis list: LPUSH
    to publish, BRPOP to consume), oldest first."""
    out = []
    for raw in reversed(r.lrange(queue, 0, -1)):
        msg = json.loads(raw)
        import base64

        args = json.loads(base64.b64decode(msg["body"]))[0]
        out.append(args[0])
    return out


def test_outbox_drains_into_two_lanes_and_retries_come_back_when_due(redis_url):
    c = _client(redis_url)
    sub = c.submit(["/x/1.png", "/x/2.png"], sink="redis", model="nobody", webhook="http://h/x",
                   webhook_jobs=True)
    c.cancel(sub.batch_id)  # two job events and the batch event, all in the outbox
    assert c.redis.llen(OUTBOX_KEY) == 3
    rec = Reconciler(c.app, c.store, c.settings)
    assert rec.drain().events == 3 and c.redis.llen(OUTBOX_KEY) == 0
    batch_lane, job_lane = _bodies(c.redis, IO_QUEUE), _bodies(c.redis, IO_JOBS_QUEUE)
    assert [e["type"] for e in batch_lane] == ["batch.completed"]
    assert [e["type"] for e in job_lane] == ["job.completed"] * 2
    assert len({e["id"] for e in batch_lane + job_lane}) == 3
    assert c.redis.zcard(WEBHOOK_RETRIES_KEY) == 3  # handed over: pending until their tasks settle
    # A retry scheduled by the webhook task comes back into its lane when due, not before.
    event = {**batch_lane[0], "attempt": 2}
    c.redis.zadd(WEBHOOK_RETRIES_KEY, {json.dumps(event): time.time() + 60})
    assert rec.drain().retries_due == 0
    c.redis.zadd(WEBHOOK_RETRIES_KEY, {json.dumps(event): time.time() - 1})
    assert rec.drain().retries_due == 1 and c.redis.zcard(WEBHOOK_RETRIES_KEY) == 4  # leased again
    assert [e.get("attempt") for e in _bodies(c.redis, IO_QUEUE)] == [None, 2]


def test_reconcile_publishes_forgotten_chunks_and_takes_back_expired_leases(redis_url):
    c = _client(redis_url, chunk_size=2)
    store = c.store
    store.create_batch("b", config={}, config_hash="h", model="nobody", queue=Q, sink="redis")
    store.register_jobs("b", [(f"j{i}", f"/x/{i}.png", None) for i in range(5)], queue=Q)
    # (as if the producer died here: registered, never published)
    claim = store.claim("b", ["j0"], token="t", lease_seconds=-1, max_attempts=3, queue=Q)
    assert claim.runnable() == ["j0"]
    rep = Reconciler(c.app, store, c.settings).reconcile(grace=0)
    assert rep.published_chunks == 1 and rep.expired_leases == 1
    assert c.redis.zcard(UNPUBLISHED_KEY) == 0
    normal = _bodies(c.redis, Q)
    assert [len(m["jobs"]) for m in normal] == [2, 2, 1]  # chunks of K = 2
    quarantined = _bodies(c.redis, Q + ".quarantine")
    assert quarantined == [{"v": 2, "batch_id": "b", "jobs": [["j0", "/x/0.png"]], "quarantine": True}]
    assert store.job("b", "j0")["attempts"] == "0"


def _expired_lease(c: FleetClient, b: str = "b") -> None:
    c.store.create_batch(b, config={}, config_hash="h", model="nobody", queue=Q, sink="redis")
    c.store.register_jobs(b, [("j0", "/x/0.png", None)], queue=Q)
    assert c.store.claim(b, ["j0"], token="t", lease_seconds=-1, max_attempts=3, queue=Q).runnable()


def test_a_lock_take_whose_reply_was_lost_stalls_no_pass_of_its_owner(redis_url):
    """The lock SET ran in Redis but its reply was lost (redis-py raised): the key holds this
    reconciler's id. Its next pass re-enters the lock and repairs; then the lock is released."""
    c = _client(redis_url, reconcile_interval=1)
    _expired_lease(c)
    rec, other = Reconciler(c.app, c.store, c.settings), Reconciler(c.app, c.store, c.settings)
    c.redis.set(RECONCILE_LOCK, rec._me, px=int(lock_ttl(c.settings) * 1000))
    assert other.reconcile(grace=0).expired_leases == 0  # not its lock: no pass
    assert c.redis.get(RECONCILE_LOCK) == rec._me.encode()  # and it did not delete rec's
    assert rec.reconcile(grace=0).expired_leases == 1
    assert c.redis.get(RECONCILE_LOCK) is None
    assert _bodies(c.redis, Q + ".quarantine")[0]["jobs"] == [["j0", "/x/0.png"]]


def test_a_dead_reconcilers_lock_lapses_within_the_stated_bound(redis_url):
    """A reconciler that died holding the lock stalls others for at most lock_ttl (docs/protocol.md:
    twice the interval, at least 5 s), not the 120 s of v3's first lock."""
    c = _client(redis_url, reconcile_interval=1)
    _expired_lease(c)
    dead, rec = Reconciler(c.app, c.store, c.settings), Reconciler(c.app, c.store, c.settings)
    assert dead._lock(RECONCILE_LOCK, lock_ttl(c.settings))
    assert rec.reconcile(grace=0).expired_leases == 0
    assert 0 < c.redis.pttl(RECONCILE_LOCK) <= lock_ttl(c.settings) * 1000
    wait_until(lambda: rec.reconcile(grace=0).expired_leases == 1, timeout=lock_ttl(c.settings) + 2,
               interval=0.5, what="a pass after the dead reconciler's lock lapsed")


def test_a_retry_note_is_published_when_due_by_redis_clock(redis_url):
    """A finish that queues a job again notes it due at Redis' now + the delay; the I/O worker's
    drain publishes it then, never before, with no ETA (no sender's clock in it)."""
    c = _client(redis_url)
    store = c.store
    store.create_batch("b", config={}, config_hash="h", model="nobody", queue=Q, sink="redis")
    store.register_jobs("b", [("j0", "/x/0.png", None)], queue=Q)
    c.redis.delete(UNPUBLISHED_KEY)  # (the producer published it)
    claim = store.claim("b", ["j0"], token="t", lease_seconds=30, max_attempts=3, queue=Q)
    fin = store.finish("b", [Outcome("j0", RunOutcome.RETRY, error={"type": "X"})], token="t",
                       lease=claim.lease, max_attempts=3, queue=Q, sink="redis", retry_in=2.0)
    assert fin.retry and c.redis.zscore(UNPUBLISHED_KEY, fin.retry) > store.now() + 1
    rec = Reconciler(c.app, store, c.settings)
    assert rec.drain().due_chunks == 0 and c.redis.llen(Q) == 0
    wait_until(lambda: rec.drain().due_chunks == 1, timeout=10, interval=0.2, what="the due retry")
    assert c.redis.zcard(UNPUBLISHED_KEY) == 0
    (raw,) = c.redis.lrange(Q, 0, -1)
    assert json.loads(raw)["headers"].get("eta") is None
    assert _bodies(c.redis, Q) == [{"v": 2, "batch_id": "b", "jobs": [["j0", "/x/0.png"]]}]


def test_a_chunk_for_a_sink_found_down_is_noted_due_not_sent_back_with_an_eta(redis_url):
    """The worker's sink gate is closed: nothing is claimed, no message is published (a countdown
    would be an ETA by this worker's clock); the chunk is a note due by Redis' clock, which the
    I/O worker's drain publishes when due."""
    from scalecap.fleet.protocol import JobMessage
    from workers.jobs import JobContext, process_chunk

    c = _client(redis_url)
    c.store.create_batch("b", config={}, config_hash="h", model="nobody", queue=Q, sink="redis")
    c.store.register_jobs("b", [("j0", "/x/0.png", None)], queue=Q)
    c.redis.delete(UNPUBLISHED_KEY)  # (the producer published it)
    ctx = JobContext(c.settings, c.redis)
    ctx.gate.down("redis")
    assert process_chunk(ctx, JobMessage("b", (("j0", "/x/0.png"),))) == {"sink_down": 1}
    assert c.store.job("b", "j0")["state"] == "queued" and c.redis.llen(Q) == 0
    ((_member, due),) = c.redis.zrange(UNPUBLISHED_KEY, 0, -1, withscores=True)
    assert due > c.store.now()
    rec = Reconciler(c.app, c.store, c.settings)
    wait_until(lambda: rec.drain().due_chunks == 1, timeout=10, interval=0.2, what="the parked chunk")
    assert _bodies(c.redis, Q) == [{"v": 2, "batch_id": "b", "jobs": [["j0", "/x/0.png"]]}]


def test_resubmission_with_another_config_or_model_is_refused_with_exit_2(redis_url, capsys):
    """(Another sink is refused the same way: tests/test_fleet_scripts.py, create_batch.)"""
    from scalecap_command import main

    tail = ["--batch-id", "mm", "--broker-url", redis_url]
    assert main(["submit", "/x/1.png", "--model", "m", *tail]) == 0
    c = _client(redis_url)
    before = (c.status("mm"), c.redis.llen("scalecap.gpu.m"), c.redis.llen("scalecap.gpu.other"))
    for argv, what in ((["submit", "/x/1.png", "--model", "m", "--max-questions", "3", *tail], "config"),
                       (["submit", "/x/1.png", "--model", "other", *tail], "model")):
        capsys.readouterr()
        assert main(argv) == 2
        assert f"exists with another {what}" in capsys.readouterr().err
    with pytest.raises(BatchMismatch):
        c.submit(["/x/2.png"], model="m", batch_id="mm", config={"max_questions": 3})
    after = (c.status("mm"), c.redis.llen("scalecap.gpu.m"), c.redis.llen("scalecap.gpu.other"))
    assert after == before, "a refused resubmission wrote something"


def test_submit_waits_while_too_many_images_are_queued(redis_url):
    c = _client(redis_url, max_queued=3)
    first = c.submit([f"/x/{i}.png" for i in range(5)], sink="redis", model="nobody", queue=Q)
    assert int(c.redis.get(queue_queued_key(Q))) == 5
    waits: list[int] = []
    done = threading.Event()

    def second() -> None:
        c2 = _client(redis_url, max_queued=3)
        c2.submit(["/y/1.png"], sink="redis", model="nobody", queue=Q, on_wait=waits.append)
        done.set()

    t = threading.Thread(target=second, daemon=True)
    t.start()
    time.sleep(1.5)
    assert not done.is_set() and waits and waits[0] == 5  # waiting, and saying why
    c.cancel(first.batch_id)  # its queued images leave the queue
    assert done.wait(10)
    assert int(c.redis.get(queue_queued_key(Q))) == 1


def test_purge_one_batch_and_batches_finished_before_a_date(redis_url):
    from scalecap_command import main

    c = _client(redis_url)
    ids = []
    for i in range(3):
        sub = c.submit([f"/x/{i}.png"], sink="redis", model="nobody", batch_id=f"p{i}", owner="k1")
        c.cancel(sub.batch_id)  # finished
        ids.append(sub.batch_id)
    assert c.store.count_batches("k1") == 3
    assert main(["purge", "p0", "--broker-url", redis_url]) == 0
    assert c.store.batch("p0") is None and c.store.count_batches("k1") == 2
    assert main(["purge", "nope", "--broker-url", redis_url]) == 1
    assert main(["purge", "--finished-before", "2000-01-01", "--broker-url", redis_url]) == 0
    assert c.store.count_batches() == 2  # nothing finished before 2000
    assert main(["purge", "--finished-before", "2999-01-01T00:00:00Z", "--broker-url", redis_url]) == 0
    assert c.store.count_batches() == 0 and c.store.count_batches("k1") == 0
    assert c.redis.zcard(BATCHES_KEY) == 0 and not c.redis.keys("scalecap:batch:*")
    assert main(["purge", "--broker-url", redis_url]) == 2


def test_webhook_secret_is_the_batch_owners_when_the_key_has_one(redis_url):
    import redis

    from scalecap.fleet.keys import KeyStore
    from workers.tasks import webhook_secret

    r = redis.Redis.from_url(redis_url)
    _, key, own = KeyStore(r).create("tenant")
    assert webhook_secret(r, {"owner": key.key_id}, "whsec_fleet") == own
    assert webhook_secret(r, {"owner": ""}, "whsec_fleet") == "whsec_fleet"
    assert webhook_secret(r, {"owner": "0123456789abcdef"}, "whsec_fleet") == "whsec_fleet"  # unknown key


def test_worker_refuses_a_visibility_timeout_under_twice_the_job_timeout(redis_url):
    argv = ["worker", "--backend", "tests.fleet_vlms:FleetVLM", "--model", "m", "--broker-url", redis_url]
    code = f"import sys; from scalecap_command import main; sys.exit(main({argv!r}))"
    env = {"SCALECAP_VISIBILITY_TIMEOUT": "100", "SCALECAP_JOB_TIMEOUT": "60", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode != 0
    assert "must be at least twice" in proc.stderr


def test_records_go_to_a_separate_results_redis(redis_server, redis_url):
    """SCALECAP_RESULTS_URL: the Redis sink writes there, state stays on the broker."""
    import redis

    from scalecap.fleet.protocol import JobMessage
    from workers.jobs import JobContext, process_chunk

    results_url = f"{redis_server.url}/{redis_server.fresh_db()}"
    settings = Settings(broker_url=redis_url, results_url=results_url, allowed_roots=["/x"])  # the refs below
    c = FleetClient(settings)
    sub = c.submit(["/x/1.png", "/x/2.png"], sink="redis", model="nobody", queue=Q)

    class Runtime:
        def caption_chunk(self, config, items, timeout, watch=None):
            return [{"final_caption": f"of {ref}", "meta": {"job_id": j}} for j, ref in items]

    broker, results = redis.Redis.from_url(redis_url), redis.Redis.from_url(results_url)
    ctx = JobContext(settings, broker, runtime=Runtime, results_client=results)
    jobs = tuple((j["job_id"], j["image"]) for j in c.jobs(sub.batch_id))
    assert process_chunk(ctx, JobMessage(sub.batch_id, jobs)) == {"done": 2}
    assert len(results.keys("scalecap:result:*")) == 2 and broker.keys("scalecap:result:*") == []
    rows = list(c.results(sub.batch_id))  # the client reads them back from the results Redis
    assert sorted(r["image"] for r in rows) == ["/x/1.png", "/x/2.png"]
    assert c.status(sub.batch_id)["state"] == "finished"


def test_status_reads_a_capped_tail_of_the_webhook_attempts(redis_url):
    from scalecap.fleet.protocol import WEBHOOK_ATTEMPTS_SHOWN, webhook_attempts_key

    c = _client(redis_url)
    sub = c.submit(["/x/1.png"], sink="redis", model="nobody", queue=Q)
    key = webhook_attempts_key(sub.batch_id)
    c.redis.rpush(key, *[json.dumps({"attempt": i}) for i in range(1, 251)])
    st = c.status(sub.batch_id)
    assert st["webhook_attempts_total"] == 250
    assert [a["attempt"] for a in st["webhook_attempts"]] == list(range(251 - WEBHOOK_ATTEMPTS_SHOWN, 251))


def test_submit_chunk_size_sets_images_per_message(redis_url, capsys):
    from scalecap_command import main

    refs = [f"/x/{i}.png" for i in range(7)]
    assert main(["submit", *refs, "--model", "nobody", "--chunk-size", "3", "--broker-url", redis_url]) == 0
    out = json.loads(capsys.readouterr().out)
    r = _client(redis_url).redis
    assert [len(m["jobs"]) for m in _bodies(r, Q)] == [3, 3, 1]
    assert out["submitted"] == 7 and r.zcard(UNPUBLISHED_KEY) == 0  # published: no repair note left
