"""The queue protocol shared by producers and workers (docs/protocol.md).

Names (tasks, queues), the Redis key layout, the JSON task message (a chunk of K images), and
`BatchStore`, whose every state change runs as one Lua script from scalecap/fleet/lua/*.lua (one
file per transition, loaded once per client). Counters move in the same script as the job
states they count, so they never drift; the script that finishes a batch also writes its
batch.completed event to the outbox, so the event cannot be lost between two steps. No Celery
import here: the producer's client and the HTTP API share this module without a worker's
dependencies.

Key layout (prefix `scalecap:`), every batch key with a TTL of SCALECAP_RETENTION once the
batch finishes:
  batch:{b}                  hash: counters (total, queued, running, done, failed, cancelled,
                             dead_lettered, stale_results), config (JSON), config_hash, model,
                             queue, sink, webhook, webhook_jobs ("1"), owner, created_at,
                             started_at, closed, closed_at, cancel_requested, finished_at,
                             seq (arrival counter), completions, webhook_status
  batch:{b}:jobs             sorted set: job ids by arrival (paged by rank)
  batch:{b}:job              hash: job id -> JSON {s state, r ref, a charged attempts, n runs,
                             t attempt token, d lease deadline, q quarantined, l location,
                             e error, u updated_at}
  batch:{b}:webhook_attempts list of JSON webhook attempt records
  record:{j}                 string (TTL = retention): JSON {"sink", "location"} of a finished
                             record, across batches
  dead_letter                list (newest first, capped) of jobs that ran out of attempts
  batches, owner:{o}:batches sorted sets of batch ids by creation time; owners: hash b -> owner
  finished                   sorted set of finished batch ids by finish time (retention, purge)
  outbox                     list of JSON events waiting for the I/O worker
  webhook_retries            sorted set of JSON events by when their next attempt is due
  unpublished                sorted set of JSON chunks registered (or requeued) whose message
                             is not yet known to be on the broker, by when it is due
  leases                     sorted set of JSON {b, t, jobs} of running chunks, by deadline
  queue:{q}:queued           images queued for queue q (submit backpressure)
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from scalecap.errors import ConfigError

PROTOCOL_VERSION = 2

# --- names ---------------------------------------------------------------------------------

TASK_CAPTION = "scalecap.caption"
TASK_WEBHOOK = "scalecap.deliver_webhook"
IO_QUEUE = "scalecap.io"
"""The I/O worker's lane for batch events (and the default queue)."""
IO_JOBS_QUEUE = "scalecap.io.jobs"
"""The I/O worker's lane for per-job events, so batch events never wait behind them."""
GPU_QUEUE_PREFIX = "scalecap.gpu."
QUARANTINE_SUFFIX = ".quarantine"
EVENT_BATCH_COMPLETED = "batch.completed"
EVENT_JOB_COMPLETED = "job.completed"

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")
COUNTERS = ("total", *STATES, "dead_lettered", "stale_results")

PREFIX = "scalecap:"
DEAD_LETTER_KEY = PREFIX + "dead_letter"
BATCHES_KEY = PREFIX + "batches"
OWNERS_KEY = PREFIX + "owners"
FINISHED_KEY = PREFIX + "finished"
OUTBOX_KEY = PREFIX + "outbox"
WEBHOOK_RETRIES_KEY = PREFIX + "webhook_retries"
UNPUBLISHED_KEY = PREFIX + "unpublished"
LEASES_KEY = PREFIX + "leases"
RECORD_PREFIX = PREFIX + "record:"
WEBHOOK_ATTEMPTS_SHOWN = 100
"""`status` shows the newest this many webhook attempts (and the total)."""
WEBHOOK_ATTEMPTS_KEPT = 1000
"""A batch's attempt log is trimmed to the newest this many."""


def slug(model: str) -> str:
    """A queue-safe name for a model: a hub id keeps its org, a local path its last part."""
    name = model.strip().rstrip("/")
    if name.startswith(("/", "./", "../", "~", "file:")):
        name = name.rsplit("/", 1)[-1]
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not s:
        raise ConfigError(f"cannot derive a queue name from model {model!r}")
    return s


def gpu_queue(model: str) -> str:
    """The queue the workers holding `model` consume."""
    return GPU_QUEUE_PREFIX + slug(model)


def quarantine_queue(queue: str) -> str:
    """The lane where jobs whose run was lost run again, one at a time per worker."""
    return queue if queue.endswith(QUARANTINE_SUFFIX) else queue + QUARANTINE_SUFFIX


def fleet_job_id(ref: str, config_hash: str, model: str) -> str:
    """The job id of one image under one config on one model: resubmitting it is idempotent."""
    from scalecap.record import job_id

    return job_id(ref, f"{config_hash}:{slug(model)}")


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}"


def batch_jobs_key(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}:jobs"


def job_states_key(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}:job"


def webhook_attempts_key(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}:webhook_attempts"


def owner_batches_key(owner: str) -> str:
    return f"{PREFIX}owner:{owner}:batches"


