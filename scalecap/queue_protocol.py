"""The queue protocol shared by producers and workers (DESIGN.md "Queue protocol").

Names (tasks, queues), the Redis key schema, the JSON job message, and the atomic batch counter
updates as Lua scripts. Every state change of a job moves one count from one counter to another
in one script, so counters never drift and exactly one caller sees a batch complete (and only that
caller enqueues the batch.completed webhook). No Celery import here: the producer's client and the
HTTP API share this module without a worker's dependencies.

Key schema (prefix `scalecap:`):
  batch:{b}                 hash: counters (total, queued, running, done, failed, cancelled,
                            dead_lettered), config (JSON), config_hash, model, queue, sink,
                            webhook, webhook_jobs ("1": also job.completed events),
                            created_at, started_at, closed ("1"), closed_at,
                            cancel_requested ("1"), finished_at, owner (API key id or '')
  batch:{b}:jobs            sorted set of the batch's job ids by arrival (dedupes repeated images)
  batch:{b}:webhook_attempts list of JSON attempt records (webhook delivery)
  job:{b}:{j}               hash: state, ref, attempts, location, error (JSON), updated_at
  record:{j}                string: JSON {"sink", "location"} of a finished record, across
                            batches: a resubmitted job that is done is not run again
  dead_letter               list of JSON entries of jobs that ran out of attempts
  batches                   sorted set of batch ids by creation time
  owner:{o}:batches         sorted set of one owner's batch ids by creation time (HTTP API keys)
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from scalecap.errors import ConfigError

PROTOCOL_VERSION = 1

# --- names ---------------------------------------------------------------------------------

TASK_CAPTION = "scalecap.caption"
TASK_WEBHOOK = "scalecap.deliver_webhook"
IO_QUEUE = "scalecap.io"
GPU_QUEUE_PREFIX = "scalecap.gpu."
EVENT_BATCH_COMPLETED = "batch.completed"
EVENT_JOB_COMPLETED = "job.completed"

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")
COUNTERS = ("total", *STATES, "dead_lettered")

PREFIX = "scalecap:"
DEAD_LETTER_KEY = PREFIX + "dead_letter"
BATCHES_KEY = PREFIX + "batches"


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


def fleet_job_id(ref: str, config_hash: str, model: str) -> str:
    """The job id of one image under one config on one model: resubmitting it is idempotent."""
    from scalecap.record import job_id

    return job_id(ref, f"{config_hash}:{slug(model)}")


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}"


def batch_jobs_key(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}:jobs"


def webhook_attempts_key(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}:webhook_attempts"


def owner_batches_key(owner: str) -> str:
    return f"{PREFIX}owner:{owner}:batches"


def job_key(batch_id: str, job_id: str) -> str:
    return f"{PREFIX}job:{batch_id}:{job_id}"


def record_index_key(job_id: str) -> str:
    return f"{PREFIX}record:{job_id}"


_BATCH_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def new_batch_id() -> str:
    return uuid.uuid4().hex


def check_batch_id(batch_id: str) -> str:
    if not _BATCH_ID.match(batch_id):
        raise ConfigError(f"batch id {batch_id!r}: use 1-128 of A-Z a-z 0-9 . _ -")
    return batch_id


# --- the job message -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobMessage:
    """The body of one caption task: JSON only, and thin (the config lives in the batch hash)."""

    batch_id: str
    job_id: str
    ref: str
    v: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> JobMessage:
        if not isinstance(data, dict):
            raise ValueError(f"job message must be an object, got {type(data).__name__}")
        if data.get("v") != PROTOCOL_VERSION:
            raise ValueError(f"unsupported job message version {data.get('v')!r}")
        try:
            return cls(batch_id=str(data["batch_id"]), job_id=str(data["job_id"]), ref=str(data["ref"]))
        except KeyError as exc:
            raise ValueError(f"job message lacks {exc.args[0]!r}") from exc


# --- Lua ---------------------------------------------------------------------------------

# Sets finished_at exactly once, when submission is closed and every job is final.
_FINISH = """
local function finish(batch, now)
  local h = redis.call('HMGET', batch, 'closed', 'finished_at', 'total', 'done', 'failed', 'cancelled')
  if h[1] ~= '1' or h[2] then return false end
  local final = tonumber(h[4] or '0') + tonumber(h[5] or '0') + tonumber(h[6] or '0')
  if final < tonumber(h[3] or '0') then return false end
  redis.call('HSET', batch, 'finished_at', now)
  return true
end
"""

# KEYS: batch, jobs index, job hash. ARGV: job_id, ref, state (queued|failed), now, error JSON|''.
# Returns 1 when registered, 0 when the batch already holds this job. The index is a sorted set
# scored by arrival (its size before the add), so it can be paged by rank, without duplicates.
REGISTER_LUA = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], redis.call('ZCARD', KEYS[2]), ARGV[1])
redis.call('HSET', KEYS[3], 'state', ARGV[3], 'ref', ARGV[2], 'attempts', 0, 'updated_at', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], 'error', ARGV[5]) end
redis.call('HINCRBY', KEYS[1], 'total', 1)
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
return 1
"""

