"""The queue protocol shared by producers and workers (docs/protocol.md): `BatchStore`.

Every state change runs as one Lua script from scalecap/fleet/lua/*.lua (one file per
transition, loaded once per client, see scalecap/fleet/scripts.py). Counters move in the same
script as the job states they count, so they never drift; the script that finishes a batch
also writes its batch.completed event to the outbox, so the event cannot be lost between two
steps. Replies are the names of scalecap/fleet/outcomes.py. No Celery import here: the
producer's client and the HTTP API share this module without a worker's dependencies.

Names and keys live in scalecap/fleet/layout.py, the task message in
scalecap/fleet/messages.py; both are re-exported here, so `from scalecap.fleet.protocol import
...` keeps working.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from scalecap.errors import ConfigError
from scalecap.fleet.layout import (
    BATCHES_KEY,
    DEAD_LETTER_KEY,
    EVENT_BATCH_COMPLETED,
    EVENT_JOB_COMPLETED,
    FINISHED_KEY,
    GPU_QUEUE_PREFIX,
    IO_JOBS_QUEUE,
    IO_QUEUE,
    LEASES_KEY,
    OUTBOX_KEY,
    OWNERS_KEY,
    PREFIX,
    PROTOCOL_VERSION,
    QUARANTINE_SUFFIX,
    RECORD_PREFIX,
    RESULT_PREFIX,
    TASK_CAPTION,
    TASK_WEBHOOK,
    UNPUBLISHED_KEY,
    WEBHOOK_ATTEMPTS_KEPT,
    WEBHOOK_ATTEMPTS_SHOWN,
    WEBHOOK_RETRIES_KEY,
    batch_jobs_key,
    batch_key,
    check_batch_id,
    fleet_job_id,
    gpu_queue,
    job_states_key,
    new_batch_id,
    owner_batches_key,
    quarantine_queue,
    queue_queued_key,
    record_index_key,
    reply_key,
    results_prefix,
    slug,
    webhook_attempts_key,
)
from scalecap.fleet.messages import Chunk, JobMessage
from scalecap.fleet.messages import decode as _decode
from scalecap.fleet.outcomes import (
    FINAL_STATES,
    BatchReply,
    Claim,
    ClaimCode,
    CreateReply,
    Finish,
    FinishCode,
    JobState,
    LeaseReply,
    Outcome,
    RegisterCode,
    RunOutcome,
    Transition,
)
from scalecap.fleet.scripts import SCRIPTS, script_source
from scalecap.fleet.scripts import source as _source

STATES = tuple(JobState)
COUNTERS = ("total", *STATES, "dead_lettered", "stale_results")


class BatchMismatch(ConfigError):
    """A resubmission to an existing batch with another config, model or sink (nothing written)."""


def _job_view(raw: Any) -> dict[str, str] | None:
    """A job's JSON state in the shape callers read: state, ref, attempts, location, error..."""
    if raw is None:
        return None
    d = json.loads(raw)
    out = {"state": d.get("s", ""), "ref": d.get("r", ""), "attempts": str(d.get("a", 0)),
           "runs": str(d.get("n", 0)), "updated_at": str(d.get("u", ""))}
    if d.get("l"):
        out["location"] = d["l"]
    if d.get("e"):
        out["error"] = json.dumps(d["e"])
    if d.get("q"):
        out["quarantined"] = "1"
    return out


