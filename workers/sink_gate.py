"""A sink outage parks jobs instead of dead-lettering them: while a sink is down, this worker
claims no chunk for it, and resumes once the sink answers again.

A failed write is told apart from a sink that is down by a probe (S3: HEAD bucket; Redis: PING):
the probe fails, so the sink is down, the job goes back to queued uncharged (`requeue`, which
the finish script never dead-letters) and the gate closes; the probe answers, so the sink
refused this record, and the job is charged a retry like any failure of its own.

While the gate is closed, a chunk for that sink is not claimed: `check` raises SinkDown, and the
task sends its message back with a countdown (workers/tasks.py), so no thread waits on a dead
sink and chunks of other sinks keep running. The sink is probed at most once per backoff
period (1 s doubling to PROBE_MAX_DELAY), by whichever chunk comes when a probe is due.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from scalecap.errors import ScaleCapError

log = logging.getLogger(__name__)

PROBE_MAX_DELAY = 30.0
"""Seconds between probes of a sink that is down, at most."""


class SinkDown(ScaleCapError):
    """This worker found the chunk's sink down: nothing was claimed; send the message back."""

    def __init__(self, url: str, delay: float) -> None:
        super().__init__(f"sink {url} is down; the chunk comes back in {delay:.0f} s")
        self.delay = delay


class SinkGate:
    """Which sinks this worker found down, and when each is next probed (monotonic seconds)."""

    def __init__(self, probe: Callable[[str], None]) -> None:
        self._probe = probe
        """probe(url) raises while the sink at `url` is down."""
        self._down: dict[str, tuple[float, float, float]] = {}
        """url -> (down since, next probe at, current backoff)."""
        self._lock = threading.Lock()

    def down(self, url: str) -> None:
        now = time.monotonic()
        with self._lock:
            if url not in self._down:
                log.warning("sink %s is down: claiming nothing for it until it answers", url)
                self._down[url] = (now, now + 1.0, 1.0)

    def is_down(self, url: str) -> bool:
        with self._lock:
            return url in self._down

    def check(self, url: str) -> None:
        """Return if the sink is up (or answers the probe now due); else raise SinkDown."""
        now = time.monotonic()
        with self._lock:
            state = self._down.get(url)
            if state is None:
                return
            since, due, delay = state
            if now < due:
                raise SinkDown(url, due - now)
            self._down[url] = (since, now + delay, delay)  # one probe per period, this caller's
        try:
            self._probe(url)
        except Exception as exc:  # still down: SinkError, a connection error, a timeout
            nxt = min(PROBE_MAX_DELAY, delay * 2)
            with self._lock:
                self._down[url] = (since, time.monotonic() + nxt, nxt)
            log.info("sink %s still down (%s); next probe in %.0f s", url, exc, nxt)
            raise SinkDown(url, nxt) from exc
        with self._lock:
            self._down.pop(url, None)
        log.warning("sink %s answers again after %.0f s: claiming resumes", url, time.monotonic() - since)
