"""Protocol v3 at the script level, against a real redis-server (issue 13, items 1, 3, 4, 5, 8).

One clock (deadlines from Redis' TIME), calls resent after a lost reply, live leases, jobs whose
message vanished (the audit), a resubmit to the lane a job is in, a sink outage that never
dead-letters, exact record locations, and `purge` of an unfinished batch.
"""

from __future__ import annotations

import json

import pytest

from scalecap.fleet.audit import SUSPECTS_KEY, Auditor
from scalecap.fleet.outcomes import FinishCode, LeaseReply, RunOutcome
from scalecap.fleet.protocol import (
    LEASES_KEY,
    UNPUBLISHED_KEY,
    BatchStore,
    Chunk,
    Outcome,
    batch_key,
    counts,
    queue_queued_key,
    reply_key,
)
from scalecap.fleet.reconcile import Reconciler, publish_chunk
from scalecap.settings import Settings

pytestmark = pytest.mark.services

Q = "scalecap.gpu.m"
CLAIM = dict(lease_seconds=60, max_attempts=3, queue=Q)
FIN = dict(max_attempts=3, queue=Q, sink="redis")


def _store(redis_url: str) -> BatchStore:
    import redis

    return BatchStore(redis.Redis.from_url(redis_url), retention=3600)


def _batch(store: BatchStore, n: int, bid: str = "b") -> list[str]:
    store.create_batch(bid, config={}, config_hash="h", model="m", queue=Q, sink="redis")
    ids = [f"j{i}" for i in range(n)]
    _, chunk = store.register_jobs(bid, [(j, f"/x/{j}.png", None) for j in ids], queue=Q)
    store.published(chunk.member)
    return ids


def test_deadlines_come_from_redis_time_not_the_caller(redis_url):
    store = _store(redis_url)
    _batch(store, 1)
    c = store.claim("b", ["j0"], token="t", **CLAIM)
    due = store.r.zscore(LEASES_KEY, c.lease)
    assert abs(due - (store.now() + 60)) < 2  # Redis' clock + the lease, whatever ours says
    assert abs(float(store.job("b", "j0")["updated_at"]) - store.now()) < 2
    # A reconciler whose clock runs an hour ahead would pick this lease; the script, by
    # Redis' clock, refuses to take it back.
    assert store.expire_lease(c.lease, max_attempts=3) == (LeaseReply.LIVE, None)
    assert store.job("b", "j0")["state"] == "running"
    # Retries are due by Redis' clock too.
    f = store.finish("b", [Outcome("j0", RunOutcome.RETRY, error={"type": "E"})], token="t",
                     lease=c.lease, retry_in=30, **FIN)
    assert abs(store.r.zscore(UNPUBLISHED_KEY, f.retry) - (store.now() + 30)) < 2


def test_a_resent_claim_and_finish_answer_as_the_first_did(redis_url):
    store = _store(redis_url)
    _batch(store, 2)
    first = store.claim("b", ["j0", "j1"], token="t", **CLAIM)
    again = store.claim("b", ["j0", "j1"], token="t", **CLAIM)  # redis-py resent it
    assert again == first and first.runnable() == ["j0", "j1"]
    assert store.job("b", "j0")["runs"] == "1" and counts(store.batch("b"))["running"] == 2
    outs = [Outcome("j0", RunOutcome.DONE, "redis://l0"), Outcome("j1", RunOutcome.DONE, "redis://l1")]
    f1 = store.finish("b", outs, token="t", lease=first.lease, **FIN)
    f2 = store.finish("b", outs, token="t", lease=first.lease, **FIN)
    assert f2 == f1 and set(f1.codes.values()) == {FinishCode.OK} and f1.completed is False
    c = counts(store.batch("b"))
    assert (c["done"], c["stale_results"]) == (2, 0)
    assert 0 < store.r.ttl(reply_key("t:claim")) <= 120  # kept briefly, then gone
    # Another run's finish is still stale: only the run whose finish applied is recognised.
    assert store.finish("b", outs, token="other", lease="x", **FIN).codes["j0"] is FinishCode.STALE


def test_a_live_lease_is_renewed_and_a_lost_one_says_so(redis_url):
    store = _store(redis_url)
    _batch(store, 2)
    c = store.claim("b", ["j0", "j1"], token="t", lease_seconds=-1, max_attempts=3, queue=Q)
    assert store.renew_lease(c.lease, 60) is LeaseReply.HELD  # not yet taken back: still ours
    assert store.r.zscore(LEASES_KEY, c.lease) > store.now() + 50
    assert store.expire_lease(c.lease, max_attempts=3)[0] is LeaseReply.LIVE
    store.renew_lease(c.lease, -1)
    reply, chunk = store.expire_lease(c.lease, max_attempts=3)
    assert reply is LeaseReply.EXPIRED and chunk.quarantine
    assert store.renew_lease(c.lease, 60) is LeaseReply.LOST  # the run must stop, write nothing
    assert store.r.zcard(LEASES_KEY) == 0


