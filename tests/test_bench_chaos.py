"""The seeded nemesis runs end to end on a real fleet and finds nothing (one fixed seed, short);
its schedule and its checks, without services, each shown able to fail.

`python -m bench.chaos` starts its own redis-server, SeaweedFS, workers, I/O worker, API and
receiver, injects at least six kinds of fault, and exits 0 only when every invariant holds. Soak
runs (many seeds, longer) are in docs/protocol.md; this keeps one seed in CI under 3 minutes.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.test_bench_smoke import run_bench

SEED = 20261202
LAST_LINE = re.compile(r"^(\d+) faults of (\d+) kinds injected, (\d+) invariant violations$")


@pytest.mark.slow
@pytest.mark.services
def test_nemesis_one_seed_finds_no_violation(tmp_path):
    out = tmp_path / "chaos.json"
    t0 = time.monotonic()
    r = run_bench("bench.chaos", "--seed", str(SEED), "--minutes", "1", "--settle", "40",
                  "--output-json", str(out), timeout=175)
    took = time.monotonic() - t0
    lines = r.stdout.strip().splitlines()
    assert lines, r.stderr[-3000:]
    m = LAST_LINE.match(lines[-1])
    assert m, f"last line: {lines[-1]!r}"
    faults, kinds, violations = map(int, m.groups())
    assert r.returncode == (0 if violations == 0 else 1)
    assert violations == 0 and r.returncode == 0, r.stdout[-6000:]
    assert kinds >= 6 and faults >= kinds
    res = json.loads(out.read_text())
    assert res["violations"] == 0 and res["fault_kinds"] == kinds
    assert sum(res["faults"].values()) == faults
    assert all(c["ok"] for c in res["invariants"]) and len(res["invariants"]) == 7
    assert res["workload"]["by_via"]["cli"] > 0 and res["workload"]["by_via"]["http"] > 0
    assert took < 180, f"the nemesis took {took:.0f} s"


# --- the nemesis's own parts, without services: each check can fail --------------------------


def _run(batch_id: str, images: list[str]):
    from bench.chaos.workload import BatchRun

    run = BatchRun(batch_id, "cli", "plain", images)
    run.asked.update(images)
    run.confirmed.update(images)
    return run


def test_schedule_is_drawn_from_the_seed_alone_and_covers_every_kind():
    import random

    from bench.chaos.faults import KINDS, draw_schedule

    a = draw_schedule(random.Random(5), 120, 3, KINDS)
    b = draw_schedule(random.Random(5), 120, 3, KINDS)
    c = draw_schedule(random.Random(6), 120, 3, KINDS)
    assert a == b and a != c
    assert {f.kind for f in a} == set(KINDS)
    assert all(0 <= f.at <= 0.8 * 120 for f in a)
    from bench.chaos.faults import _lasts

    short = draw_schedule(random.Random(5), 60, 3, KINDS)  # every fault heals within the phase
    assert {f.kind for f in short} == set(KINDS) and all(f.at + _lasts(f) <= 60 for f in short)
    pause = [f for f in a if f.kind == "worker_pause"]
    from bench.chaos.fleet import LEASE_SECONDS

    assert pause and all(f.seconds > LEASE_SECONDS for f in pause)


def test_final_state_check_finds_a_job_in_flight_a_missing_image_and_a_stranger():
    from bench.chaos.invariants import one_final_state

    run = _run("b1", ["x.png", "y.png"])
    states = {"b1": {"j1": {"s": "done", "r": "x.png"}, "j2": {"s": "running", "r": "z.png"}}}
    c = one_final_state([run], {"b1": set(run.confirmed)}, states, {"b1": {"total": "2"}},
                        {("b1", "j2"): ["lease (+3 s)"]})
    text = "\n".join(c.violations)
    assert "y.png submitted but has no job" in text
    assert "b1/j2: still running" in text and "lease (+3 s)" in text
    assert "z.png was never submitted" in text
    ok = one_final_state([_run("b1", ["x.png"])], {"b1": {"x.png"}},
                         {"b1": {"j1": {"s": "done", "r": "x.png"}}}, {"b1": {"total": "1"}}, {})
    assert ok.ok and ok.checked == 1
    # acknowledged just before a kill -9 of Redis (AOF fsynced every second): noted, not a violation
    maybe = one_final_state([_run("b1", ["x.png", "y.png"])], {"b1": {"x.png"}},
                            {"b1": {"j1": {"s": "done", "r": "x.png"}}}, {"b1": {"total": "1"}}, {})
    assert maybe.ok and "1 image(s) acknowledged" in maybe.notes[0]


def test_counter_and_dead_letter_checks_compare_with_the_job_states():
    from bench.chaos.invariants import counters, dead_letters

    states = {"b1": {"j1": {"s": "done"}, "j2": {"s": "failed"}, "j3": {"s": "queued"}}}
    batch = {"total": "3", "done": "1", "failed": "1", "queued": "1", "dead_lettered": "1"}
    dead = [{"batch_id": "b1", "job_id": "j2", "ref": "p.png"}]
    assert counters(dead, 1, states, {"b1": batch}, "scalecap.gpu.m").ok
    bad = counters(dead, 0, states, {"b1": {**batch, "done": "2"}}, "scalecap.gpu.m")
    assert len(bad.violations) == 2  # done drifted; the queue's queued counter too
    assert dead_letters(dead, {"p.png"}).ok
    assert not dead_letters(dead, {"other.png"}).ok


def test_event_check_wants_one_id_per_completion_accepted_at_least_once():
    from bench.chaos.invariants import events
    from bench.chaos.receiver import Delivery

    states = {"b1": {"j1": {"s": "done"}, "j2": {"s": "cancelled"}}}
    batch = {"b1": {"webhook": "http://x/hook", "webhook_jobs": "1", "finished_at": "1", "completions": "1"}}

    def d(eid, kind, job=None, status=200, verified=True):
        return Delivery(eid, kind, "b1", job, verified, status, 0.0)

    good = [d("e1", "job.completed", "j1", 503), d("e1", "job.completed", "j1"),
            d("e2", "job.completed", "j2"), d("e3", "batch.completed")]
    assert events(states, batch, good).ok
    twice = [*good, d("e9", "job.completed", "j1")]
    assert "2 different job.completed event ids" in events(states, batch, twice).violations[0]
    never = [d("e1", "job.completed", "j1", 500), *good[2:]]
    assert "never accepted" in events(states, batch, never).violations[0]
    forged = [*good, d("e1", "job.completed", "j1", verified=False)]
    assert "failed signature verification" in events(states, batch, forged).violations[0]


@pytest.mark.services
def test_record_check_finds_another_runs_record_and_a_late_rewrite(s3_server, s3_bucket):
    """Against a real S3: the record at a job's location must be the credited run's (the token
    in a fenced record's name, or the job's) and unchanged since the job was final."""
    import time as _time

    from bench.chaos.invariants import credited_record

    s3 = s3_server.client()

    def put(key: str, attempt: str, image: str = "x.png") -> str:
        body = json.dumps({"image": image, "scalecap_record": {"meta": {"job_id": "j1", "attempt": attempt}}})
        s3.put_object(Bucket=s3_bucket, Key=key, Body=body.encode())
        return f"s3://{s3_bucket}/{key}"

    now = _time.time()
    good = put("o/b1/j1.tokA.json", "tokA")
    assert credited_record(s3, {"b1": {"j1": {"s": "done", "r": "x.png", "l": good, "u": now + 5}}}).ok
    other = put("o/b1/j1.tokB.json", "tokA")  # the batch credits tokB; the object is tokA's
    bad = credited_record(s3, {"b1": {"j1": {"s": "done", "r": "x.png", "l": other, "u": now + 5}}})
    assert "written by run tokA, the batch credits run tokB" in bad.violations[0]
    late = credited_record(s3, {"b1": {"j1": {"s": "done", "r": "x.png", "l": good, "u": now - 60}}})
    assert "after the job was final" in late.violations[0]
    wrong = put("o/b1/j1.json", "", image="y.png")
    assert "is of image y.png" in credited_record(
        s3, {"b1": {"j1": {"s": "done", "r": "x.png", "l": wrong, "u": now + 5}}}).violations[0]
