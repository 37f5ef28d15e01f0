"""The repair side of the queue protocol: publish what is noted unpublished, take back expired
leases, drain the outbox into the webhook lanes, and forget batches past their retention.

Run periodically by the I/O worker (`scalecap worker --io`) and once by `scalecap reconcile`.
Everything here is idempotent and at-least-once: a chunk published twice is harmless (workers
skip final and busy jobs), an event sent twice keeps its webhook-id.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from scalecap.fleet.audit import AUDIT_EVERY, Auditor
from scalecap.fleet.outbox import Outbox
from scalecap.fleet.outcomes import LeaseReply
from scalecap.fleet.protocol import (
    LEASES_KEY,
    PREFIX,
    TASK_CAPTION,
    UNPUBLISHED_KEY,
    BatchStore,
    Chunk,
)
from scalecap.fleet.sessions import close_expired
from scalecap.settings import Settings

log = logging.getLogger(__name__)

RECONCILE_LOCK = PREFIX + "lock:reconcile"


def publish_chunk(app: Any, chunk: Chunk, k: int, countdown: float = 0.0) -> int:
    """Send a chunk as task messages of at most k images; returns the number of messages."""
    n = 0
    for msg in chunk.messages(k):
        app.send_task(TASK_CAPTION, args=[msg.to_json()], queue=chunk.queue,
                      countdown=countdown or None)
        n += 1
    return n


@dataclass
class Report:
    published_chunks: int = 0
    expired_leases: int = 0
    events: int = 0
    retries_due: int = 0
    forgotten_batches: int = 0
    closed_sessions: int = 0
    live_leases: int = 0
    """Leases past their deadline by this process' reading, but not by Redis' clock: left alone."""
    restored_jobs: int = 0
    """Queued jobs that no message, unacked entry, lease or note reached (scalecap/fleet/audit.py)."""

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Reconciler:
    """One fleet's repair loop; `app` is a Celery app used only to send tasks by name."""

    def __init__(self, app: Any, store: BatchStore, settings: Settings) -> None:
        self.app = app
        self.store = store
        self.r = store.r
        self.settings = settings
        self._me = uuid.uuid4().hex
        self._passes = 0
        self.auditor = Auditor(self.r, lambda chunk: publish_chunk(app, chunk, settings.chunk_size))

    def _lock(self, key: str, seconds: float) -> bool:
        return bool(self.r.set(key, self._me, nx=True, px=int(seconds * 1000)))

    def _unlock(self, key: str) -> None:
        if self.r.get(key) == self._me.encode():
            self.r.delete(key)

    # --- events -------------------------------------------------------------------------

    def drain(self, limit: int = 500) -> Report:
        """Outbox events and due webhook retries become webhook tasks in their lane, one atomic
        hand-over each (scalecap/fleet/outbox.py): no lock, and nothing lost on any error."""
        drained = Outbox(self.r, self.settings.webhook_lease).drain(self.app, limit)
        return Report(events=drained.events, retries_due=drained.retries_due)

    # --- jobs ---------------------------------------------------------------------------

    def reconcile(self, grace: float | None = None, limit: int = 1000, *, audit: bool | None = None
                  ) -> Report:
        """Take back expired leases, publish chunks noted unpublished for longer than `grace`
        seconds (their producer or worker died before publishing), forget expired batches, and
        (every AUDIT_EVERY passes, or when `audit`) restore queued jobs whose message vanished.

        Every "now" here is Redis' clock (`TIME`), never this machine's: a reconciler whose clock
        runs ahead takes back no live lease (and expire_lease checks again by Redis' clock)."""
        s = self.settings
        grace = max(5.0, 2 * s.reconcile_interval) if grace is None else grace
        rep = Report()
        if not self._lock(RECONCILE_LOCK, 120):
            return rep
        try:
            now = self.store.now()
            for lease in self.r.zrangebyscore(LEASES_KEY, "-inf", now, start=0, num=limit):
                lease = lease.decode() if isinstance(lease, bytes) else lease
                reply, chunk = self.store.expire_lease(lease, max_attempts=s.max_attempts)
                if reply is LeaseReply.LIVE:
                    rep.live_leases += 1
                    continue
                rep.expired_leases += 1
                if chunk is not None:
                    publish_chunk(self.app, chunk, s.chunk_size)
                    self.store.published(chunk.member)
            for member in self.r.zrangebyscore(UNPUBLISHED_KEY, "-inf", now - grace, start=0, num=limit):
                chunk = Chunk.parse(member)
                publish_chunk(self.app, chunk, s.chunk_size)
                self.store.published(chunk.member)
                rep.published_chunks += 1
            rep.forgotten_batches = self.store.forget_expired(now, limit)
            rep.closed_sessions = close_expired(self.store, s.submit_timeout, limit)
            if audit if audit is not None else self._passes % AUDIT_EVERY == 0:
                rep.restored_jobs = self.auditor.audit().restored
            self._passes += 1
        finally:
            self._unlock(RECONCILE_LOCK)
        if rep.expired_leases or rep.published_chunks or rep.restored_jobs or rep.closed_sessions:
            log.info("reconcile: %s", rep.to_dict())
        return rep


def run_forever(app: Any, store: BatchStore, settings: Settings, stop: Any, tick: float = 0.5) -> None:
    """The I/O worker's maintenance loop (a daemon thread): drain every tick, reconcile every
    `settings.reconcile_interval` seconds. Redis errors are logged and retried next tick."""
    rec = Reconciler(app, store, settings)
    next_reconcile = 0.0
    while not stop.is_set():
        try:
            rec.drain()
            if time.monotonic() >= next_reconcile:
                rec.reconcile()
                next_reconcile = time.monotonic() + settings.reconcile_interval
        except Exception as exc:  # Redis restarting, broker down: try again next tick
            log.warning("maintenance: %s: %s", type(exc).__name__, exc)
            stop.wait(2.0)
        stop.wait(tick)
