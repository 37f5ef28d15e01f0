"""What one task (a chunk of K images of one batch) does, independent of Celery (tasks.py binds it).

Order matters for the protocol's guarantees (docs/protocol.md):
1. one claim script for the chunk: each job that may run gets this run's attempt token and a
   lease; final jobs, jobs another run holds (live lease) and jobs of a cancelled batch are
   settled there; jobs whose earlier run was lost go to the quarantine lane, uncharged;
2. a job whose record exists already (a resubmission of finished work) is not run again: its
   record is copied into this batch's prefix, so the batch's results location is complete;
3. the others run concurrently on the engine, each cancelled at the job timeout;
4. records go to the sink (an error record for a bad image is final too);
5. one finish script applies every outcome where the job still holds this run's token (a stale
   run's write is discarded and counted), moves the counters once, and, when that finished the
   batch, writes the batch.completed event to the outbox in the same step.
A chunk that runs in the quarantine lane runs alone in its worker (the other job threads wait),
so a worker it kills charges that one job only.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scalecap.errors import BackendError, ConfigError, TerminalError
from scalecap.fleet import failpoints
from scalecap.fleet.protocol import BatchStore, Chunk, JobMessage, Outcome, batch_key
from scalecap.fleet.sinks import Sink, SinkError, open_sink
from scalecap.record import error_record, is_error
from scalecap.retry import backoff
from scalecap.settings import Settings
from workers.engine import EngineRuntime, JobTimeout, is_retryable_record

log = logging.getLogger(__name__)


RETRY_BASE, RETRY_CAP = 1.0, 60.0
"""Seconds: a job's next run waits up to 1, 2, 4 ... s after its n-th run, at most 60 s."""


def lease_seconds(settings: Settings) -> float:
    """How long a claimed chunk is held before the reconciler takes its jobs back."""
    return 1.5 * settings.job_timeout + 2.0


def _error(stage: str, exc: BaseException) -> dict[str, str]:
    return {"stage": stage, "type": type(exc).__name__, "message": str(exc)}


class LaneLock:
    """Chunks of the normal lane share the worker; a quarantine chunk runs alone (writer lock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def shared(self) -> _Held:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._waiting_writers)
            self._readers += 1
        return _Held(self, False)

    def alone(self) -> _Held:
        with self._cond:
            self._waiting_writers += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._waiting_writers -= 1
            self._writer = True
        return _Held(self, True)

    def _release(self, writer: bool) -> None:
        with self._cond:
            if writer:
                self._writer = False
            else:
                self._readers -= 1
            self._cond.notify_all()


@dataclass
class _Held:
    lock: LaneLock
    writer: bool

    def __enter__(self) -> _Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock._release(self.writer)


@dataclass
class BatchMeta:
    """What a worker caches per batch: it never changes once the batch exists."""

    config: str
    sink: str
    queue: str


@dataclass
class ChunkResult:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


class JobContext:
    """Per-process state the jobs share: settings, Redis, sinks, the engine, batch configs."""

    def __init__(
        self,
        settings: Settings,
        redis_client: Any,
        *,
        runtime: Callable[[], EngineRuntime] | None = None,
        publish: Callable[[Chunk, float], None] | None = None,
        results_client: Any = None,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.results_redis = results_client or redis_client
        self.store = BatchStore(redis_client, retention=settings.retention)
        self._runtime = runtime
        self._publish = publish
        self._sinks: dict[str, Sink] = {}
        self._meta: dict[str, BatchMeta] = {}
        self._lock = threading.Lock()
        self.lanes = LaneLock()

    def runtime(self) -> EngineRuntime:
        if self._runtime is None:
            from workers.engine import get_runtime

            return get_runtime()
        return self._runtime()

    def sink(self, url: str) -> Sink:
        with self._lock:
            sink = self._sinks.get(url)
        if sink is None:
            sink = open_sink(url, settings=self.settings, redis_client=self.results_redis)
            with self._lock:
                self._sinks.setdefault(url, sink)
        return sink

    def meta(self, batch_id: str) -> BatchMeta | None:
        """The batch's config, sink and queue: read once per batch and process."""
        meta = self._meta.get(batch_id)
        if meta is None:
            config, sink, queue = self.redis.hmget(batch_key(batch_id), "config", "sink", "queue")
            if config is None:
                return None
            meta = BatchMeta(config.decode(), sink.decode(), queue.decode())
            with self._lock:
                if len(self._meta) > 10_000:
                    self._meta.clear()
                self._meta[batch_id] = meta
        return meta

    def publish(self, chunk: Chunk | None, countdown: float = 0.0) -> None:
        """Send a chunk that a script queued again, then forget its `unpublished` note.

        If this process dies first, the note stays and the reconciler publishes it."""
        if chunk is None or self._publish is None:
            return
        self._publish(chunk, countdown)
        self.store.published(chunk.member)