def queue_queued_key(queue: str) -> str:
    return f"{PREFIX}queue:{queue.removesuffix(QUARANTINE_SUFFIX)}:queued"


def record_index_key(job_id: str) -> str:
    return RECORD_PREFIX + job_id


_BATCH_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def new_batch_id() -> str:
    return uuid.uuid4().hex


def check_batch_id(batch_id: str) -> str:
    if not _BATCH_ID.match(batch_id):
        raise ConfigError(f"batch id {batch_id!r}: use 1-128 of A-Z a-z 0-9 . _ -")
    return batch_id


class BatchMismatch(ConfigError):
    """A resubmission to an existing batch with another config, model or sink (nothing written)."""


# --- the task message -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobMessage:
    """The body of one caption task: a chunk of (job id, image ref) of one batch, JSON only.

    Thin: the config lives in the batch hash (and in each worker's cache). Each image keeps its
    own job state, attempts and record; the chunk shares one claim and one finish script.
    `quarantine`: the chunk runs in the quarantine lane (alone in its worker).
    """

    batch_id: str
    jobs: tuple[tuple[str, str], ...]
    quarantine: bool = False
    v: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": self.v, "batch_id": self.batch_id,
                               "jobs": [list(j) for j in self.jobs]}
        if self.quarantine:
            out["quarantine"] = True
        return out

    @classmethod
    def from_json(cls, data: Any) -> JobMessage:
        if not isinstance(data, dict):
            raise ValueError(f"job message must be an object, got {type(data).__name__}")
        if data.get("v") != PROTOCOL_VERSION:
            raise ValueError(f"unsupported job message version {data.get('v')!r}")
        try:
            jobs = tuple((str(j), str(r)) for j, r in data["jobs"])
            return cls(batch_id=str(data["batch_id"]), jobs=jobs,
                       quarantine=bool(data.get("quarantine")))
        except KeyError as exc:
            raise ValueError(f"job message lacks {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ValueError(f"job message jobs must be [job_id, ref] pairs: {exc}") from exc


@dataclass(frozen=True)
class Chunk:
    """A chunk noted in `unpublished` (or a lease): decoded from its JSON member."""

    member: str
    batch_id: str
    queue: str
    jobs: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, member: str | bytes) -> Chunk:
        m = _decode(member)
        d = json.loads(m)
        return cls(m, d["b"], d.get("q", ""), tuple((j, r) for j, r in d.get("jobs") or []))

    @property
    def quarantine(self) -> bool:
        return self.queue.endswith(QUARANTINE_SUFFIX)

    def messages(self, k: int) -> Iterator[JobMessage]:
        """The chunk as task messages of at most k images (one image each in quarantine)."""
        k = 1 if self.quarantine else max(1, int(k))
        for i in range(0, len(self.jobs), k):
            yield JobMessage(self.batch_id, self.jobs[i : i + k], self.quarantine)


# --- Lua ---------------------------------------------------------------------------------

SCRIPTS = ("create_batch", "register_jobs", "claim_chunk", "finish_chunk", "close_batch",
           "cancel_jobs", "expire_lease")


def script_source(name: str) -> str:
    """One transition's Lua: scalecap/fleet/lua/lib.lua followed by `name`.lua."""
    pkg = resources.files("scalecap.fleet.lua")
    return pkg.joinpath("lib.lua").read_text() + "\n" + pkg.joinpath(f"{name}.lua").read_text()


_SOURCES: dict[str, str] = {}


def _source(name: str) -> str:
    if name not in _SOURCES:
        _SOURCES[name] = script_source(name)
    return _SOURCES[name]


def now() -> str:
    """Timestamps are Unix seconds with millisecond precision, as strings (Redis hash values)."""
    return f"{time.time():.3f}"