class BatchStore:
    """Batch and job state in Redis: every write that touches counters is one Lua script."""

    def __init__(self, redis_client: Any, *, retention: int = 7 * 24 * 3600) -> None:
        self.r = redis_client
        self.retention = int(retention)
        self._scripts = {name: redis_client.register_script(_source(name)) for name in SCRIPTS}

    def _keys(self, batch_id: str, queue: str = "", reply: str = "") -> list[str]:
        keys = [batch_key(batch_id), batch_jobs_key(batch_id), job_states_key(batch_id),
                webhook_attempts_key(batch_id), FINISHED_KEY, OUTBOX_KEY, DEAD_LETTER_KEY,
                LEASES_KEY, UNPUBLISHED_KEY, queue_queued_key(queue or "none"), OWNERS_KEY]
        return [*keys, reply_key(reply)] if reply else keys

    def _run(self, name: str, batch_id: str, args: list[Any], *, queue: str = "",
             reply: str = "", client: Any = None) -> Any:
        """One script call. No time goes in: the scripts read Redis' TIME (one clock)."""
        return self._scripts[name](keys=self._keys(batch_id, queue, reply),
                                   args=[batch_id, self.retention, *args], client=client)

    def now(self) -> float:
        """Redis' clock (Unix seconds): the one every deadline of the protocol is kept by."""
        sec, usec = self.r.time()
        return int(sec) + int(usec) / 1e6

    def run_script(self, name: str, batch_id: str, args: list[Any]) -> Any:
        """Run transition `name` with the KEYS and leading ARGV every script gets, then `args`
        (the session scripts, scalecap/fleet/sessions.py, read theirs from the end)."""
        return self._run(name, batch_id, args)

    def queue_of(self, batch_id: str) -> str:
        return _decode(self.r.hget(batch_key(batch_id), "queue") or b"")

    # --- batches -----------------------------------------------------------------------

    def create_batch(
        self,
        batch_id: str,
        *,
        config: dict[str, Any],
        config_hash: str,
        model: str,
        queue: str,
        sink: str,
        webhook: str | None = None,
        webhook_jobs: bool = False,
        owner: str | None = None,
    ) -> bool:
        """Create the batch (one script); False when it exists and was reopened for more jobs.

        Raises BatchMismatch, writing nothing, when the existing batch has another config,
        model or sink. `owner` (an HTTP API key id) scopes listing; '' is a direct producer."""
        res = self._run("create_batch", batch_id, [
            json.dumps(config, sort_keys=True), config_hash, model, queue, sink, webhook or "",
            "1" if webhook and webhook_jobs else "", owner or "", BATCHES_KEY,
            owner_batches_key(owner) if owner else "",
        ])
        res = [_decode(x) for x in res]
        if CreateReply(res[0]) is CreateReply.MISMATCH:
            raise BatchMismatch(
                f"batch {batch_id} exists with another {res[1]} ({res[2]!r}); resubmit with the "
                f"same {res[1]}, or use a new --batch-id"
            )
        return CreateReply(res[0]) is CreateReply.CREATED

    def batch(self, batch_id: str) -> dict[str, str] | None:
        raw = self.r.hgetall(batch_key(batch_id))
        if not raw:
            return None
        return {_decode(k): _decode(v) for k, v in raw.items()}

    def batch_ids(self, owner: str | None = None, *, offset: int = 0, limit: int = 50) -> list[str]:
        """Batch ids, newest first: all of them, or one owner's; paged by rank."""
        key = owner_batches_key(owner) if owner else BATCHES_KEY
        if limit <= 0:
            return []
        return [_decode(b) for b in self.r.zrevrange(key, offset, offset + limit - 1)]

    def count_batches(self, owner: str | None = None) -> int:
        return int(self.r.zcard(owner_batches_key(owner) if owner else BATCHES_KEY))

    def close(self, batch_id: str) -> Transition:
        return Transition(BatchReply(_decode(self._run("close_batch", batch_id, []))))

    def cancel_jobs(self, batch_id: str, job_ids: list[str]) -> int:
        """Mark the batch cancelled; count these jobs cancelled where still queued."""
        return int(self._run("cancel_jobs", batch_id, job_ids, queue=self.queue_of(batch_id)))

    def request_cancel(self, batch_id: str) -> None:
        self.cancel_jobs(batch_id, [])

    def job_ids(self, batch_id: str, count: int = 1000) -> Iterator[str]:
        """Every job id of the batch, each once, in arrival order, `count` per round trip.

        Jobs added meanwhile rank after those already read, so paging by rank neither skips
        nor repeats one.
        """
        key, start = batch_jobs_key(batch_id), 0
        while True:
            page = self.r.zrange(key, start, start + count - 1)
            yield from (_decode(j) for j in page)
            if len(page) < count:
                return
            start += count

    # --- jobs --------------------------------------------------------------------------

    def register_jobs(
        self,
        batch_id: str,
        jobs: Iterable[tuple[str, str, dict[str, Any] | None]],
        *,
        queue: str = "",
        chunk_id: str | None = None,
    ) -> tuple[list[RegisterCode], Chunk | None]:
        """Register (job_id, ref, error|None) in one script; an error makes a failed job.

        Returns a RegisterCode per job and the chunk to publish, already noted in
        `unpublished` (see `published`)."""
        args: list[Any] = [chunk_id or uuid.uuid4().hex, queue, quarantine_queue(queue or "none")]
        for job_id, ref, error in jobs:
            args += [job_id, ref, json.dumps(error) if error else ""]
        res = self._run("register_jobs", batch_id, args, queue=queue)
        member = _decode(res[0])
        return [RegisterCode(int(x)) for x in res[1:]], Chunk.parse(member) if member else None

    def published(self, *members: str, client: Any = None) -> None:
        """These chunks' messages are on the broker: forget them in `unpublished`."""
        if members:
            (client or self.r).zrem(UNPUBLISHED_KEY, *members)

    def job(self, batch_id: str, job_id: str) -> dict[str, str] | None:
        return _job_view(self.r.hget(job_states_key(batch_id), job_id))

    def jobs_view(self, batch_id: str, job_ids: list[str]) -> list[dict[str, str] | None]:
        if not job_ids:
            return []
        return [_job_view(x) for x in self.r.hmget(job_states_key(batch_id), job_ids)]

    def claim(
        self, batch_id: str, job_ids: list[str], *, token: str, lease_seconds: float,
        max_attempts: int, queue: str, quarantine: bool = False,
    ) -> Claim:
        """Claim a chunk for the run `token` (a lease of `lease_seconds` by Redis' clock).

        The reply is kept for a while: the same claim resent (a lost reply) answers alike."""
        res = self._run("claim_chunk", batch_id, [
            token, float(lease_seconds), int(max_attempts), "1" if quarantine else "0",
            quarantine_queue(queue), RECORD_PREFIX, *job_ids,
        ], queue=queue, reply=f"{token}:claim")
        res = [_decode(x) for x in res]
        if len(res) == 1 and ClaimCode(res[0]) is ClaimCode.MISSING:
            return Claim("", "", {j: (ClaimCode.MISSING, "") for j in job_ids})
        codes = {j: (ClaimCode(res[2 + 2 * i]), res[3 + 2 * i]) for i, j in enumerate(job_ids)}
        return Claim(res[0], res[1], codes)

    def finish(
        self, batch_id: str, outcomes: list[Outcome], *, token: str, lease: str, max_attempts: int,
        queue: str, sink: str, retry_in: float = 0.0, record_ttl: int | None = None,
    ) -> Finish:
        """Apply a run's outcomes where its jobs still hold `token`; retries due in `retry_in` s.

        The same finish resent (a lost reply) answers ok for the jobs it applied, not stale."""
        ttl = self.retention if record_ttl is None else record_ttl
        args: list[Any] = [token, lease, int(max_attempts), int(ttl or 0), RECORD_PREFIX, queue,
                           float(retry_in), sink]
        for o in outcomes:
            args += [o.job_id, str(o.outcome), o.location or "", json.dumps(o.error) if o.error else ""]
        res = [_decode(x) for x in self._run("finish_chunk", batch_id, args, queue=queue)]
        return Finish(BatchReply(res[0]), res[1],
                      {o.job_id: FinishCode(c) for o, c in zip(outcomes, res[2:], strict=True)})

    def expire_lease(self, lease: str, *, max_attempts: int) -> tuple[LeaseReply, Chunk | None]:
        """Requeue a dead run's jobs into the quarantine lane (charging a lost lone run).

        LIVE, changing nothing, unless the lease is past its deadline by Redis' clock."""
        d = json.loads(lease)
        b = d["b"]
        queue = self.queue_of(b)
        reply, member = (_decode(x) for x in self._run("expire_lease", b, [
            d["t"], lease, int(max_attempts), quarantine_queue(queue or "none"), *d["jobs"],
        ], queue=queue))
        return LeaseReply(reply), Chunk.parse(member) if member else None

    def renew_lease(self, lease: str, lease_seconds: float) -> LeaseReply:
        """Extend a live run's lease by `lease_seconds` from now (Redis' clock); LOST when no
        job of it still holds its token (the run must stop and write nothing)."""
        d = json.loads(lease)
        res = self._run("renew_lease", d["b"], [d["t"], lease, float(lease_seconds), *d["jobs"]])
        return LeaseReply(_decode(res[0]))

    # --- retention and purge ------------------------------------------------------------

    def purge(self, batch_id: str, *, result_client: Any = None) -> bool:
        """Delete every key of a batch and its index entries (and its Redis-sink records)."""
        owner = _decode(self.r.hget(OWNERS_KEY, batch_id) or b"") or _decode(
            self.r.hget(batch_key(batch_id), "owner") or b"")
        rc = result_client or self.r
        prefix = results_prefix(batch_id)
        cursor = 0
        while True:  # the batch's records in the Redis sink
            cursor, keys = rc.scan(cursor, match=prefix + "*", count=1000)
            if keys:
                rc.unlink(*keys)
            if not cursor:
                break
        existed = bool(self.r.unlink(batch_key(batch_id), batch_jobs_key(batch_id),
                                     job_states_key(batch_id), webhook_attempts_key(batch_id)))
        pipe = self.r.pipeline(transaction=False)
        pipe.zrem(BATCHES_KEY, batch_id)
        pipe.zrem(FINISHED_KEY, batch_id)
        pipe.hdel(OWNERS_KEY, batch_id)
        if owner:
            pipe.zrem(owner_batches_key(owner), batch_id)
        removed = pipe.execute()
        return existed or bool(removed[0])

    def unfinished(self, batch_id: str) -> bool:
        """The batch exists and has not finished (purge refuses it unless forced)."""
        created, finished = self.r.hmget(batch_key(batch_id), "created_at", "finished_at")
        return created is not None and finished is None

    def finished_before(self, t: float, limit: int = 1000) -> list[str]:
        return [_decode(b) for b in self.r.zrangebyscore(FINISHED_KEY, "-inf", t, start=0, num=limit)]

    def forget_expired(self, now_t: float | None = None, limit: int = 1000) -> int:
        """Index entries of batches whose keys expired with the retention: remove them.

        Retention 0 keeps everything until `purge`."""
        if self.retention <= 0:
            return 0
        t = (now_t or self.now()) - self.retention
        gone = 0
        for b in self.finished_before(t, limit):
            if self.r.exists(batch_key(b)) and self.r.ttl(batch_key(b)) < 0:
                continue  # reopened and kept (PERSIST)
            self.purge(b)
            gone += 1
        return gone


