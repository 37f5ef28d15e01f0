"""The faults, and the schedule that injects them: drawn once from the seed, before the run.

Each fault injects itself, waits, and heals itself (a killed process comes back, a stopped one
continues, a dropped service is started again), on its own thread, so faults overlap. Faults on
one resource (a worker, Redis, S3, the receiver, the proxy) take turns.
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from bench.chaos.fleet import LEASE_SECONDS, ChaosFleet, faketime_available, join_all
from bench.queue_overhead import REPO

SKEW = "+1h"
KINDS = (
    "worker_kill",            # kill -9 of a worker's whole group, restarted after a moment
    "worker_pause",           # SIGSTOP longer than its lease, then SIGCONT
    "redis_kill",             # kill -9 of redis-server, restarted from its AOF, same port and dir
    "proxy_drop_connections",  # every worker connection to Redis cut at once
    "proxy_drop_replies",     # replies lost after Redis ran the command (redis-py resends)
    "s3_down",                # SeaweedFS stopped, started again later
    "receiver_down",          # webhook receiver refuses connections
    "receiver_slow",          # webhook receiver answers after the sender's timeout
    "receiver_5xx",           # webhook receiver answers 500/502/503
    "clock_skew_worker",      # a worker an hour ahead (libfaketime) joins for a while
    "clock_skew_reconcile",   # `scalecap reconcile` passes an hour ahead
    "broker_delete",          # DEL of the model's task lists (both lanes)
    "second_drainer",         # extra outbox drainers and reconcile passes at the same time
)
NEEDS_FAKETIME = frozenset({"clock_skew_worker", "clock_skew_reconcile"})


@dataclass(frozen=True)
class Fault:
    at: float
    """Seconds after the fault phase starts."""
    kind: str
    seconds: float
    """How long the fault lasts before it heals."""
    target: int = 0
    """Which worker (worker faults)."""
    level: float = 0.0
    """Reply drop probability, number of cuts, of passes..."""

    def to_dict(self) -> dict[str, Any]:
        return {"at": round(self.at, 1), "kind": self.kind, "seconds": round(self.seconds, 1),
                "target": self.target, "level": round(self.level, 3)}


def draw_schedule(rng: random.Random, seconds: float, workers: int, kinds: tuple[str, ...]) -> list[Fault]:
    """Every kind at least once (when the run is long enough), then more drawn at random."""
    last = max(5.0, 0.8 * seconds)
    n = max(len(kinds), int(seconds / 6))
    order = list(kinds)
    rng.shuffle(order)
    order += [rng.choice(kinds) for _ in range(n - len(order))]
    faults = []
    for i, kind in enumerate(order):
        # The first pass spreads one of each kind evenly; extras land anywhere.
        at = (i + rng.random()) * last / len(kinds) if i < len(kinds) else rng.uniform(3.0, last)
        f = _draw(rng, kind, min(at, last), workers)
        # A fault (and its healing) ends within the phase where it can: the run stays bounded.
        faults.append(replace(f, at=max(1.0, min(f.at, seconds - _lasts(f)))))
    return sorted(faults, key=lambda f: f.at)


SLOW_HEAL = {"worker_kill": 15.0, "s3_down": 12.0, "redis_kill": 3.0, "clock_skew_worker": 30.0}
"""Seconds a fault's healing may take beyond its own length (a worker starting on a loaded
machine, SeaweedFS stopping and answering again, a skewed worker starting and shutting down)."""


def _lasts(f: Fault) -> float:
    if f.kind == "clock_skew_reconcile":
        return f.seconds + 10.0 * f.level  # each skewed pass starts a process
    return f.seconds + SLOW_HEAL.get(f.kind, 0.0)


def _draw(rng: random.Random, kind: str, at: float, workers: int) -> Fault:
    target = rng.randrange(workers)
    if kind == "worker_kill":
        return Fault(at, kind, rng.uniform(1.0, 4.0), target)
    if kind == "worker_pause":
        return Fault(at, kind, LEASE_SECONDS + rng.uniform(2.0, 6.0), target)
    if kind == "redis_kill":
        return Fault(at, kind, rng.uniform(1.0, 4.0))
    if kind == "proxy_drop_connections":
        return Fault(at, kind, rng.uniform(1.0, 4.0), level=rng.randint(1, 3))
    if kind == "proxy_drop_replies":
        return Fault(at, kind, rng.uniform(3.0, 8.0), level=rng.uniform(0.05, 0.25))
    if kind == "s3_down":
        return Fault(at, kind, rng.uniform(4.0, 15.0))
    if kind.startswith("receiver_"):
        return Fault(at, kind, rng.uniform(3.0, 12.0))
    if kind == "clock_skew_worker":
        return Fault(at, kind, rng.uniform(10.0, 20.0))
    if kind == "clock_skew_reconcile":
        return Fault(at, kind, rng.uniform(2.0, 6.0), level=rng.randint(1, 2))
    if kind == "broker_delete":
        return Fault(at, kind, 0.0, level=rng.choice((0, 1, 2)))  # normal lane, quarantine, both
    if kind == "second_drainer":
        return Fault(at, kind, rng.uniform(3.0, 8.0), level=2)
    raise ValueError(f"unknown fault kind {kind!r}")


@dataclass
class Nemesis:
    fleet: ChaosFleet
    schedule: list[Fault]
    say: Any
    t0: float = 0.0
    injected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    log: list[dict[str, Any]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    redis_kills: list[float] = field(default_factory=list)
    """monotonic() of each kill -9 of Redis (acknowledged writes just before it may be lost)."""
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def note(self, kind: str, what: str) -> None:
        t = time.monotonic() - self.t0
        with self._guard:
            self.log.append({"t": round(t, 1), "kind": kind, "what": what})
        self.say(f"fault {kind}: {what}")

    def run(self, stop: threading.Event) -> None:
        """Inject the schedule in order (each fault on its own thread) until `stop` is set."""
        self.t0 = time.monotonic()
        for fault in self.schedule:
            if stop.wait(max(0.0, self.t0 + fault.at - time.monotonic())):
                return
            t = threading.Thread(target=self._one, args=(fault,), name=f"fault-{fault.kind}", daemon=True)
            t.start()
            self.threads.append(t)

    def join(self, timeout: float) -> None:
        join_all(self.threads, timeout)

    def _one(self, f: Fault) -> None:
        try:
            if getattr(self, f"_{f.kind}")(f):
                with self._guard:
                    self.injected[f.kind] += 1
            else:
                with self._guard:
                    self.skipped[f.kind] += 1
        except Exception as exc:  # a fault that could not be injected or healed is reported
            self.note(f.kind, f"ERROR {type(exc).__name__}: {exc}")
            with self._guard:
                self.skipped[f.kind] += 1

    # --- workers -------------------------------------------------------------------------

    def _free_worker(self, f: Fault) -> tuple[int, threading.Lock] | None:
        """The drawn worker, or the next one no other fault holds (the drawn one may wait a moment)."""
        n = len(self.fleet.workers)
        for k in range(n):
            i = (f.target + k) % n
            lock = self._lock(f"worker{i}")
            if lock.acquire(timeout=0.5 if k == 0 else 0.01):
                return i, lock
        return None

    def _worker_kill(self, f: Fault) -> bool:
        got = self._free_worker(f)
        if got is None:
            return False
        i, lock = got
        try:
            w = self.fleet.workers[i]
            w.kill()
            self.note(f.kind, f"kill -9 {w.name}; restart in {f.seconds:.1f} s")
            time.sleep(f.seconds)
            w.start()
            self.note(f.kind, f"{w.name} restarted")
            return True
        finally:
            lock.release()

    def _worker_pause(self, f: Fault) -> bool:
        busy = self.fleet.busiest_worker()  # drawn target unless a worker is captioning right now
        got = self._free_worker(f if busy is None else replace(f, target=busy))
        if got is None:
            return False
        i, lock = got
        try:
            w = self.fleet.workers[i]
            if not w.alive:
                return False
            w.signal(signal.SIGSTOP)
            self.note(f.kind, f"SIGSTOP {w.name} for {f.seconds:.1f} s (lease {LEASE_SECONDS:.0f} s)")
            time.sleep(f.seconds)
            w.signal(signal.SIGCONT)
            self.note(f.kind, f"SIGCONT {w.name}")
            return True
        finally:
            lock.release()

    def _clock_skew_worker(self, f: Fault) -> bool:
        with self._lock("skewed-worker"):
            w = self.fleet.worker(f"skew{len(self.log)}", skew=SKEW)
            self.note(f.kind, f"{w.name} joins {SKEW} ahead for {f.seconds:.1f} s")
            w.start()
            time.sleep(f.seconds)
            w.stop(timeout=15)
            self.note(f.kind, f"{w.name} stopped")
            return True

    # --- Redis and the proxy ---------------------------------------------------------------

    def _redis_kill(self, f: Fault) -> bool:
        with self._lock("redis"):
            r = self.fleet.redis
            if r.proc is None:
                return False
            r.proc.kill()
            self.redis_kills.append(time.monotonic())
            r.proc.wait(10)
            self.note(f.kind, f"kill -9 redis-server; restart from its AOF in {f.seconds:.1f} s")
            time.sleep(f.seconds)
            r.start(timeout=60)
            self.note(f.kind, "redis-server restarted from its AOF")
            return True

    def _proxy_drop_connections(self, f: Fault) -> bool:
        with self._lock("proxy"):
            cuts = int(f.level)
            total = 0
            for k in range(cuts):
                total += self.fleet.proxy.drop_connections()
                if k + 1 < cuts:
                    time.sleep(f.seconds / cuts)
            self.note(f.kind, f"cut {total} worker connections to Redis in {cuts} round(s)")
            return True

    def _proxy_drop_replies(self, f: Fault) -> bool:
        with self._lock("proxy"):
            before = self.fleet.proxy.stats.dropped_replies
            self.fleet.proxy.drop_replies(f.level)
            self.note(f.kind, f"each Redis reply lost with p={f.level:.2f} for {f.seconds:.1f} s")
            time.sleep(f.seconds)
            self.fleet.proxy.drop_replies(0)
            self.note(f.kind, f"replies flow again ({self.fleet.proxy.stats.dropped_replies - before} lost)")
            return True

    def _broker_delete(self, f: Fault) -> bool:
        r = self.fleet.redis_client()
        try:
            lanes = {0: ("normal",), 1: ("quarantine",), 2: ("normal", "quarantine")}[int(f.level)]
            gone = 0
            for key in r.scan_iter(match="scalecap.gpu.*", count=1000):
                name = key.decode()
                lane = "quarantine" if ".quarantine" in name else "normal"
                if lane in lanes and r.type(key) == b"list":
                    gone += r.llen(key)
                    r.delete(key)
            self.note(f.kind, f"DEL of the {'+'.join(lanes)} lane(s): {gone} task message(s) gone")
            return True
        finally:
            r.close()

    def _second_drainer(self, f: Fault) -> bool:
        from scalecap.fleet.protocol import BatchStore
        from scalecap.fleet.reconcile import Reconciler
        from scalecap.fleet.redis import redis_client
        from scalecap.settings import Settings

        settings = Settings.from_env(self.fleet.env())
        from scalecap.fleet.app import create_app

        app = create_app(settings)
        end = time.monotonic() + f.seconds
        passes = Counter[str]()

        def loop() -> None:
            rec = Reconciler(app, BatchStore(redis_client(settings.broker_url), retention=settings.retention),
                             settings)
            while time.monotonic() < end:
                with contextlib.suppress(Exception):  # Redis may be down meanwhile
                    passes["events"] += int(getattr(rec.drain(), "events", 0) or 0)
                    rec.reconcile()
                    passes["passes"] += 1
                time.sleep(0.05)

        self.note(f.kind, f"{int(f.level)} extra drainers + reconcilers beside the I/O worker "
                          f"for {f.seconds:.1f} s")
        ts = [threading.Thread(target=loop, daemon=True) for _ in range(int(f.level))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(f.seconds + 30)
        self.note(f.kind, f"extra drainers done: {passes['passes']} passes, {passes['events']} events moved")
        return True

    def _clock_skew_reconcile(self, f: Fault) -> bool:
        env = {**self.fleet.env(), "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        ok = 0
        for k in range(int(f.level)):
            t = time.monotonic()
            try:
                argv = ["faketime", "-f", SKEW, sys.executable, "-m", "scalecap_command", "reconcile"]
                r = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=45)
            except subprocess.TimeoutExpired:
                self.note(f.kind, f"`scalecap reconcile` {SKEW} ahead: still running after 45 s, stopped")
                continue
            ok += r.returncode == 0
            self.note(f.kind, f"`scalecap reconcile` {SKEW} ahead ({time.monotonic() - t:.0f} s): exit "
                              f"{r.returncode} {(r.stdout.strip() or r.stderr.strip()[-200:])}")
            if k + 1 < int(f.level):
                time.sleep(f.seconds / f.level)
        return ok > 0

    # --- S3 and the receiver ---------------------------------------------------------------

    def _s3_down(self, f: Fault) -> bool:
        with self._lock("s3"):
            self.fleet.s3.stop()
            self.note(f.kind, f"SeaweedFS stopped for {f.seconds:.1f} s")
            time.sleep(f.seconds)
            self.fleet.s3.start()
            self.note(f.kind, "SeaweedFS back")
            return True

    def _receiver(self, f: Fault, what: str) -> bool:
        rec = self.fleet.receiver
        assert rec is not None
        with self._lock("receiver"):
            if what == "down":
                rec.down()
            else:
                rec.mode = what
            self.note(f.kind, f"receiver {what} for {f.seconds:.1f} s")
            time.sleep(f.seconds)
            rec.mode = "ok"
            rec.up()
            self.note(f.kind, "receiver answers again")
            return True

    def _receiver_down(self, f: Fault) -> bool:
        return self._receiver(f, "down")

    def _receiver_slow(self, f: Fault) -> bool:
        return self._receiver(f, "slow")

    def _receiver_5xx(self, f: Fault) -> bool:
        return self._receiver(f, "5xx")


def available_kinds() -> tuple[str, ...]:
    if faketime_available():
        return KINDS
    return tuple(k for k in KINDS if k not in NEEDS_FAKETIME)