def test_a_sink_outage_requeues_without_charge_and_never_dead_letters(redis_url):
    store = _store(redis_url)
    _batch(store, 1)
    for i in range(20):  # far past v2's cap of 5 x max attempts runs
        c = store.claim("b", ["j0"], token=f"t{i}", **CLAIM)
        assert c.runnable() == ["j0"], c
        f = store.finish("b", [Outcome("j0", RunOutcome.REQUEUE, error={"type": "SinkError"})],
                         token=f"t{i}", lease=c.lease, **FIN)
        assert f.codes["j0"] is FinishCode.OK
    job = store.job("b", "j0")
    assert (job["state"], job["attempts"], job["runs"]) == ("queued", "0", "20")
    assert counts(store.batch("b"))["dead_lettered"] == 0


def test_a_finish_after_purge_writes_nothing(redis_url):
    store = _store(redis_url)
    _batch(store, 1)
    c = store.claim("b", ["j0"], token="t", **CLAIM)
    assert store.purge("b")
    f = store.finish("b", [Outcome("j0", RunOutcome.DONE, "redis://l")], token="t", lease=c.lease, **FIN)
    assert f.result == "missing" and f.codes == {"j0": FinishCode.STALE}
    assert not store.r.exists(batch_key("b")) and store.r.zcard(LEASES_KEY) == 0


def test_a_resubmit_publishes_a_quarantined_job_to_the_quarantine_lane(redis_url):
    store = _store(redis_url)
    _batch(store, 2)
    c = store.claim("b", ["j0", "j1"], token="t", lease_seconds=-1, max_attempts=3, queue=Q)
    _, q = store.expire_lease(c.lease, max_attempts=3)
    store.published(q.member)  # its message went out ... and was lost
    codes, normal = store.register_jobs("b", [("j0", "/x/j0.png", None)], queue=Q)
    assert codes == [2] and normal is None  # nothing for the normal lane, where it would be skipped
    [member] = store.r.zrangebyscore(UNPUBLISHED_KEY, 0, 0)
    assert Chunk.parse(member).queue == Q + ".quarantine"  # due at once for the reconciler


def test_the_audit_restores_jobs_whose_message_vanished_in_both_lanes(redis_url):
    """Messages deleted from the broker: the first audit suspects the jobs, the second (no
    script touched them meanwhile) publishes each to the lane it is in."""
    from producer.client import FleetClient

    client = FleetClient(Settings(broker_url=redis_url, chunk_size=2))
    sub = client.submit([f"/x/{i}.png" for i in range(6)], sink="redis", model="m", queue=Q)
    store = client.store
    ids = [j["job_id"] for j in client.jobs(sub.batch_id)]
    c = store.claim(sub.batch_id, ids[:2], token="dead", lease_seconds=-1, max_attempts=3, queue=Q)
    _, q = store.expire_lease(c.lease, max_attempts=3)
    publish_chunk(client.app, q, 2)
    store.published(q.member)
    auditor = Auditor(store.r, lambda chunk: publish_chunk(client.app, chunk, 2))
    assert auditor.audit().unreachable == []  # every job has its message
    store.r.delete(Q, Q + ".quarantine")  # a pop-then-crash, an AOF that lost its last second
    look = auditor.audit(restore=False)
    assert sorted(look.unreachable) == sorted((sub.batch_id, j) for j in ids)
    assert not store.r.exists(SUSPECTS_KEY)  # a look changes nothing
    first = auditor.audit()
    assert (first.suspects, first.restored) == (6, 0)
    second = auditor.audit()
    assert second.restored == 6 and auditor.audit(restore=False).unreachable == []

    def lane(name: str) -> set[str]:
        from tests.test_fleet_maintenance import _bodies

        return {j for m in _bodies(store.r, name) for j, _ in m["jobs"]}

    assert lane(Q + ".quarantine") == set(ids[:2]) and lane(Q) == set(ids[2:])
    assert store.r.zcard(UNPUBLISHED_KEY) == 0


def test_reconcile_takes_back_no_lease_that_redis_says_is_live(redis_url):
    from scalecap.fleet.app import create_app

    store = _store(redis_url)
    _batch(store, 1)
    store.claim("b", ["j0"], token="t", **CLAIM)
    settings = Settings(broker_url=redis_url)
    rec = Reconciler(create_app(settings), store, settings)
    store.now = lambda: 10 ** 10  # this reconciler's reading of the clock runs far ahead
    rep = rec.reconcile(audit=False)
    assert (rep.live_leases, rep.expired_leases) == (1, 0)
    assert store.job("b", "j0")["state"] == "running"