def counts(batch: dict[str, str]) -> dict[str, int]:
    return {c: int(batch.get(c) or 0) for c in COUNTERS}


__all__ = [
    "BATCHES_KEY",
    "COUNTERS",
    "DEAD_LETTER_KEY",
    "EVENT_BATCH_COMPLETED",
    "EVENT_JOB_COMPLETED",
    "FINAL_STATES",
    "FINISHED_KEY",
    "GPU_QUEUE_PREFIX",
    "IO_JOBS_QUEUE",
    "IO_QUEUE",
    "LEASES_KEY",
    "OUTBOX_KEY",
    "OWNERS_KEY",
    "PREFIX",
    "PROTOCOL_VERSION",
    "QUARANTINE_SUFFIX",
    "RECORD_PREFIX",
    "RESULT_PREFIX",
    "SCRIPTS",
    "STATES",
    "TASK_CAPTION",
    "TASK_WEBHOOK",
    "UNPUBLISHED_KEY",
    "WEBHOOK_ATTEMPTS_KEPT",
    "WEBHOOK_ATTEMPTS_SHOWN",
    "WEBHOOK_RETRIES_KEY",
    "BatchMismatch",
    "BatchReply",
    "BatchStore",
    "Chunk",
    "Claim",
    "ClaimCode",
    "CreateReply",
    "Finish",
    "FinishCode",
    "JobMessage",
    "JobState",
    "LeaseReply",
    "Outcome",
    "RegisterCode",
    "RunOutcome",
    "Transition",
    "batch_jobs_key",
    "batch_key",
    "check_batch_id",
    "counts",
    "fleet_job_id",
    "gpu_queue",
    "job_states_key",
    "new_batch_id",
    "owner_batches_key",
    "quarantine_queue",
    "queue_queued_key",
    "record_index_key",
    "reply_key",
    "results_prefix",
    "script_source",
    "slug",
    "webhook_attempts_key",
]
