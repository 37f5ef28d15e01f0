"""Each Lua transition of the queue protocol (scalecap/fleet/lua/*.lua) against a real Redis.

BatchStore is the only caller of the scripts, so the tests drive it the way producers, workers
and the reconciler do, and read the keys back to check what each script wrote.
"""

from __future__ import annotations

import json
import time

import pytest

from scalecap.fleet.outcomes import LeaseReply
from scalecap.fleet.protocol import (
    BATCHES_KEY,
    DEAD_LETTER_KEY,
    FINISHED_KEY,
    LEASES_KEY,
    OUTBOX_KEY,
    SCRIPTS,
    UNPUBLISHED_KEY,
    BatchMismatch,
    BatchStore,
    Chunk,
    Outcome,
    batch_key,
    counts,
    job_states_key,
    owner_batches_key,
    queue_queued_key,
    record_index_key,
    script_source,
)

pytestmark = pytest.mark.services

Q = "scalecap.gpu.m"


def _store(redis_url: str, retention: int = 3600) -> BatchStore:
    import redis

    return BatchStore(redis.Redis.from_url(redis_url), retention=retention)


def _batch(store: BatchStore, bid: str = "b1", **kw) -> str:
    args = dict(config={"a": 1}, config_hash="h", model="m", queue=Q, sink="redis")
    args.update(kw)
    store.create_batch(bid, **args)
    return bid


def _outbox(store: BatchStore) -> list[dict]:
    return [json.loads(x) for x in store.r.lrange(OUTBOX_KEY, 0, -1)]


def test_every_script_is_its_own_file_and_loads_once(redis_url):
    store = _store(redis_url)
    for name in SCRIPTS:
        src = script_source(name)  # lib.lua + the script's own file
        assert "local function try_finish" in src and src.count("\n") > 60
    b = _batch(store)
    store.register_jobs(b, [("j1", "r1", None)], queue=Q)
    # EVALSHA only: each script was sent once (SCRIPT LOAD on first use) and then called by hash.
    stats = store.r.info("commandstats")
    assert stats.get("cmdstat_eval", {}).get("calls", 0) <= len(SCRIPTS)


def test_create_batch_is_atomic_and_refuses_a_mismatched_resubmission(redis_url):
    store = _store(redis_url)
    assert store.create_batch("b1", config={"a": 1}, config_hash="h", model="m", queue=Q,
                              sink="redis", owner="key1")
    before = store.batch("b1")
    assert before["owner"] == "key1" and counts(before)["total"] == 0
    assert store.r.zscore(BATCHES_KEY, "b1") and store.r.zscore(owner_batches_key("key1"), "b1")
    for field, kw in (("config", {"config_hash": "h2"}), ("model", {"model": "m2"}),
                      ("sink", {"sink": "s3://x/y"})):
        args = dict(config={"a": 1}, config_hash="h", model="m", queue=Q, sink="redis")
        args.update(kw)
        with pytest.raises(BatchMismatch, match=field):
            store.create_batch("b1", **args)
    assert store.batch("b1") == before  # nothing written
    assert not store.create_batch("b1", config={"a": 1}, config_hash="h", model="m", queue=Q,
                                  sink="redis")  # same work: reopened