def test_reuse_compares_exact_batch_ids():
    from scalecap.fleet.sinks import RedisSink, S3Sink

    r = RedisSink(None, 60)
    assert r.batch_of("redis://scalecap:result:b1:j:t") == "b1"
    assert r.batch_of("redis://scalecap:result:result:j:t") == "result"
    assert r.batch_of("redis://scalecap:result:b1:j:t") != "result"  # v2's substring matched
    s3 = S3Sink("s3://bk/p/q", client=None)
    assert s3.batch_of("s3://bk/p/q/b1/j.t.json") == "b1"
    assert s3.batch_of("s3://bk/p/q/x/b1/j.json") is None and s3.batch_of("s3://other/p/q/b1/j") is None


def test_purge_refuses_an_unfinished_batch_unless_forced(redis_url, capsys):
    from producer.cli import main
    from producer.client import FleetClient

    client = FleetClient(Settings(broker_url=redis_url))
    sub = client.submit([f"/x/{i}.png" for i in range(5)], sink="redis", model="m", queue=Q)
    assert int(client.redis.get(queue_queued_key(Q))) == 5
    assert main(["purge", sub.batch_id, "--broker-url", redis_url]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has not finished" in err[0] and "--force" in err[0]
    assert client.status(sub.batch_id)["queued"] == 5  # nothing changed
    assert main(["purge", sub.batch_id, "--force", "--broker-url", redis_url]) == 0
    assert int(client.redis.get(queue_queued_key(Q))) == 0  # the counters came back
    left = [k for k in client.redis.scan_iter(f"*{sub.batch_id}*")]
    assert left == []
    assert json.loads(capsys.readouterr().out) == {"purged": [sub.batch_id]}


class _ReplyDropper:
    """A TCP proxy in front of redis-server that forwards the first request carrying `marker`,
    swallows Redis' reply to it and cuts the connection: a lost reply, which redis-py answers
    by resending the same command on a new connection."""

    def __init__(self, upstream_port: int, marker: bytes) -> None:
        import socket
        import threading

        self.upstream_port, self.marker, self.seen, self.dropped = upstream_port, marker, 0, False
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            cut = threading.Event()
            threading.Thread(target=self._requests, args=(client, up, cut), daemon=True).start()
            threading.Thread(target=self._replies, args=(up, client, cut), daemon=True).start()

    def _requests(self, client, up, cut) -> None:
        try:
            while data := client.recv(65536):
                if self.marker in data:
                    self.seen += 1
                    if not self.dropped:  # this one's reply is swallowed
                        self.dropped = True
                        cut.set()
                up.sendall(data)
        except OSError:
            pass

    def _replies(self, up, client, cut) -> None:
        try:
            while data := up.recv(65536):
                if cut.is_set():  # Redis ran it; the reply never reaches the client
                    break
                client.sendall(data)
        except OSError:
            pass
        for s in (client, up):
            try:
                s.close()
            except OSError:
                pass


def test_a_claim_resent_after_a_lost_reply_answers_as_the_first(redis_server, redis_url):
    import redis

    db = int(redis_url.rsplit("/", 1)[1])
    store = _store(redis_url)
    _batch(store, 3)
    from scalecap.fleet.scripts import source

    store.r.script_load(source("claim_chunk"))  # so the claim is one EVALSHA, not NOSCRIPT + EVAL
    proxy = _ReplyDropper(redis_server.port, b"lost-reply-token")
    via = BatchStore(redis.Redis(port=proxy.port, db=db), retention=3600)
    c = via.claim("b", ["j0", "j1", "j2"], token="lost-reply-token", **CLAIM)
    assert proxy.dropped and proxy.seen == 2, "the claim was not resent"
    assert c.runnable() == ["j0", "j1", "j2"]  # v2 answered busy: the resend saw its own token
    assert [store.job("b", j)["runs"] for j in ("j0", "j1", "j2")] == ["1", "1", "1"]
    assert counts(store.batch("b"))["running"] == 3 and store.r.zcard(LEASES_KEY) == 1


def test_the_sink_gate_probes_once_per_period_and_opens_when_the_sink_answers(monkeypatch):
    from workers import sink_gate
    from workers.sink_gate import SinkDown, SinkGate

    clock = [100.0]
    monkeypatch.setattr(sink_gate.time, "monotonic", lambda: clock[0])
    up, probes = [False], []

    def probe(url: str) -> None:
        probes.append(url)
        if not up[0]:
            raise ConnectionError("refused")

    gate = SinkGate(probe)
    gate.check("redis")  # never found down: no probe
    gate.down("redis")
    with pytest.raises(SinkDown):
        gate.check("redis")  # the first probe is not due yet
    assert probes == []
    clock[0] += 1.0
    with pytest.raises(SinkDown) as down:
        gate.check("redis")  # due: probed, still down, backoff doubles
    assert probes == ["redis"] and down.value.delay == 2.0
    clock[0] += 1.0
    with pytest.raises(SinkDown):
        gate.check("redis")
    assert probes == ["redis"]  # not due again yet
    up[0], clock[0] = True, clock[0] + 1.0
    gate.check("redis")  # answers: open
    assert not gate.is_down("redis") and probes == ["redis", "redis"]
