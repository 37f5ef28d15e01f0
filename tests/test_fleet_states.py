"""The one table of job-state moves (scalecap/fleet/outcomes.ALLOWED), driven through the Lua.

Every edge of ALLOWED is made to happen by the scripts against a real Redis, and every move the
scripts make on the way is checked against the table: a script that made a move the table does
not allow, or an edge no script can take, fails here. The script headers are checked too.
"""

from __future__ import annotations

import time

import pytest

from scalecap.fleet.outcomes import ALLOWED, ClaimCode, JobState, RunOutcome, allowed
from scalecap.fleet.protocol import SCRIPTS, BatchStore, Outcome
from scalecap.fleet.scripts import check_header, header

pytestmark = pytest.mark.services

Q = "scalecap.gpu.m"


def test_every_script_header_names_its_keys_argv_and_replies():
    for name in SCRIPTS:
        check_header(name)
        assert header(name).startswith(f"--[[ {name}:")


class Recorder:
    """A BatchStore whose every call notes each job's state before and after."""

    def __init__(self, store: BatchStore, b: str) -> None:
        self.store, self.b = store, b
        self.seen: set[tuple[JobState | None, JobState]] = set()

    def _states(self) -> dict[str, JobState]:
        raw = self.store.r.hgetall(f"scalecap:batch:{self.b}:job")
        return {k.decode(): JobState(self.store.job(self.b, k.decode())["state"]) for k in raw}

    def __call__(self, method: str, *args, **kw):
        before = self._states()
        out = getattr(self.store, method)(self.b, *args, **kw)
        for j, s in self._states().items():
            old = before.get(j)
            if old != s:
                assert allowed(old, s), f"{method} moved {j} {old} -> {s}, not in ALLOWED"
                self.seen.add((old, s))
        return out


def test_every_allowed_edge_is_taken_by_a_script_and_no_other(redis_url):
    import redis

    store = BatchStore(redis.Redis.from_url(redis_url), retention=3600)
    store.create_batch("b", config={}, config_hash="h", model="m", queue=Q, sink="redis")
    rec = Recorder(store, "b")
    claim = dict(lease_seconds=30, max_attempts=3, queue=Q)
    fin = dict(max_attempts=3, queue=Q, sink="redis")
    rec("register_jobs", [(f"j{i}", f"r{i}", None) for i in range(6)] + [("bad", "x", {"type": "E"})],
        queue=Q)                                                          # None -> queued, failed
    c = rec("claim", ["j0", "j1", "j2"], token="t1", **claim)            # queued -> running
    assert c.runnable() == ["j0", "j1", "j2"]
    rec("finish", [Outcome("j0", RunOutcome.DONE, "redis://l0"),        # running -> done
                   Outcome("j1", RunOutcome.FAILED, "redis://l1"),      # running -> failed
                   Outcome("j2", RunOutcome.RETRY, error={"type": "E"})],  # running -> queued
        token="t1", lease=c.lease, **fin)
    rec("cancel_jobs", ["j3"])                                           # queued -> cancelled
    store.r.hdel("scalecap:batch:b", "cancel_requested")
    c = rec("claim", ["j2"], token="t2", lease_seconds=30, max_attempts=1, queue=Q)
    assert c.codes["j2"][0] is ClaimCode.DEAD                            # queued -> failed
    c = rec("claim", ["j4"], token="t3", lease_seconds=0.05, max_attempts=3, queue=Q)
    time.sleep(0.2)
    store.r.hset("scalecap:batch:b", "cancel_requested", "1")
    c = rec("claim", ["j4"], token="t4", **claim)
    assert c.codes["j4"][0] is ClaimCode.CANCELLED                       # running -> cancelled
    edges = {(a, b) for a, bs in ALLOWED.items() for b in bs}
    assert rec.seen == edges, f"never taken: {edges - rec.seen}"
    for final in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
        assert not ALLOWED[final] and final.final
