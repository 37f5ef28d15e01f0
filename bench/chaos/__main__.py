"""`python -m bench.chaos --seed S --minutes M`: a real fleet under a seeded nemesis.

For M minutes, batches arrive over the CLI and the HTTP API (some resubmitted by two producers
at once, some cancelled, some with an image poisoned on purpose) while faults drawn from the
seed hit the fleet: workers killed or frozen past their lease, Redis killed and restarted from
its append-only file, connections and replies dropped, S3 and the webhook receiver down, clocks
an hour ahead, task messages deleted, extra drainers. Then everything heals, the nemesis waits
until no job is in flight (or `--settle` seconds pass) and checks the invariants. The last line
reads `F faults of K kinds injected, V invariant violations`; the exit code is 0 iff V == 0.

    python -m bench.chaos --seed 1 --minutes 2
    for s in $(seq 1 20); do python -m bench.chaos --seed $s --minutes 10 || break; done
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.chaos import invariants
from bench.chaos.faults import Nemesis, available_kinds, draw_schedule
from bench.chaos.fleet import ChaosFleet, faketime_available
from bench.chaos.report import print_report
from bench.chaos.workload import Workload
from bench.report import write_json


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=1, help="draws the fault schedule and the workload")
    p.add_argument("--minutes", type=float, default=2.0, help="length of the fault phase")
    p.add_argument("--workers", type=int, default=3, help="scripted GPU workers (at least 3)")
    p.add_argument("--batch-every", type=float, default=6.0, help="mean seconds between two new batches")
    p.add_argument("--settle", type=float, default=90.0,
                   help="seconds to wait, once healed, for no job in flight and no event waiting")
    p.add_argument("--keep", action="store_true",
                   help="keep the run's folder (logs, data) even when it passes")
    p.add_argument("--output-json", default=None)


class Clock:
    """Progress lines, each with the seconds since the run started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def say(self, msg: str) -> None:
        with self._lock:
            print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)


def settle(fleet: ChaosFleet, batch_ids: list[str], seconds: float, say: Any) -> tuple[bool, str, float]:
    """Wait until the fleet is quiet; (quiet, what is still going on, seconds waited)."""
    t0 = time.monotonic()
    last_said = 0.0
    state = "not read yet"
    r = fleet.redis_client()
    try:
        while True:
            waited = time.monotonic() - t0
            try:
                ok, state = invariants.quiet(r, batch_ids)
            except Exception as exc:  # Redis was restarting
                ok, state = False, f"{type(exc).__name__}: {exc}"
            if ok:
                time.sleep(1.0)  # deliveries answered just now are recorded
                return True, state, round(waited, 1)
            if waited >= seconds:
                return False, state, round(waited, 1)
            if waited - last_said >= 10:
                say(f"settling: {state}")
                last_said = waited
            time.sleep(0.5)
    finally:
        r.close()


