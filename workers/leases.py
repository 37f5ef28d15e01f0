"""Live leases, dead runs: a worker renews the lease of every run it is still making progress
on, from a thread of its own (never the engine's loop, never a task thread), and a run whose
lease was taken back stops: its coroutines are cancelled and it writes nothing more.

A run asks `held()` before each write. After a pause (a GC pause, a VM freeze, SIGSTOP) longer
than a third of the lease, `held()` renews first and answers from Redis, so a run woken after
another worker took its jobs over finds out before it writes. Records are fenced anyway (one
sink key per attempt token, and the finish script credits one run), so this is what keeps the
sink free of a lost run's records, not what keeps the batch right.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from scalecap.fleet.outcomes import LeaseReply

log = logging.getLogger(__name__)


class Run:
    """One claimed chunk in this process: its lease, its engine future, whether it was lost."""

    def __init__(self, store: Any, lease: str, lease_seconds: float, max_seconds: float | None
                 ) -> None:
        self.store = store
        self.lease = lease
        self.lease_seconds = float(lease_seconds)
        self.max_seconds = max_seconds
        """Renewed for at most this long (a run stuck past its job timeout is let go)."""
        self.started = self.renewed = time.monotonic()
        self.lost = threading.Event()
        self._future: Future[Any] | None = None
        self._lock = threading.Lock()

    @property
    def period(self) -> float:
        return max(0.2, self.lease_seconds / 3)

    def attach(self, future: Future[Any]) -> None:
        """The engine's future for this run: cancelled if the run loses its lease."""
        self._future = future
        if self.lost.is_set():
            future.cancel()

    def renew(self) -> bool:
        """Extend the lease now; False (and the run cancelled) when it was lost."""
        with self._lock:
            if self.lost.is_set():
                return False
            if self.store.renew_lease(self.lease, self.lease_seconds) is LeaseReply.LOST:
                self.lose()
                return False
            self.renewed = time.monotonic()
            return True

    def lose(self) -> None:
        if not self.lost.is_set():
            log.warning("lease lost (taken back after a pause past it?): run stops, writes nothing")
        self.lost.set()
        if self._future is not None:
            self._future.cancel()

    def held(self) -> bool:
        """Whether this run may still write: asks Redis when the last renewal is a third of the
        lease old (this process may have been paused)."""
        if self.lost.is_set():
            return False
        if time.monotonic() - self.renewed < self.period:
            return True
        return self.renew()

    def due(self, now: float) -> bool:
        if self.lost.is_set() or now - self.renewed < self.period:
            return False
        return self.max_seconds is None or now - self.started < self.max_seconds


class LeaseKeeper:
    """The worker's renewal thread: started on the first run, a daemon for the process' life."""

    def __init__(self) -> None:
        self._runs: set[Run] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, run: Run) -> Run:
        with self._lock:
            self._runs.add(run)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="scalecap-leases",
                                                daemon=True)
                self._thread.start()
        self._wake.set()
        return run

    def remove(self, run: Run) -> None:
        with self._lock:
            self._runs.discard(run)

    def _loop(self) -> None:
        while True:
            with self._lock:
                runs = list(self._runs)
            now = time.monotonic()
            for run in runs:
                if run.due(now):
                    try:
                        run.renew()
                    except Exception as exc:  # Redis restarting: the next tick tries again
                        log.warning("lease renewal: %s: %s", type(exc).__name__, exc)
            wait = min((r.period for r in runs), default=60.0) / 2
            self._wake.wait(wait)
            self._wake.clear()