def test_register_dedupes_counts_and_notes_the_chunk_unpublished(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    err = {"stage": "submit", "type": "MalformedLine", "message": "x"}
    codes, chunk = store.register_jobs(b, [("j1", "r1", None), ("j2", "r2", None), ("j1", "r1", None),
                                           ("j3", "line:3", err)], queue=Q)
    assert codes == [1, 1, 0, 3]
    c = counts(store.batch(b))
    assert (c["total"], c["queued"], c["failed"]) == (3, 2, 1)
    assert int(store.r.get(queue_queued_key(Q))) == 2
    assert chunk.jobs == (("j1", "r1"), ("j2", "r2")) and chunk.queue == Q
    assert store.r.zscore(UNPUBLISHED_KEY, chunk.member) is not None
    store.published(chunk.member)
    assert store.r.zcard(UNPUBLISHED_KEY) == 0
    # A resubmission publishes again what is not final, and counts nothing twice.
    codes, again = store.register_jobs(b, [("j1", "r1", None), ("j3", "line:3", err)], queue=Q)
    assert codes == [2, 0] and again.jobs == (("j1", "r1"),)
    assert counts(store.batch(b))["total"] == 3
    assert json.loads(store.job(b, "j3")["error"]) == err


def test_claim_runs_with_a_token_and_a_lease_and_skips_busy_and_final_jobs(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    store.register_jobs(b, [("j1", "r1", None), ("j2", "r2", None)], queue=Q)
    store.r.set(record_index_key("j2"), json.dumps({"sink": "redis", "location": "redis://x"}))
    c = store.claim(b, ["j1", "j2", "nope"], token="t1", lease_seconds=60, max_attempts=3, queue=Q)
    assert c.codes["j1"] == ("run", "") and c.codes["nope"][0] == "missing"
    assert json.loads(c.codes["j2"][1])["location"] == "redis://x"  # the record index entry
    assert store.r.zscore(LEASES_KEY, c.lease) is not None
    st = counts(store.batch(b))
    assert (st["queued"], st["running"]) == (0, 2) and int(store.r.get(queue_queued_key(Q))) == 0
    # A duplicate message while the lease is live: nobody runs it twice.
    c2 = store.claim(b, ["j1"], token="t2", lease_seconds=60, max_attempts=3, queue=Q)
    assert c2.codes["j1"][0] == "busy" and not c2.lease
    f = store.finish(b, [Outcome("j1", "done", "redis://l1"), Outcome("j2", "done", "redis://x")],
                     token="t1", lease=c.lease, max_attempts=3, queue=Q, sink="redis")
    assert f.codes == {"j1": "ok", "j2": "ok"} and store.r.zcard(LEASES_KEY) == 0
    assert store.claim(b, ["j1"], token="t3", lease_seconds=60, max_attempts=3,
                       queue=Q).codes["j1"][0] == "final"
    assert json.loads(store.r.get(record_index_key("j1")))["location"] == "redis://l1"
    assert 0 < store.r.ttl(record_index_key("j1")) <= 3600  # the record index expires too


def test_finish_applies_only_with_the_current_token(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    store.register_jobs(b, [("j1", "r1", None)], queue=Q)
    old = store.claim(b, ["j1"], token="old", lease_seconds=-1, max_attempts=3, queue=Q)
    # The old run's lease ran out; the job is claimed again (quarantine lane) with a new token.
    new = store.claim(b, ["j1"], token="new", lease_seconds=60, max_attempts=3, queue=Q,
                      quarantine=True)
    assert new.codes["j1"][0] == "run"
    stale = store.finish(b, [Outcome("j1", "done", "redis://old")], token="old", lease=old.lease,
                         max_attempts=3, queue=Q, sink="redis")
    assert stale.codes == {"j1": "stale"}
    assert counts(store.batch(b))["stale_results"] == 1 and store.job(b, "j1")["state"] == "running"
    ok = store.finish(b, [Outcome("j1", "done", "redis://new")], token="new", lease=new.lease,
                      max_attempts=3, queue=Q, sink="redis")
    assert ok.codes == {"j1": "ok"} and store.job(b, "j1")["location"] == "redis://new"
    assert counts(store.batch(b))["done"] == 1


def test_a_lost_run_is_quarantined_uncharged_and_only_a_lone_loss_is_charged(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    store.register_jobs(b, [("j1", "r1", None), ("j2", "r2", None)], queue=Q)
    store.claim(b, ["j1", "j2"], token="t1", lease_seconds=-1, max_attempts=2, queue=Q)
    # The chunk's message comes back (the worker died): both jobs go to the quarantine lane.
    c = store.claim(b, ["j1", "j2"], token="t2", lease_seconds=60, max_attempts=2, queue=Q)
    assert [c.codes[j][0] for j in ("j1", "j2")] == ["quarantined", "quarantined"]
    q = Chunk.parse(c.quarantine)
    assert q.queue == Q + ".quarantine" and [j for j, _ in q.jobs] == ["j1", "j2"]
    assert store.job(b, "j1")["attempts"] == "0"  # nobody charged for a loss in a shared run
    # In the normal lane a quarantined job waits for its quarantine message.
    assert store.claim(b, ["j1"], token="t3", lease_seconds=60, max_attempts=2,
                       queue=Q).codes["j1"][0] == "skip"
    # Alone in the quarantine lane j1 dies twice: charged each time, then dead-lettered.
    for token in ("q1", "q2"):
        assert store.claim(b, ["j1"], token=token, lease_seconds=-1, max_attempts=2, queue=Q,
                           quarantine=True).codes["j1"][0] == "run"
    dead = store.claim(b, ["j1"], token="q3", lease_seconds=60, max_attempts=2, queue=Q,
                       quarantine=True)
    assert dead.codes["j1"][0] == "dead"
    entry = json.loads(store.r.lindex(DEAD_LETTER_KEY, 0))
    assert entry["job_id"] == "j1" and entry["attempts"] == 2 and entry["error"]["type"] == "WorkerLost"
    # j2 runs alone fine: done, never charged.
    r = store.claim(b, ["j2"], token="q4", lease_seconds=60, max_attempts=2, queue=Q, quarantine=True)
    store.finish(b, [Outcome("j2", "done", "redis://2")], token="q4", lease=r.lease, max_attempts=2,
                 queue=Q, sink="redis")
    assert store.job(b, "j2")["attempts"] == "0"
    st = counts(store.batch(b))
    assert (st["done"], st["failed"], st["dead_lettered"], st["running"], st["queued"]) == (1, 1, 1, 0, 0)


def test_retry_charges_an_attempt_requeue_does_not_and_both_are_noted_unpublished(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    store.register_jobs(b, [("j1", "r1", None), ("j2", "r2", None)], queue=Q)
    err = {"stage": "engine", "type": "BackendError", "message": "down"}
    for attempt in (1, 2):
        c = store.claim(b, ["j1", "j2"], token=f"t{attempt}", lease_seconds=60, max_attempts=2, queue=Q)
        assert c.runnable() == ["j1", "j2"]
        f = store.finish(b, [Outcome("j1", "retry", error=err), Outcome("j2", "requeue", error=err)],
                         token=f"t{attempt}", lease=c.lease, max_attempts=2, queue=Q, sink="redis",
                         retry_in=5)
        due = store.r.zscore(UNPUBLISHED_KEY, f.retry) if f.retry else None
        if attempt == 1:
            assert f.codes == {"j1": "ok", "j2": "ok"} and due > time.time() + 3
            store.published(f.retry)
    assert f.codes == {"j1": "dead", "j2": "ok"}
    assert [j for j, _ in Chunk.parse(f.retry).jobs] == ["j2"]
    assert store.job(b, "j1")["state"] == "failed" and store.job(b, "j2")["attempts"] == "0"
    assert json.loads(store.r.lindex(DEAD_LETTER_KEY, 0))["error"] == err


def test_close_and_finish_write_the_completion_event_and_the_retention(redis_url):
    store = _store(redis_url, retention=100)
    b = _batch(store, webhook="http://h/x", webhook_jobs=True)
    store.register_jobs(b, [("j1", "r1", None)], queue=Q)
    assert store.close(b).result == "ok"
    c = store.claim(b, ["j1"], token="t", lease_seconds=60, max_attempts=3, queue=Q)
    f = store.finish(b, [Outcome("j1", "done", "redis://1")], token="t", lease=c.lease,
                     max_attempts=3, queue=Q, sink="redis")
    assert f.completed
    events = _outbox(store)
    assert [e["type"] for e in events] == ["job.completed", "batch.completed"]
    assert len({e["id"] for e in events}) == 2
    assert store.r.zscore(FINISHED_KEY, b) is not None
    for key in (batch_key(b), job_states_key(b)):
        assert 0 < store.r.ttl(key) <= 100
    # Reopened by a resubmission: the keys are kept again, and a second completion is a new event.
    assert not store.create_batch(b, config={"a": 1}, config_hash="h", model="m", queue=Q, sink="redis")
    assert store.r.ttl(batch_key(b)) == -1 and store.r.zscore(FINISHED_KEY, b) is None
    assert store.close(b).completed
    ids = [e["id"] for e in _outbox(store) if e["type"] == "batch.completed"]
    assert len(ids) == 2 and ids[0] != ids[1]


def test_cancel_counts_queued_jobs_and_finishes_the_batch(redis_url):
    store = _store(redis_url)
    b = _batch(store, webhook="http://h/x")
    store.register_jobs(b, [("j1", "r1", None), ("j2", "r2", None)], queue=Q)
    c = store.claim(b, ["j1"], token="t", lease_seconds=60, max_attempts=3, queue=Q)
    assert store.cancel_jobs(b, ["j1", "j2"]) == 1
    assert not store.close(b).completed  # j1 still running
    assert int(store.r.get(queue_queued_key(Q))) == 0
    f = store.finish(b, [Outcome("j1", "done", "redis://1")], token="t", lease=c.lease, max_attempts=3,
                     queue=Q, sink="redis")
    assert f.completed
    st = counts(store.batch(b))
    assert (st["done"], st["cancelled"]) == (1, 1)
    assert [e["type"] for e in _outbox(store)] == ["batch.completed"]


def test_expire_lease_requeues_into_quarantine_and_charges_a_lone_loss(redis_url):
    store = _store(redis_url)
    b = _batch(store)
    store.register_jobs(b, [("j1", "r1", None), ("j2", "r2", None)], queue=Q)
    c = store.claim(b, ["j1", "j2"], token="t", lease_seconds=-1, max_attempts=1, queue=Q)
    reply, chunk = store.expire_lease(c.lease, max_attempts=1)
    assert reply is LeaseReply.EXPIRED
    assert chunk.queue == Q + ".quarantine" and len(chunk.jobs) == 2
    assert store.r.zcard(LEASES_KEY) == 0
    assert store.job(b, "j1")["attempts"] == "0"
    q = store.claim(b, ["j1"], token="q", lease_seconds=-1, max_attempts=1, queue=Q, quarantine=True)
    # charged: out of attempts
    assert store.expire_lease(q.lease, max_attempts=1) == (LeaseReply.EXPIRED, None)
    assert store.job(b, "j1")["state"] == "failed"
    assert counts(store.batch(b))["dead_lettered"] == 1


def test_purge_and_expired_index_entries(redis_url):
    store = _store(redis_url, retention=1)
    b = _batch(store, owner="k")
    store.register_jobs(b, [("j1", "r1", None)], queue=Q)
    assert store.close(b).result == "ok"
    assert store.cancel_jobs(b, ["j1"]) == 1  # that finished the batch
    assert store.batch(b)["finished_at"]
    time.sleep(2.1)  # the keys expire with the retention; the index entries are swept
    assert store.batch(b) is None
    assert store.forget_expired() == 1
    assert store.r.zscore(BATCHES_KEY, b) is None and store.r.zcard(owner_batches_key("k")) == 0
    b2 = _batch(_store(redis_url, retention=3600), "b2", owner="k")
    assert store.purge(b2) and store.batch(b2) is None and store.count_batches("k") == 0


def test_a_lost_lone_run_is_charged_whichever_lane_notices(redis_url):
    """A quarantine run that died is charged even when a normal-lane message (a resubmission,
    a republished chunk) reaches the job first."""
    store = _store(redis_url)
    b = _batch(store)
    store.register_jobs(b, [("j1", "r1", None)], queue=Q)
    store.claim(b, ["j1"], token="q1", lease_seconds=-1, max_attempts=2, queue=Q, quarantine=True)
    c = store.claim(b, ["j1"], token="n1", lease_seconds=60, max_attempts=2, queue=Q)
    assert c.codes["j1"][0] == "quarantined" and store.job(b, "j1")["attempts"] == "1"
    store.claim(b, ["j1"], token="q2", lease_seconds=-1, max_attempts=2, queue=Q, quarantine=True)
    c = store.claim(b, ["j1"], token="n2", lease_seconds=60, max_attempts=2, queue=Q)
    assert c.codes["j1"][0] == "dead" and store.job(b, "j1")["state"] == "failed"
    assert counts(store.batch(b))["dead_lettered"] == 1