def _decode(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


@dataclass
class Transition:
    """The outcome of one state change; `completed` is true for exactly one caller per batch."""

    result: str

    @property
    def completed(self) -> bool:
        return self.result == "completed"

    @property
    def applied(self) -> bool:
        return self.result in ("ok", "completed")


@dataclass
class Claim:
    """What claim_chunk decided for each job of a chunk."""

    lease: str
    quarantine: str
    """The unpublished member of jobs sent to the quarantine lane ('' if none)."""
    codes: dict[str, tuple[str, str]] = field(default_factory=dict)
    """job id -> (code, detail): run (detail: record index entry JSON or ''), final, busy, skip,
    quarantined, dead, cancelled, missing."""

    def runnable(self) -> list[str]:
        return [j for j, (c, _) in self.codes.items() if c == "run"]


@dataclass
class Outcome:
    """One job's result of a run, for finish_chunk."""

    job_id: str
    outcome: str
    """done | failed | retry (charged) | requeue (not the job's fault)."""
    location: str = ""
    error: dict[str, Any] | None = None


@dataclass
class Finish:
    result: str
    retry: str
    """The unpublished member of jobs queued again ('' if none)."""
    codes: dict[str, str] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.result == "completed"


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

    def _keys(self, batch_id: str, queue: str = "") -> list[str]:
        return [batch_key(batch_id), batch_jobs_key(batch_id), job_states_key(batch_id),
                webhook_attempts_key(batch_id), FINISHED_KEY, OUTBOX_KEY, DEAD_LETTER_KEY,
                LEASES_KEY, UNPUBLISHED_KEY, queue_queued_key(queue or "none"), OWNERS_KEY]

    def _run(self, name: str, batch_id: str, args: list[Any], *, queue: str = "",
             client: Any = None) -> Any:
        return self._scripts[name](keys=self._keys(batch_id, queue),
                                   args=[batch_id, now(), self.retention, *args], client=client)

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
        if res[0] == "mismatch":
            raise BatchMismatch(
                f"batch {batch_id} exists with another {res[1]} ({res[2]!r}); resubmit with the "
                f"same {res[1]}, or use a new --batch-id"
            )
        return res[0] == "created"

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
        return Transition(_decode(self._run("close_batch", batch_id, [])))

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
    ) -> tuple[list[int], Chunk | None]:
        """Register (job_id, ref, error|None) in one script; an error makes a failed job.

        Returns a code per job (1 new, 2 known and not final, 3 new and failed, 0 nothing to
        do) and the chunk to publish, already noted in `unpublished` (see `published`)."""
        args: list[Any] = [chunk_id or uuid.uuid4().hex, queue]
        for job_id, ref, error in jobs:
            args += [job_id, ref, json.dumps(error) if error else ""]
        res = self._run("register_jobs", batch_id, args, queue=queue)
        member = _decode(res[0])
        return [int(x) for x in res[1:]], Chunk.parse(member) if member else None

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
        deadline = f"{time.time() + lease_seconds:.3f}"
        res = self._run("claim_chunk", batch_id, [
            token, deadline, int(max_attempts), "1" if quarantine else "0",
            quarantine_queue(queue), RECORD_PREFIX, *job_ids,
        ], queue=queue)
        res = [_decode(x) for x in res]
        if res[0] == "missing" and len(res) == 1:
            return Claim("", "", {j: ("missing", "") for j in job_ids})
        codes = {j: (res[2 + 2 * i], res[3 + 2 * i]) for i, j in enumerate(job_ids)}
        return Claim(res[0], res[1], codes)

    def finish(
        self, batch_id: str, outcomes: list[Outcome], *, token: str, lease: str, max_attempts: int,
        queue: str, sink: str, retry_in: float = 0.0, record_ttl: int | None = None,
    ) -> Finish:
        ttl = self.retention if record_ttl is None else record_ttl
        args: list[Any] = [token, lease, int(max_attempts), int(ttl or 0), RECORD_PREFIX, queue,
                           f"{time.time() + retry_in:.3f}", sink]
        for o in outcomes:
            args += [o.job_id, o.outcome, o.location or "", json.dumps(o.error) if o.error else ""]
        res = [_decode(x) for x in self._run("finish_chunk", batch_id, args, queue=queue)]
        return Finish(res[0], res[1], {o.job_id: c for o, c in zip(outcomes, res[2:], strict=True)})

    def expire_lease(self, lease: str, *, max_attempts: int) -> Chunk | None:
        """Requeue a dead run's jobs into the quarantine lane (charging a lost lone run)."""
        d = json.loads(lease)
        b = d["b"]
        queue = self.queue_of(b)
        member = _decode(self._run("expire_lease", b, [
            d["t"], lease, int(max_attempts), quarantine_queue(queue or "none"), *d["jobs"],
        ], queue=queue))
        return Chunk.parse(member) if member else None

    # --- retention and purge ------------------------------------------------------------

    def purge(self, batch_id: str, *, result_client: Any = None) -> bool:
        """Delete every key of a batch and its index entries (and its Redis-sink records)."""
        from scalecap.fleet.sinks import REDIS_PREFIX

        owner = _decode(self.r.hget(OWNERS_KEY, batch_id) or b"") or _decode(
            self.r.hget(batch_key(batch_id), "owner") or b"")
        rc = result_client or self.r
        prefix = f"{REDIS_PREFIX}{batch_id}:"
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

    def finished_before(self, t: float, limit: int = 1000) -> list[str]:
        return [_decode(b) for b in self.r.zrangebyscore(FINISHED_KEY, "-inf", t, start=0, num=limit)]

    def forget_expired(self, now_t: float | None = None, limit: int = 1000) -> int:
        """Index entries of batches whose keys expired with the retention: remove them.

        Retention 0 keeps everything until `purge`."""
        if self.retention <= 0:
            return 0
        t = (now_t or time.time()) - self.retention
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
    "IO_JOBS_QUEUE",
    "IO_QUEUE",
    "LEASES_KEY",
    "OUTBOX_KEY",
    "STATES",
    "TASK_CAPTION",
    "TASK_WEBHOOK",
    "UNPUBLISHED_KEY",
    "WEBHOOK_RETRIES_KEY",
    "BatchMismatch",
    "BatchStore",
    "Chunk",
    "Claim",
    "Finish",
    "JobMessage",
    "Outcome",
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
    "slug",
    "webhook_attempts_key",
]
