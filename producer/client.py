"""FleetClient: submit batches to the fleet, follow them, read their results, cancel them.

The library behind `scalecap submit/status/results/cancel` (and the HTTP API). It needs Redis,
Celery (to publish jobs by task name) and boto3 for S3 sinks, never torch or vLLM.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from producer.submit import SubmitResult
from producer.submit_model import SubmitOptions
from scalecap.errors import ConfigError, ScaleCapError
from scalecap.fleet.outcomes import BatchState, JobState
from scalecap.fleet.protocol import (
    DEAD_LETTER_KEY,
    IO_QUEUE,
    WEBHOOK_ATTEMPTS_SHOWN,
    BatchStore,
    batch_jobs_key,
    check_batch_id,
    counts,
    queue_queued_key,
    webhook_attempts_key,
)
from scalecap.fleet.redact import redact_url
from scalecap.settings import Settings

log = logging.getLogger(__name__)

class BatchNotFound(ScaleCapError, KeyError):
    """No batch with this id in this Redis."""


class BatchUnfinished(ConfigError):
    """`purge` of a batch that has not finished, without force."""


class FleetClient:
    """One producer's view of the fleet: Redis for state, Celery (by task name) for jobs."""

    def __init__(self, settings: Settings | None = None, *, redis_client: Any = None) -> None:
        from scalecap.fleet import redis as redis_conn
        from scalecap.fleet.app import create_app

        self.settings = settings or Settings.from_env()
        self.redis = redis_client or redis_conn.redis_client(self.settings.broker_url, self.settings)
        self.results_redis = (
            redis_conn.redis_client(self.settings.results_url, self.settings)
            if self.settings.results_url else self.redis
        )
        self.store = BatchStore(self.redis, retention=self.settings.retention)
        self.app = create_app(self.settings)
        self._sinks: dict[str, Any] = {}

    # --- sinks ------------------------------------------------------------------------

    def sink(self, url: str) -> Any:
        """The sink for `url`, opened once (an S3 sink checks its bucket when opened)."""
        if url not in self._sinks:
            from scalecap.fleet.sinks import open_sink

            self._sinks[url] = open_sink(url, settings=self.settings, redis_client=self.results_redis)
        return self._sinks[url]

    def _s3_client(self) -> Any:
        from scalecap.images import s3_client

        return s3_client(self.settings)

    # --- submit ------------------------------------------------------------------------

    def submit(
        self,
        source: Iterable[Any] | str,
        options: SubmitOptions | None = None,
        *,
        on_progress: Callable[[int], None] | None = None,
        on_wait: Callable[[int], None] | None = None,
        **fields: Any,
    ) -> SubmitResult:
        """Stream `source` into a batch: each job is published as soon as it is read.

        `options` (or its fields as keywords: sink, webhook, webhook_jobs, config, batch_id,
        model, queue, image_key, image_column, id_column, chunk_size, owner, session, scope; see
        producer/submit_model.py) say where and how. Constant memory whatever the source's size;
        workers start on the first chunk while the rest is still being read. Resubmitting the
        same images under the same config (to this or another batch) is idempotent: finished
        images are not captioned or written again, and every job that is not final is published
        again (a crashed submit is repaired this way). A resubmission with another config, model
        or sink raises BatchMismatch, writing nothing. Concurrent submits to one batch each hold
        a session; the batch completes once, when the last closes. `on_wait(queued)` is called
        while submission waits because more than SCALECAP_MAX_QUEUED images are queued.
        """
        from producer.submit import submit

        opts = replace(options or SubmitOptions(), **fields)
        return submit(self, source, opts, on_progress=on_progress, on_wait=on_wait)

    def backpressure(self, queue: str, on_wait: Callable[[int], None] | None = None,
                     keepalive: Callable[[], None] | None = None) -> None:
        """Wait while more than SCALECAP_MAX_QUEUED images are queued for this queue's model
        (`keepalive` is called while waiting: the submission is not abandoned)."""
        limit = self.settings.max_queued
        if limit <= 0:
            return
        while True:
            queued = int(self.redis.get(queue_queued_key(queue)) or 0)
            if queued <= limit:
                return
            if on_wait is not None:
                on_wait(queued)
            if keepalive is not None:
                keepalive()
            time.sleep(0.5)

    # --- follow ------------------------------------------------------------------------

    def _batch(self, batch_id: str) -> dict[str, str]:
        batch = self.store.batch(batch_id)
        if batch is None:
            raise BatchNotFound(f"no batch {batch_id!r} in {self.settings.broker_url}")
        return batch

    def status(self, batch_id: str) -> dict[str, Any]:
        """Counters, state, sink, timestamps, webhook attempts and dead-letter count."""
        b = self._batch(batch_id)
        c = counts(b)
        if b.get("finished_at"):
            state = BatchState.CANCELLED if b.get("cancel_requested") == "1" else BatchState.FINISHED
        elif b.get("closed") != "1":
            state = BatchState.SUBMITTING
        elif b.get("cancel_requested") == "1":
            state = BatchState.CANCELLING
        else:
            state = BatchState.RUNNING if b.get("started_at") else BatchState.QUEUED
        key = webhook_attempts_key(batch_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(key, -WEBHOOK_ATTEMPTS_SHOWN, -1)
        pipe.llen(key)
        shown, total_attempts = pipe.execute()
        attempts = [json.loads(x) for x in shown]

        def ts(name: str) -> float | None:
            v = b.get(name)
            return float(v) if v else None

        return {
            "batch_id": batch_id,
            "state": state,
            "owner": b.get("owner") or None,
            "sessions": int(b.get("sessions") or 0),  # submissions still open (state: submitting)
            **c,
            "sink": b.get("sink"),
            "model": b.get("model"),
            "queue": b.get("queue"),
            "config_hash": b.get("config_hash"),
            "webhook": redact_url(b.get("webhook")) or None,  # its query string may hold a token
            "webhook_status": b.get("webhook_status"),
            "webhook_attempts": attempts,
            "webhook_attempts_total": int(total_attempts),
            "created_at": ts("created_at"),
            "started_at": ts("started_at"),
            "closed_at": ts("closed_at"),
            "finished_at": ts("finished_at"),
        }

    def wait(
        self,
        batch_id: str,
        progress: Callable[[dict[str, Any]], None] | None = None,
        *,
        poll: float = 0.5,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Poll until the batch finishes; `progress(status)` is called on every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status(batch_id)
            if progress is not None:
                progress(st)
            if st["finished_at"] is not None:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} not finished after {timeout} s: {st}")
            time.sleep(poll)

    def _jobs(self, batch_id: str, fields: tuple[str, ...], chunk: int = 500
              ) -> Iterator[tuple[str, list[str | None]]]:
        """(job_id, [field values]) of every job of a batch, each once, streamed in chunks.

        Memory stays constant in the batch size: job ids come paged from the batch's index."""
        ids: list[str] = []

        def fetch() -> Iterator[tuple[str, list[str | None]]]:
            for j, view in zip(ids, self.store.jobs_view(batch_id, ids), strict=True):
                yield j, [view.get(f) if view else None for f in fields]
            ids.clear()

        for j in self.store.job_ids(batch_id, count=chunk):
            ids.append(j)
            if len(ids) >= chunk:
                yield from fetch()
        if ids:
            yield from fetch()

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """One row per finished image ({"image", "scalecap_record"}), each image once.

        Done and failed images come from the sink; a job that never produced a record (a bad
        manifest line, a dead-lettered job) yields an error row. Cancelled and unfinished jobs
        are skipped. Order is arbitrary.
        """
        sink = self.sink(self._batch(batch_id)["sink"])
        for j, (state, ref, location, error) in self._jobs(batch_id, ("state", "ref", "location", "error")):
            if location:
                yield sink.read(location)
            elif state == JobState.FAILED:
                err = json.loads(error) if error else {"stage": "queue", "type": "Unknown",
                                                       "message": "no record"}
                yield {"image": ref, "scalecap_record": {"error": err, "meta": {"job_id": j}}}

    def export(self, batch_id: str) -> str:
        """Write the batch's records as one JSONL object in its S3 sink; returns its URL."""
        sink = self.sink(self._batch(batch_id)["sink"])
        if not hasattr(sink, "export_jsonl"):
            raise ConfigError("export needs an S3 sink; use `scalecap results -o FILE` instead")
        locations = (loc for _, (loc,) in self._jobs(batch_id, ("location",)) if loc)
        return sink.export_jsonl(batch_id, locations)

    def list_batches(
        self, owner: str | None = None, *, offset: int = 0, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Status of batches, newest first: every batch, or only `owner`'s (paged)."""
        out = []
        for b in self.store.batch_ids(owner, offset=offset, limit=limit):
            try:
                out.append(self.status(b))
            except BatchNotFound:  # purged meanwhile
                continue
        return out

    def jobs(self, batch_id: str, *, offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """One page of a batch's jobs in arrival order: id, image, state, error (if any)."""
        self._batch(batch_id)
        ids = self.redis.zrange(batch_jobs_key(batch_id), offset, offset + max(limit, 0) - 1)
        ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        out = []
        for j, view in zip(ids, self.store.jobs_view(batch_id, ids), strict=True):
            v = view or {}
            out.append({"job_id": j, "image": v.get("ref"), "state": v.get("state"),
                        "error": json.loads(v["error"]) if v.get("error") else None,
                        "attempts": int(v.get("attempts") or 0), "has_record": bool(v.get("location"))})
        return out

    def record(self, batch_id: str, job_id: str) -> dict[str, Any] | None:
        """One image's row ({"image", "scalecap_record"}), or None while it has no record."""
        b = self._batch(batch_id)
        job = self.store.job(batch_id, job_id)
        if job is None:
            return None
        if job.get("location"):
            return self.sink(b["sink"]).read(job["location"])
        if job.get("state") == JobState.FAILED:
            err = json.loads(job["error"]) if job.get("error") else {
                "stage": "queue", "type": "Unknown", "message": "no record"}
            return {"image": job.get("ref"), "scalecap_record": {"error": err, "meta": {"job_id": job_id}}}
        return None

    def failures(self, batch_id: str, *, limit: int = 1000) -> dict[str, Any]:
        """A batch's failed jobs (job id, image, error) and its dead-letter entries."""
        self._batch(batch_id)
        failed = []
        for j, (state, ref, error) in self._jobs(batch_id, ("state", "ref", "error")):
            if state == JobState.FAILED:
                failed.append({"job_id": j, "image": ref, "error": json.loads(error) if error else None})
                if len(failed) >= limit:
                    break
        dead = [d for d in self.dead_letters(limit=10_000) if d.get("batch_id") == batch_id][:limit]
        return {"batch_id": batch_id, "failed": failed, "dead_letters": dead}

    # --- cancel ------------------------------------------------------------------------

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Stop a batch: queued jobs count cancelled now (and are skipped when delivered);
        running jobs finish. Returns the status afterwards."""
        self._batch(batch_id)
        self.store.request_cancel(batch_id)
        ids: list[str] = []
        for j in self.store.job_ids(batch_id):
            ids.append(j)
            if len(ids) >= 500:
                self.store.cancel_jobs(batch_id, ids)
                ids.clear()
        if ids:
            self.store.cancel_jobs(batch_id, ids)
        self.store.close(batch_id)  # the batch.completed event, if this finished it, is in the outbox
        return self.status(batch_id)

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(DEAD_LETTER_KEY, 0, limit - 1)]

    # --- repair and retention -------------------------------------------------------------

    def reconcile(self, grace: float | None = None) -> dict[str, int]:
        """One reconcile pass (what the I/O worker runs periodically): publish chunks noted
        unpublished for longer than `grace` s, take back expired leases, drain the outbox."""
        from scalecap.fleet.reconcile import Reconciler

        rec = Reconciler(self.app, self.store, self.settings)
        report = rec.reconcile(grace)
        drained = rec.drain()
        report.events, report.retries_due = drained.events, drained.retries_due
        return report.to_dict()

    def purge(self, batch_id: str, *, force: bool = False) -> bool:
        """Delete a batch's keys, index entries and Redis-sink records now (S3 records stay).

        An unfinished batch is refused (BatchUnfinished) unless `force`, which cancels it first,
        so its queued jobs give back their queued-image counts; a run still going finds the
        batch gone and writes nothing."""
        check_batch_id(batch_id)
        if self.store.unfinished(batch_id):
            if not force:
                raise BatchUnfinished(f"batch {batch_id} has not finished; cancel it first, or "
                                      "purge --force (cancels, then purges)")
            self.cancel(batch_id)
        return self.store.purge(batch_id, result_client=self.results_redis)

    def purge_finished_before(self, t: float) -> list[str]:
        """Purge every batch that finished before Unix time `t`; returns their ids."""
        gone: list[str] = []
        while True:
            ids = self.store.finished_before(t, 500)
            if not ids:
                return gone
            for b in ids:
                self.purge(b)
                gone.append(b)


__all__ = ["IO_QUEUE", "BatchNotFound", "BatchUnfinished", "FleetClient", "SubmitOptions", "SubmitResult"]
