"""A sink outage parks jobs instead of dead-lettering them: while a sink is down, this worker
claims no chunk for it, and resumes once the sink answers again.

A failed write is told apart from a sink that is down by a probe (S3: HEAD bucket; Redis: PING):
the probe fails, so the sink is down, the job goes back to queued uncharged (`requeue`, which
the finish script never dead-letters) and the gate closes; the probe answers, so the sink
refused this record, and the job is charged a retry like any failure of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PROBE_MAX_DELAY = 30.0
"""Seconds between probes of a sink that is down, at most (backoff from 1 s)."""


class SinkGate:
    """Which sinks this worker found down; `wait` blocks a task thread until its sink is up."""

    def __init__(self, probe: Callable[[str], None]) -> None:
        self._probe = probe
        """probe(url) raises while the sink at `url` is down."""
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()

    def down(self, url: str) -> None:
        with self._lock:
            if url not in self._down:
                log.warning("sink %s is down: claiming nothing for it until it answers", url)
            self._down.setdefault(url, time.monotonic())

    def is_down(self, url: str) -> bool:
        with self._lock:
            return url in self._down

    def wait(self, url: str, sleep: Callable[[float], None] = time.sleep) -> None:
        """Return at once if the sink is up; else probe with backoff until it answers."""
        delay = 1.0
        while self.is_down(url):
            try:
                self._probe(url)
            except Exception as exc:  # still down: SinkError, a connection error, a timeout
                log.info("sink %s still down (%s); next probe in %.0f s", url, exc, delay)
                sleep(delay)
                delay = min(PROBE_MAX_DELAY, delay * 2)
                continue
            with self._lock:
                since = self._down.pop(url, None)
            if since is not None:
                log.warning("sink %s answers again after %.0f s: claiming resumes", url,
                            time.monotonic() - since)
