"""What one caption job does, step by step, independent of Celery (tasks.py binds it).

Order matters for the protocol's guarantees:
1. a cancelled batch counts the job cancelled and runs nothing;
2. a job whose record already exists in the batch's sink (a redelivery, or a resubmission of
   finished work) counts done without model work and without a second write;
3. every delivery counts one attempt; a job past `max_attempts` (one that keeps killing its
   worker, or keeps failing retryably) goes to the dead-letter list and counts failed;
4. the record (an error record for a bad image is final too) is written to the sink, then the
   job's state moves to done/failed; the transition that finishes the batch returns "completed"
   and only that caller enqueues the batch.completed webhook.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from scalecap.errors import BackendError
from scalecap.queue_protocol import (
    FINAL_STATES,
    BatchStore,
    JobMessage,
    Transition,
)
from scalecap.record import is_error
from scalecap.settings import Settings
from scalecap.sinks import Sink, SinkError, open_sink
from workers.engine import EngineRuntime, is_retryable_record

log = logging.getLogger(__name__)


class RetryJob(Exception):
    """Deliver this job again after `countdown` seconds (a transient failure)."""

    def __init__(self, countdown: float, cause: BaseException) -> None:
        super().__init__(f"retry in {countdown:.1f}s: {type(cause).__name__}: {cause}")
        self.countdown = countdown
        self.cause = cause


def retry_delay(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with jitter, in seconds."""
    return min(cap, base * 2 ** max(0, attempt - 1)) * random.uniform(0.5, 1.0)


def _error(stage: str, exc: BaseException | str) -> dict[str, str]:
    if isinstance(exc, BaseException):
        return {"stage": stage, "type": type(exc).__name__, "message": str(exc)}
    return {"stage": stage, "type": "WorkerLost", "message": exc}


class JobContext:
    """Per-process state the jobs share: settings, Redis, sinks, the engine, a webhook hook."""

    def __init__(
        self,
        settings: Settings,
        redis_client: Any,
        *,
        runtime: Callable[[], EngineRuntime] | None = None,
        on_completed: Callable[[str], None] | None = None,
        on_job_final: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.store = BatchStore(redis_client)
        self._runtime = runtime
        self._on_completed = on_completed
        self._on_job_final = on_job_final
        self._sinks: dict[str, Sink] = {}
        self._lock = threading.Lock()

    def runtime(self) -> EngineRuntime:
        if self._runtime is None:
            from workers.engine import get_runtime

            return get_runtime()
        return self._runtime()

    def sink(self, url: str) -> Sink:
        with self._lock:
            sink = self._sinks.get(url)
        if sink is None:
            sink = open_sink(url, settings=self.settings, redis_client=self.redis)
            with self._lock:
                self._sinks.setdefault(url, sink)
        return sink

    def completed(
        self, t: Transition, batch_id: str, *, job_id: str | None = None, batch: dict | None = None
    ) -> None:
        """After a job's final transition: its job.completed event (when the batch asked for
        them), then, from the one caller that finished the batch, the batch.completed event."""
        if job_id and batch and batch.get("webhook_jobs") == "1" and self._on_job_final is not None:
            self._on_job_final(batch_id, job_id)
        if t.completed:
            log.info("batch %s completed", batch_id)
            if self._on_completed is not None:
                self._on_completed(batch_id)


def process_caption(ctx: JobContext, msg: JobMessage) -> str:
    """Run one job; returns what happened. Raises RetryJob for a transient failure."""
    store, b, j = ctx.store, msg.batch_id, msg.job_id
    batch, job, known = store.snapshot(b, j)
    if batch is None:
        log.warning("job %s of unknown batch %s dropped", j, b)
        return "unknown-batch"
    if job is None:
        log.warning("job %s is not registered in batch %s; dropped", j, b)
        return "unknown-job"
    if job["state"] in FINAL_STATES:
        return "duplicate"
    if batch.get("cancel_requested") == "1":
        ctx.completed(store.transition(b, j, "cancelled"), b, job_id=j, batch=batch)
        return "cancelled"

    sink_url = batch["sink"]
    max_attempts = ctx.settings.max_attempts
    sink: Sink | None = None
    try:
        sink = ctx.sink(sink_url)
        location = job.get("location") or (
            known.get("location") if known and known.get("sink") == sink_url else None
        )
        if location and sink.exists(location):
            t = store.transition(b, j, "done", location=location, reused="1")
            ctx.completed(t, b, job_id=j, batch=batch)
            return "reused"
    except (SinkError, ValueError) as exc:
        # A sink that is down fails again below, where the failure counts as an attempt.
        log.warning("job %s: record check failed: %s", j, exc)

    claim, attempt = store.claim(b, j, max_attempts)
    if claim == "exhausted":
        last = job.get("error") or json.dumps(
            _error("queue", f"the worker was lost {attempt - 1} time(s) while running this job")
        )
        error = json.loads(last)
        entry = {"batch_id": b, "job_id": j, "ref": msg.ref, "attempts": attempt - 1, "error": error}
        t = store.transition(b, j, "failed", dead_letter=entry, error=error)
        log.error("job %s of batch %s dead-lettered after %d attempt(s)", j, b, attempt - 1)
        ctx.completed(t, b, job_id=j, batch=batch)
        return "dead-lettered"
    if claim != "run":
        return claim

    try:
        if sink is None:
            sink = ctx.sink(sink_url)
        record = ctx.runtime().caption(batch["config"], msg.ref, j)
        if is_retryable_record(record):
            raise BackendError(record["error"]["message"])
        location = sink.write(b, j, {"image": msg.ref, "scalecap_record": record})
    except Exception as exc:  # engine, sink or a bug: bounded retries, then the dead-letter list
        stage = "worker"
        if isinstance(exc, (BackendError, SinkError)):
            stage = "engine" if isinstance(exc, BackendError) else "sink"
        error = _error(stage, exc)
        log.warning("job %s of batch %s attempt %d failed: %s", j, b, attempt, exc)
        if attempt >= max_attempts:
            entry = {"batch_id": b, "job_id": j, "ref": msg.ref, "attempts": attempt, "error": error}
            t = store.transition(b, j, "failed", dead_letter=entry, error=error)
            ctx.completed(t, b, job_id=j, batch=batch)
            return "dead-lettered"
        store.transition(b, j, "queued", expected="running", error=error)
        raise RetryJob(retry_delay(attempt), exc) from exc

    final = "failed" if is_error(record) else "done"
    remember = None
    if final == "done":
        remember = (sink_url, location, ctx.settings.result_ttl if sink_url == "redis" else None)
    t = store.transition(b, j, final, location=location, error=record.get("error"), remember=remember)
    ctx.completed(t, b, job_id=j, batch=batch)
    return final