# KEYS: batch, job hash, dead-letter list, record index. ARGV: to, now, expected from ('' = any
# non-final), dead-letter entry JSON ('' = none), record index entry JSON ('' = none), its TTL in
# seconds ('0' = none), then field/value pairs for the job hash.
# Returns 'completed' (this call finished the batch), 'ok', 'missing', 'final:<s>', 'skip:<s>'.
TRANSITION_LUA = (
    _FINISH
    + """
local old = redis.call('HGET', KEYS[2], 'state')
if not old then return 'missing' end
if old == 'done' or old == 'failed' or old == 'cancelled' then return 'final:' .. old end
if ARGV[3] ~= '' and old ~= ARGV[3] then return 'skip:' .. old end
local to = ARGV[1]
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], 'state', to, 'updated_at', ARGV[2])
if old ~= to then
  redis.call('HINCRBY', KEYS[1], old, -1)
  redis.call('HINCRBY', KEYS[1], to, 1)
end
if to == 'running' then redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2]) end
if ARGV[4] ~= '' then
  redis.call('LPUSH', KEYS[3], ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'dead_lettered', 1)
end
if ARGV[5] ~= '' then
  if ARGV[6] ~= '0' then redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[6])
  else redis.call('SET', KEYS[4], ARGV[5]) end
end
if to == 'done' or to == 'failed' or to == 'cancelled' then
  if finish(KEYS[1], ARGV[2]) then return 'completed' end
end
return 'ok'
"""
)

# KEYS: batch, job hash. ARGV: now, max_attempts.
# Counts one delivery and marks the job running: {'run', n}, {'exhausted', n}, {'final:<s>', 0},
# {'missing', 0}. An exhausted job keeps its state for the caller to dead-letter.
CLAIM_LUA = """
local old = redis.call('HGET', KEYS[2], 'state')
if not old then return {'missing', 0} end
if old == 'done' or old == 'failed' or old == 'cancelled' then return {'final:' .. old, 0} end
local n = redis.call('HINCRBY', KEYS[2], 'attempts', 1)
if n > tonumber(ARGV[2]) then return {'exhausted', n} end
if old ~= 'running' then
  redis.call('HINCRBY', KEYS[1], old, -1)
  redis.call('HINCRBY', KEYS[1], 'running', 1)
  redis.call('HSET', KEYS[2], 'state', 'running', 'updated_at', ARGV[1])
end
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
return {'run', n}
"""

# KEYS: batch. ARGV: now. Closes submission; 'completed' when that finished the batch.
CLOSE_LUA = (
    _FINISH
    + """
if not redis.call('HGET', KEYS[1], 'created_at') then return 'missing' end
redis.call('HSET', KEYS[1], 'closed', '1', 'closed_at', ARGV[1])
if finish(KEYS[1], ARGV[1]) then return 'completed' end
return 'ok'
"""
)


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


