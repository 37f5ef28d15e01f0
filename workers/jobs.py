"""What one task (a chunk of K images of one batch) does, independent of Celery (tasks.py binds it).

Order matters for the protocol's guarantees (docs/protocol.md):
0. no claim while the batch's sink is known down (workers/sink_gate.py): the jobs stay queued,
   noted due by Redis' clock when the next probe is (the I/O worker publishes them then);
1. one claim script for the chunk: each job that may run gets this run's attempt token and a
   lease; final jobs, jobs another run holds (live lease) and jobs of a cancelled batch are
   settled there; jobs whose earlier run was lost go to the quarantine lane, uncharged; the
   lease is renewed from the worker's lease thread while the run makes progress
   (workers/leases.py), and a run that lost it is cancelled and writes nothing more;
2. a job whose record exists already (a resubmission of finished work) is not run again: its
   record is copied into this batch's prefix, so the batch's results location is complete;
3. the others run concurrently on the engine, each cancelled at the job timeout;
4. records go to the sink under this run's own key (batch, job, attempt token), each naming the
   run in its meta (attempt, worker): a fenced record, which no other run's write replaces;
5. one finish script applies every outcome where the job still holds this run's token (a stale
   run's write is discarded and counted), stores the credited run's location, moves the
   counters once, and, when that finished the batch, writes the batch.completed event to the
   outbox in the same step.
A chunk that runs in the quarantine lane runs alone in its worker (the other job threads wait),
so a worker it kills charges that one job only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any

from scalecap.errors import BackendError, ConfigError, TerminalError
from scalecap.fleet import failpoints
from scalecap.fleet.access import refusal
from scalecap.fleet.outcomes import ClaimCode, FinishCode, RunOutcome
from scalecap.fleet.protocol import BatchStore, Chunk, JobMessage, Outcome, batch_key, quarantine_queue
from scalecap.fleet.scope import Scope
from scalecap.fleet.sinks import Sink, SinkError, open_sink
from scalecap.record import error_record, is_error
from scalecap.retry import backoff
from scalecap.settings import Settings
from workers.engine import EngineRuntime, JobTimeout, is_retryable_record
from workers.leases import LeaseKeeper, Run
from workers.sink_gate import SinkDown, SinkGate

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
    scope: Any = None
    """The submitting key's data scope (scalecap/fleet/scope.py); None: fleet-wide."""


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
        publish: Callable[[Chunk], None] | None = None,
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
        self.leases = LeaseKeeper()
        self.gate = SinkGate(lambda url: self.sink(url).probe())
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        """Named in each record's meta beside the attempt token."""

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
            config, sink, queue, scope = self.redis.hmget(batch_key(batch_id), "config", "sink", "queue",
                                                          "scope")
            if config is None:
                return None
            meta = BatchMeta(config.decode(), sink.decode(), queue.decode(), Scope.from_json(scope))
            with self._lock:
                if len(self._meta) > 10_000:
                    self._meta.clear()
                self._meta[batch_id] = meta
        return meta

    def publish(self, chunk: Chunk | None) -> None:
        """Send a chunk that a script queued again, then forget its `unpublished` note.

        If this process dies first, the note stays and the reconciler publishes it. Never with
        a delay: a retry stays noted, due by Redis' clock (`Reconciler.publish_due`)."""
        if chunk is None or self._publish is None:
            return
        self._publish(chunk)
        self.store.published(chunk.member)


    def defer(self, msg: JobMessage, queue: str, delay: float) -> None:
        """Note `msg`'s chunk in `unpublished`, due `delay` s from Redis' now (not a message with
        a countdown: Celery would make it an ETA by this process' clock); the I/O worker
        publishes it when due, and this message is acknowledged."""
        from scalecap.fleet.reconcile import note_due

        lane = quarantine_queue(queue) if msg.quarantine else queue
        note_due(self.redis, msg.batch_id, lane, list(msg.jobs), delay)


def _stamp(row: dict[str, Any], token: str, worker: str) -> dict[str, Any]:
    """The row with its record's meta naming the run that writes it (attempt token, worker)."""
    record = dict(row.get("scalecap_record") or {})
    record["meta"] = {**(record.get("meta") or {}), "attempt": token, "worker": worker}
    return {**row, "scalecap_record": record}


def _reuse(ctx: JobContext, sink: Sink, meta: BatchMeta, b: str, j: str, entry: str,
           token: str) -> str | None:
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
        if sink.batch_of(location) == b:
            return location  # already in this batch (the exact batch id, not a substring)
        return sink.write(b, j, _stamp(sink.read(location), token, ctx.worker), token)
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
    try:
        ctx.gate.check(meta.sink)
    except SinkDown as exc:  # nothing claimed: the chunk is noted due after the probe delay
        ctx.defer(msg, meta.queue, exc.delay)
        result.add("sink_down", len(msg.jobs))
        return result.counts
    refs = dict(msg.jobs)
    token = uuid.uuid4().hex
    claim = store.claim(b, list(refs), token=token, lease_seconds=lease_seconds(s),
                        max_attempts=s.max_attempts, queue=meta.queue, quarantine=msg.quarantine)
    for code, _ in claim.codes.values():
        if code is not ClaimCode.RUN:
            result.add(code)
    if claim.quarantine:
        ctx.publish(Chunk.parse(claim.quarantine))
    run = claim.runnable()
    if not run:
        return result.counts
    keep = ctx.leases.add(Run(store, claim.lease, lease_seconds(s),
                              2 * s.job_timeout + lease_seconds(s) if s.job_timeout else None))
    try:
        return _run(ctx, msg, meta, refs, token, claim, run, keep, result)
    finally:
        ctx.leases.remove(keep)


