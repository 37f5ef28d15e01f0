"""Names the fleet shares: task and queue names, and the Redis key layout (docs/protocol.md).

The key prefix is defined here once; every other module (sinks, API keys, presence, the
reconciler's locks, results locations) builds its keys from `PREFIX`.

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
                             e error, u updated_at, w token of the run whose finish applied}
  batch:{b}:webhook_attempts list of JSON webhook attempt records
  record:{j}                 string (TTL = retention): JSON {"sink", "location"} of a finished
                             record, across batches
  result:{b}:{j}             string (the Redis sink): a job's record, with a TTL
  dead_letter                list (newest first, capped) of jobs that ran out of attempts
  batches, owner:{o}:batches sorted sets of batch ids by creation time; owners: hash b -> owner
  finished                   sorted set of finished batch ids by finish time (retention, purge)
  outbox                     list of JSON events waiting for the I/O worker
  webhook_retries            sorted set of JSON events by when their next attempt is due
  unpublished                sorted set of JSON chunks registered (or requeued) whose message
                             is not yet known to be on the broker, by when it is due
  leases                     sorted set of JSON {b, t, jobs} of running chunks, by deadline
  reply:{t}:claim            string (TTL 120 s): a claim's reply, so the claim resent after a
                             lost reply answers as the first did
  queue:{q}:queued           images queued for queue q (submit backpressure)
"""

from __future__ import annotations

import re
import uuid

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

# --- keys ----------------------------------------------------------------------------------

PREFIX = "scalecap:"
"""Every Redis key of the fleet starts with this (the only place it is spelled)."""
DEAD_LETTER_KEY = PREFIX + "dead_letter"
BATCHES_KEY = PREFIX + "batches"
OWNERS_KEY = PREFIX + "owners"
FINISHED_KEY = PREFIX + "finished"
OUTBOX_KEY = PREFIX + "outbox"
WEBHOOK_RETRIES_KEY = PREFIX + "webhook_retries"
UNPUBLISHED_KEY = PREFIX + "unpublished"
LEASES_KEY = PREFIX + "leases"
RECORD_PREFIX = PREFIX + "record:"
RESULT_PREFIX = PREFIX + "result:"
"""The Redis sink's records: `result:{batch}:{job}`."""
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


def fleet_job_id(ref: str, config_hash: str, model: str, owner: str = "") -> str:
    """The job id of one image under one config on one model: resubmitting it is idempotent.

    With an `owner` (an API key id, records not shared: SCALECAP_SHARE_RECORDS off) the id is the
    owner's own, so reuse and the record index never cross owners: another tenant naming the same
    image gets its own run, not a sign that someone captioned it."""
    from scalecap.record import job_id

    return job_id(ref, f"{config_hash}:{slug(model)}" + (f":owner={owner}" if owner else ""))


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


def reply_key(call: str) -> str:
    """Where a claim's reply is kept briefly (`{token}:claim`), for a resent claim."""
    return f"{PREFIX}reply:{call}"


def results_prefix(batch_id: str) -> str:
    """The Redis sink's key prefix of one batch's records."""
    return f"{RESULT_PREFIX}{batch_id}:"


_BATCH_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def new_batch_id() -> str:
    return uuid.uuid4().hex


def check_batch_id(batch_id: str) -> str:
    if not _BATCH_ID.match(batch_id):
        raise ConfigError(f"batch id {batch_id!r}: use 1-128 of A-Z a-z 0-9 . _ -")
    return batch_id