def _reuse(ctx: JobContext, sink: Sink, meta: BatchMeta, b: str, j: str, entry: str) -> str | None:
    """A finished record of this work from an earlier batch: copied into this batch's prefix."""
    try:
        known = json.loads(entry)
    except ValueError:
        return None
    location = known.get("location") if known.get("sink") == meta.sink else None
    if not location:
        return None
    try:
        if not sink.exists(location):
            return None
        if f"/{b}/" in location or f":{b}:" in location:
            return location  # already in this batch
        return sink.write(b, j, sink.read(location))
    except (SinkError, ValueError) as exc:
        log.warning("job %s: reusing %s failed (%s); running it", j, location, exc)
        return None


def process_chunk(ctx: JobContext, msg: JobMessage) -> dict[str, int]:
    """Run one chunk; returns how many jobs ended how (run, reused, busy, final, ...)."""
    with ctx.lanes.alone() if msg.quarantine else ctx.lanes.shared():
        return _process(ctx, msg)


def _process(ctx: JobContext, msg: JobMessage) -> dict[str, int]:
    s, store, b = ctx.settings, ctx.store, msg.batch_id
    result = ChunkResult()
    meta = ctx.meta(b)
    if meta is None:
        log.warning("chunk of unknown batch %s dropped (%d jobs)", b, len(msg.jobs))
        result.add("unknown-batch", len(msg.jobs))
        return result.counts
    refs = dict(msg.jobs)
    token = uuid.uuid4().hex
    claim = store.claim(b, list(refs), token=token, lease_seconds=lease_seconds(s),
                        max_attempts=s.max_attempts, queue=meta.queue, quarantine=msg.quarantine)
    for code, _ in claim.codes.values():
        if code != "run":
            result.add(code)
    if claim.quarantine:
        ctx.publish(Chunk.parse(claim.quarantine))
    run = claim.runnable()
    if not run:
        return result.counts
    failpoints.hit("after_claim")

    outcomes: list[Outcome] = []
    to_run: list[tuple[str, str]] = []
    try:
        sink = ctx.sink(meta.sink)
    except (SinkError, ValueError) as exc:  # the sink is down: nobody's fault, queued again
        err = _error("sink", exc)
        outcomes = [Outcome(j, "requeue", error=err) for j in run]
        sink = None
    if sink is not None:
        for j in run:
            entry = claim.codes[j][1]
            own = _reuse(ctx, sink, meta, b, j, entry) if entry else None
            if own:
                outcomes.append(Outcome(j, "done", own))
                result.add("reused")
            else:
                to_run.append((j, refs[j]))

    if to_run and sink is not None:
        try:
            records: list[Any] = ctx.runtime().caption_chunk(meta.config, to_run, s.job_timeout or None)
        except Exception as exc:  # no chain for this config, the engine gone: each job's failure
            records = [exc] * len(to_run)
        for (j, ref), record in zip(to_run, records, strict=True):
            outcomes.append(_write(sink, b, j, ref, record))
        failpoints.hit("after_sink_write")

    again = [o.job_id for o in outcomes if o.outcome in ("retry", "requeue")]
    runs = max((int(v.get("runs", 1)) for v in store.jobs_view(b, again) if v), default=1)
    retry_in = backoff(runs, RETRY_BASE, RETRY_CAP) if again else 0.0
    fin = store.finish(b, outcomes, token=token, lease=claim.lease, max_attempts=s.max_attempts,
                       queue=meta.queue, sink=meta.sink, retry_in=retry_in)
    failpoints.hit("after_finish")
    for o in outcomes:
        code = fin.codes.get(o.job_id, "ok")
        result.add(o.outcome if code == "ok" else code)
    if fin.completed:
        log.info("batch %s completed", b)
    if fin.retry:
        failpoints.hit("before_publish_retry")
        ctx.publish(Chunk.parse(fin.retry), retry_in)
    return result.counts


def _write(sink: Sink, b: str, j: str, ref: str, record: dict[str, Any] | BaseException) -> Outcome:
    """Store one image's record; what the finish script should make of it."""
    if isinstance(record, JobTimeout):
        return Outcome(j, "retry", error={"stage": "engine", "type": "JobTimeout", "message": str(record)})
    if isinstance(record, TerminalError):
        # Another run fails the same way (a config this engine cannot serve): the image fails
        # now, with an error record naming it, uncharged and never dead-lettered.
        log.warning("job %s of batch %s failed for good: %s", j, b, record)
        stage = "config" if isinstance(record, ConfigError) else "worker"
        record = error_record(_error(stage, record), {"job_id": j})
    elif isinstance(record, BaseException):  # the engine, or a bug: charged, bounded retries
        stage = "engine" if isinstance(record, BackendError) else "worker"
        log.warning("job %s of batch %s failed: %s", j, b, record)
        return Outcome(j, "retry", error=_error(stage, record))
    if is_retryable_record(record):
        return Outcome(j, "retry", error=record["error"])
    try:
        location = sink.write(b, j, {"image": ref, "scalecap_record": record})
    except (SinkError, ValueError) as exc:  # a sink outage is not the job's fault
        log.warning("job %s of batch %s: sink write failed: %s", j, b, exc)
        return Outcome(j, "requeue", error=_error("sink", exc))
    if is_error(record):
        return Outcome(j, "failed", location, record.get("error"))
    return Outcome(j, "done", location)


__all__ = ["JobContext", "LaneLock", "lease_seconds", "process_chunk"]