def _run(ctx: JobContext, msg: JobMessage, meta: BatchMeta, refs: dict[str, str], token: str,
         claim: Any, run: list[str], keep: Run, result: ChunkResult) -> dict[str, int]:
    """The claimed jobs of one chunk: reuse or caption, write, finish (while the lease holds)."""
    s, store, b = ctx.settings, ctx.store, msg.batch_id
    failpoints.hit("after_claim")
    outcomes: list[Outcome] = []
    to_run: list[tuple[str, str]] = []
    try:
        sink = ctx.sink(meta.sink)
    except (SinkError, ValueError) as exc:  # the sink is down: nobody's fault, queued again
        ctx.gate.down(meta.sink)
        outcomes = [Outcome(j, RunOutcome.REQUEUE, error=_error("sink", exc)) for j in run]
        sink = None
    if sink is not None:
        for j in run:
            refused = refusal(refs[j], meta.scope, s.allowed_roots, s.allowed_buckets)
            if refused:  # checked again before anything is opened: the batch's scope travels with it
                err = {"stage": "load", "type": "ImageAccessDenied", "message": refused}
                record = error_record(err, {"job_id": j})
                outcomes.append(_write(ctx, sink, meta.sink, b, j, refs[j], record, token))
                result.add("refused")
                continue
            entry = claim.codes[j][1]
            own = _reuse(ctx, sink, meta, b, j, entry, token) if entry and keep.held() else None
            if own:
                outcomes.append(Outcome(j, RunOutcome.DONE, own))
                result.add("reused")
            else:
                to_run.append((j, refs[j]))

    if to_run and sink is not None:
        try:
            records: list[Any] = ctx.runtime().caption_chunk(meta.config, to_run, s.job_timeout or None,
                                                             watch=keep.attach)
        except CancelledError:  # the lease was lost: this run stops here
            records = []
        except Exception as exc:  # no chain for this config, the engine gone: each job's failure
            records = [exc] * len(to_run)
        failpoints.hit("before_sink_write")
        if not records or not keep.held():
            result.add("lease_lost", len(run))
            log.warning("batch %s: run %s lost its lease; %d record(s) not written", b, token, len(run))
            return result.counts
        for (j, ref), record in zip(to_run, records, strict=True):
            if not keep.held():  # lost between two writes: nothing more
                result.add("lease_lost", len(run))
                return result.counts
            outcomes.append(_write(ctx, sink, meta.sink, b, j, ref, record, token))
        failpoints.hit("after_sink_write")

    if keep.lost.is_set():
        result.add("lease_lost", len(run))
        return result.counts
    again = [o.job_id for o in outcomes if o.outcome in (RunOutcome.RETRY, RunOutcome.REQUEUE)]
    runs = max((int(v.get("runs", 1)) for v in store.jobs_view(b, again) if v), default=1)
    retry_in = backoff(runs, RETRY_BASE, RETRY_CAP) if again else 0.0
    fin = store.finish(b, outcomes, token=token, lease=claim.lease, max_attempts=s.max_attempts,
                       queue=meta.queue, sink=meta.sink, retry_in=retry_in)
    failpoints.hit("after_finish")
    for o in outcomes:
        code = fin.codes.get(o.job_id, FinishCode.OK)
        result.add(o.outcome if code is FinishCode.OK else code)
    if fin.completed:
        log.info("batch %s completed", b)
    # fin.retry (jobs queued again) stays noted in `unpublished`, due at Redis' now + retry_in:
    # the I/O worker publishes it then. A countdown here would become a Celery ETA by this
    # process' clock, and a worker an hour ahead would hold the retry for an hour.
    return result.counts


def _write(ctx: JobContext, sink: Sink, url: str, b: str, j: str, ref: str,
           record: dict[str, Any] | BaseException, token: str) -> Outcome:
    """Store one image's record under this run's key; what the finish script should make of it."""
    if isinstance(record, JobTimeout):
        return Outcome(j, RunOutcome.RETRY, error=_error("engine", record))
    if isinstance(record, TerminalError):
        # Another run fails the same way (a config this engine cannot serve): the image fails
        # now, with an error record naming it, uncharged and never dead-lettered.
        log.warning("job %s of batch %s failed for good: %s", j, b, record)
        stage = "config" if isinstance(record, ConfigError) else "worker"
        record = error_record(_error(stage, record), {"job_id": j})
    elif isinstance(record, BaseException):  # the engine, or a bug: charged, bounded retries
        stage = "engine" if isinstance(record, BackendError) else "worker"
        log.warning("job %s of batch %s failed: %s", j, b, record)
        return Outcome(j, RunOutcome.RETRY, error=_error(stage, record))
    if is_retryable_record(record):
        return Outcome(j, RunOutcome.RETRY, error=record["error"])
    try:
        location = sink.write(b, j, _stamp({"image": ref, "scalecap_record": record}, token, ctx.worker),
                              token)
    except (SinkError, ValueError) as exc:
        log.warning("job %s of batch %s: sink write failed: %s", j, b, exc)
        try:
            sink.probe()
        except Exception:  # the sink is down: not the job's fault, never dead-lettered
            ctx.gate.down(url)
            return Outcome(j, RunOutcome.REQUEUE, error=_error("sink", exc))
        return Outcome(j, RunOutcome.RETRY, error=_error("sink", exc))  # it refused this record
    if is_error(record):
        return Outcome(j, RunOutcome.FAILED, location, record.get("error"))
    return Outcome(j, RunOutcome.DONE, location)


__all__ = ["JobContext", "LaneLock", "lease_seconds", "process_chunk"]