class BatchStore:
    """Batch and job state in Redis: every write that touches counters runs as one Lua script."""

    def __init__(self, redis_client: Any) -> None:
        self.r = redis_client
        self._register = redis_client.register_script(REGISTER_LUA)
        self._transition = redis_client.register_script(TRANSITION_LUA)
        self._claim = redis_client.register_script(CLAIM_LUA)
        self._close = redis_client.register_script(CLOSE_LUA)

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
        """Create the batch hash; False when it already exists (a resubmission adds to it).

        `owner` (an HTTP API key id) scopes listing and access; '' means a direct producer."""
        key = batch_key(batch_id)
        created = self.r.hsetnx(key, "created_at", now())
        if created:
            fields = {c: 0 for c in COUNTERS}
            fields.update(
                config=json.dumps(config, sort_keys=True),
                config_hash=config_hash,
                model=model,
                queue=queue,
                sink=sink,
                webhook=webhook or "",
                webhook_jobs="1" if webhook and webhook_jobs else "",
                owner=owner or "",
            )
            self.r.hset(key, mapping=fields)
            t = time.time()
            self.r.zadd(BATCHES_KEY, {batch_id: t})
            if owner:
                self.r.zadd(owner_batches_key(owner), {batch_id: t})
        else:
            # Reopen: new jobs may arrive; the batch finishes again when they are final.
            self.r.hdel(key, "closed", "finished_at")
        return bool(created)

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
        return Transition(_decode(self._close(keys=[batch_key(batch_id)], args=[now()])))

    def request_cancel(self, batch_id: str) -> None:
        self.r.hset(batch_key(batch_id), "cancel_requested", "1")

    def job_ids(self, batch_id: str, count: int = 1000) -> Iterator[str]:
        """Every job id of the batch, each once, in arrival order, `count` per round trip.

        Jobs added meanwhile rank after those already read, so paging by rank neither skips
        nor repeats one (Redis' SSCAN could repeat; deduplicating would cost memory per job).
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
        self, batch_id: str, jobs: Iterable[tuple[str, str, dict[str, Any] | None]]
    ) -> list[bool]:
        """Register (job_id, ref, error|None) in one round trip; an error makes a failed job."""
        pipe = self.r.pipeline(transaction=False)
        t = now()
        bk, sk = batch_key(batch_id), batch_jobs_key(batch_id)
        for job_id, ref, error in jobs:
            state = "failed" if error else "queued"
            err = json.dumps(error) if error else ""
            self._register(keys=[bk, sk, job_key(batch_id, job_id)],
                           args=[job_id, ref, state, t, err], client=pipe)
        return [bool(x) for x in pipe.execute()]

    def job(self, batch_id: str, job_id: str) -> dict[str, str] | None:
        raw = self.r.hgetall(job_key(batch_id, job_id))
        if not raw:
            return None
        return {_decode(k): _decode(v) for k, v in raw.items()}

    def claim(self, batch_id: str, job_id: str, max_attempts: int) -> tuple[str, int]:
        res, n = self._claim(keys=[batch_key(batch_id), job_key(batch_id, job_id)],
                             args=[now(), int(max_attempts)])
        return _decode(res), int(n)

    def transition(
        self,
        batch_id: str,
        job_id: str,
        to: str,
        *,
        expected: str | None = None,
        dead_letter: dict[str, Any] | None = None,
        remember: tuple[str, str, int | None] | None = None,
        client: Any = None,
        **fields: Any,
    ) -> Transition:
        """Move a job to `to` (one count from its old counter to the new one) and set fields.

        `dead_letter` pushes an entry to the dead-letter list; `remember=(sink, location, ttl)`
        notes where the finished record is, for later batches of the same work (same script, so
        one round trip).
        """
        if to not in STATES:
            raise ValueError(f"unknown state {to!r}")
        entry = json.dumps({"sink": remember[0], "location": remember[1]}) if remember else ""
        ttl = str(int(remember[2] or 0)) if remember else "0"
        args: list[Any] = [to, now(), expected or "", json.dumps(dead_letter) if dead_letter else "",
                           entry, ttl]
        for k, v in fields.items():
            if v is None:
                continue
            args += [k, v if isinstance(v, (str, int, float)) else json.dumps(v)]
        res = self._transition(
            keys=[batch_key(batch_id), job_key(batch_id, job_id), DEAD_LETTER_KEY,
                  record_index_key(job_id)],
            args=args,
            client=client,
        )
        return Transition(_decode(res)) if client is None else Transition("pipelined")

    def snapshot(
        self, batch_id: str, job_id: str
    ) -> tuple[dict[str, str] | None, dict[str, str] | None, dict[str, str] | None]:
        """(batch, job, record-index entry) in one round trip: what a worker reads per job."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(batch_key(batch_id))
        pipe.hgetall(job_key(batch_id, job_id))
        pipe.get(record_index_key(job_id))
        batch, job, entry = pipe.execute()

        def dec(h: dict[Any, Any]) -> dict[str, str] | None:
            return {_decode(k): _decode(v) for k, v in h.items()} if h else None

        try:
            known = json.loads(entry) if entry else None
        except ValueError:
            known = None
        return dec(batch), dec(job), known if isinstance(known, dict) else None

    # --- records across batches ---------------------------------------------------------

    def remember_record(
        self, job_id: str, sink: str, location: str, ttl: int | None = None, client: Any = None
    ) -> None:
        """Note where job_id's finished record is, for later batches of the same work."""
        (client or self.r).set(
            record_index_key(job_id), json.dumps({"sink": sink, "location": location}), ex=ttl
        )

    def known_record(self, job_id: str, sink: str) -> str | None:
        """Where a finished record of this job lives in this sink, if a batch wrote one."""
        raw = self.r.get(record_index_key(job_id))
        if not raw:
            return None
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        return entry.get("location") if entry.get("sink") == sink else None


def counts(batch: dict[str, str]) -> dict[str, int]:
    return {c: int(batch.get(c) or 0) for c in COUNTERS}


__all__ = [
    "BATCHES_KEY",
    "COUNTERS",
    "DEAD_LETTER_KEY",
    "EVENT_BATCH_COMPLETED",
    "EVENT_JOB_COMPLETED",
    "FINAL_STATES",
    "IO_QUEUE",
    "STATES",
    "TASK_CAPTION",
    "TASK_WEBHOOK",
    "BatchStore",
    "JobMessage",
    "Transition",
    "batch_jobs_key",
    "batch_key",
    "check_batch_id",
    "counts",
    "fleet_job_id",
    "gpu_queue",
    "job_key",
    "new_batch_id",
    "owner_batches_key",
    "record_index_key",
    "slug",
    "webhook_attempts_key",
]
