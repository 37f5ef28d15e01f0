"""The repair side of the queue protocol: publish what is noted unpublished, take back expired
leases, drain the outbox into the webhook lanes, and forget batches past their retention.

Run periodically by the I/O worker (`scalecap worker --io`) and once by `scalecap reconcile`.
Everything here is idempotent and at-least-once: a chunk published twice is harmless (workers
skip final and busy jobs), an event sent twice keeps its webhook-id.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any

from scalecap.fleet import failpoints
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


def publish_chunk(app: Any, chunk: Chunk, k: int) -> int:
    """Send a chunk as task messages of at most k images; returns the number of messages.

    Never with a countdown: Celery turns one into an absolute ETA by the sender's clock, so a
    sender an hour ahead would hold the jobs for an hour. A delay is a note in `unpublished`
    due by Redis' clock instead (`Reconciler.publish_due`)."""
    n = 0
    for msg in chunk.messages(k):
        app.send_task(TASK_CAPTION, args=[msg.to_json()], queue=chunk.queue)
        n += 1
    return n


def lock_ttl(settings: Settings) -> float:
    """Seconds the reconcile lock outlives a reconciler that died holding it (docs/protocol.md)."""
    return max(5.0, 2 * settings.reconcile_interval)


def _script(r: Any, name: str) -> Any:
    return r.register_script(resources.files("scalecap.fleet.lua").joinpath(f"{name}.lua").read_text())


def note_due(r: Any, batch_id: str, queue: str, jobs: list[tuple[str, str]], delay: float) -> str:
    """Note these queued jobs as a retry chunk due `delay` s from Redis' now (note_due_chunk.lua);
    `Reconciler.publish_due` publishes it then. Returns the note."""
    member = json.dumps({"c": uuid.uuid4().hex + ":r", "b": batch_id, "q": queue,
                         "jobs": [list(j) for j in jobs]})
    _script(r, "note_due_chunk")(keys=[UNPUBLISHED_KEY], args=[max(0.0, float(delay)), member])
    return member


@dataclass
class Report:
    published_chunks: int = 0
    expired_leases: int = 0
    events: int = 0
    retries_due: int = 0
    due_chunks: int = 0
    """Retry notes whose time came by Redis' clock, published (take_due_chunk.lua)."""
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
        self._lock_script = _script(self.r, "maintenance_lock")
        self._take_due = _script(self.r, "take_due_chunk")

    def _lock(self, key: str, seconds: float) -> bool:
        """Take `key`, or keep it if it is ours already (a take whose reply was lost)."""
        return bool(self._lock_script(keys=[key], args=["take", self._me, int(seconds * 1000)]))

    def _unlock(self, key: str) -> None:
        """Release `key` if it is still ours (compare and delete, one step)."""
        self._lock_script(keys=[key], args=["release", self._me, 0])

    # --- events -------------------------------------------------------------------------

    def drain(self, limit: int = 500) -> Report:
        """Outbox events and due webhook retries become webhook tasks in their lane, one atomic
        hand-over each (scalecap/fleet/outbox.py): no lock, and nothing lost on any error."""
        drained = Outbox(self.r, self.settings.webhook_lease).drain(self.app, limit)
        return Report(events=drained.events, retries_due=drained.retries_due,
                      due_chunks=self.publish_due(limit))

    def publish_due(self, limit: int = 500) -> int:
        """Publish the retry notes due by Redis' clock (a finish queued their jobs again after a
        delay), each handed over atomically; no lock. A note stays due again a grace later
        until it is forgotten, so a publish that fails is repaired."""
        hold = max(5.0, 2 * self.settings.reconcile_interval)
        n = 0
        for member in self._take_due(keys=[UNPUBLISHED_KEY], args=[hold, limit]):
            chunk = Chunk.parse(member)
            failpoints.hit("before_publish_retry")
            publish_chunk(self.app, chunk, self.settings.chunk_size)
            self.store.published(chunk.member)
            n += 1
        return n

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
        try:  # taken inside the try: a take whose reply was lost is released (or re-entered) too
            if not self._lock(RECONCILE_LOCK, lock_ttl(s)):
                return rep
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