def progress(fleet: ChaosFleet, workload: Workload, stop: threading.Event, say: Any,
             every: float = 15.0) -> None:
    """A line every `every` seconds: how far the batches are (Redis may be down just then)."""
    r = fleet.redis_client()
    while not stop.wait(every):
        try:
            states = [j.get("s") for b in list(workload.batches)
                      for j in invariants.job_states(r, b.batch_id).values()]
            n = {s: states.count(s) for s in ("done", "failed", "cancelled", "queued", "running")}
            say(f"progress: {len(workload.batches)} batches, {len(states)} jobs: " +
                ", ".join(f"{v} {k}" for k, v in n.items()))
        except Exception as exc:
            say(f"progress: Redis unreachable ({type(exc).__name__})")
    r.close()


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.workers < 3:
        raise SystemExit("--workers must be at least 3")
    if args.minutes <= 0:
        raise SystemExit("--minutes must be > 0")
    clock = Clock()
    say = clock.say
    phase = args.minutes * 60.0
    kinds = available_kinds()
    schedule = draw_schedule(random.Random(args.seed), phase, args.workers, kinds)
    rng = random.Random(args.seed * 1_000_003 + 17)  # the workload's own stream
    if not faketime_available():
        say("faketime not found (apt-get install -y faketime): clock skew faults left out")
    drawn = len({f.kind for f in schedule})
    say(f"seed {args.seed}: {len(schedule)} faults of {drawn} kinds over {phase:.0f} s: "
        + ", ".join(f"{f.at:.0f}s {f.kind}" for f in schedule))
    tmp = Path(tempfile.mkdtemp(prefix=f"scalecap-chaos-{args.seed}-"))
    fleet = ChaosFleet(tmp, workers=args.workers, seed=args.seed, log=say)
    result: dict[str, Any] = {}
    try:
        fleet.start()
        nemesis = Nemesis(fleet, schedule, say)
        workload = Workload(fleet, rng, args.seed, say)
        stop = threading.Event()
        runner = threading.Thread(target=nemesis.run, args=(stop,), name="nemesis", daemon=True)
        t_start = time.monotonic()
        runner.start()
        threading.Thread(target=progress, args=(fleet, workload, stop, say), daemon=True).start()
        while time.monotonic() - t_start < 0.85 * phase:  # the last batches still meet faults
            workload.launch()
            time.sleep(args.batch_every * rng.uniform(0.5, 1.5))
        time.sleep(max(0.0, phase - (time.monotonic() - t_start)))
        stop.set()
        say("fault phase over: waiting for the faults in progress to heal")
        runner.join(10)
        nemesis.join(180)
        workload.join(180)
        fleet.heal()
        say("healed; waiting for the fleet to be quiet")
        batch_ids = [b.batch_id for b in workload.batches]
        quiet, state, waited = settle(fleet, batch_ids, args.settle, say)
        say(("quiet" if quiet else "NOT quiet") + f" after {waited} s: {state}")
        if not quiet:
            r = fleet.redis_client()
            try:
                state += "; locks held: " + (", ".join(invariants.held_locks(r)) or "none")
            finally:
                r.close()
            say(f"not quiet: {state}")
            for path in fleet.dump_stacks():
                say(f"stacks: {path}")
        r = fleet.redis_client()
        try:
            checks = invariants.check_all(
                r, fleet.s3_client(), workload.batches,
                {b.batch_id: workload.durable(b, nemesis.redis_kills) for b in workload.batches},
                fleet.receiver.snapshot(),  # type: ignore[union-attr]
                workload.poisoned, "scalecap.gpu.chaos", lambda: time.sleep(3.0))
            stale = sum(int(r.hget(f"scalecap:batch:{b}", "stale_results") or 0) for b in batch_ids)
        finally:
            r.close()
        result = {
            "seed": args.seed,
            "minutes": args.minutes,
            "fault_seconds": round(phase, 1),
            "schedule": [f.to_dict() for f in schedule],
            "kinds_available": list(kinds),
            "faults": dict(nemesis.injected),
            "faults_skipped": dict(nemesis.skipped),
            "faults_injected": sum(nemesis.injected.values()),
            "fault_kinds": len(nemesis.injected),
            "fault_log": nemesis.log,
            "proxy": dict(fleet.proxy.stats.__dict__),
            "workload": workload.summary(),
            "stale_results": stale,
            "quiet": quiet,
            "quiet_state": state,
            "settle_seconds": waited,
            "invariants": [c.to_dict() for c in checks],
            "violations": sum(len(c.violations) for c in checks),
            "deliveries": len(fleet.receiver.snapshot()),  # type: ignore[union-attr]
            "folder": str(tmp),
        }
    finally:
        fleet.close()
    keep = args.keep or result.get("violations", 1) > 0
    if keep:
        say(f"run folder kept: {tmp} (logs/ has every process's log)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.output_json, result)
    print_report(result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    try:
        res = main(parser.parse_args())
    except RuntimeError as exc:  # a service that would not start: its log tail says why
        print(f"bench.chaos: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if res["violations"] == 0 else 1)
