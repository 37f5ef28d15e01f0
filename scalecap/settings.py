"""Deployment settings: one object, read from `SCALECAP_*` environment variables.

Chain knobs live in ImageScaleCaptionGenerateConfig; this object holds where things are (broker,
S3, model) and what is allowed (API keys, local roots, private addresses). Command-line flags
override it through `Settings.with_overrides`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any

from scalecap.errors import ConfigError

PREFIX = "SCALECAP_"


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.replace(";", ",").split(",") if v.strip()]


@dataclass
class Settings:
    """Every field can be set as SCALECAP_<FIELD NAME IN CAPITALS>; lists are comma separated."""

    broker_url: str = "redis://127.0.0.1:6379/0"
    """Redis for the Celery broker, batch state and the Redis results sink."""
    result_ttl: int = 7 * 24 * 3600
    """Seconds a record in the Redis results sink lives."""
    backend: str = "vllm"
    """Engine: vllm, openai, transformers, or a 'module:Class' path."""
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    openai_base_url: str | None = None
    """Address of an OpenAI-compatible server for --backend openai."""
    openai_api_key: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    dtype: str = "auto"
    concurrency: int = 64
    """Images in flight in one process (worker or `scalecap caption`)."""
    gpus: str | None = None
    """CUDA_VISIBLE_DEVICES for a worker ("0", "0,1")."""
    queue: str | None = None
    """GPU queue a worker consumes; default derives from the model name."""
    visibility_timeout: int = 3600
    """Seconds before Redis hands an unacknowledged job to another worker (> longest job)."""
    max_attempts: int = 3
    """Attempts charged to one job (its own failures, or a lost run alone) before the dead-letter list."""
    job_timeout: float = 600.0
    """Seconds one image may run in a worker before its coroutine is cancelled (a retryable failure)."""
    chunk_size: int = 16
    """Images per task message (one claim and one finish script per chunk)."""
    retention: int = 7 * 24 * 3600
    """Seconds a finished batch's keys live in Redis (0: keep until `scalecap purge`)."""
    results_url: str | None = None
    """A separate Redis for the Redis results sink (default: the broker's)."""
    max_queued: int = 0
    """Submit backpressure: above this many images queued for a model the producer waits (0: off)."""
    submit_timeout: float = 600.0
    """Seconds a submission session may go without registering jobs before the reconciler closes it
    (its producer is taken as gone; the batch then finishes with what was registered)."""
    reconcile_interval: float = 30.0
    """Seconds between the I/O worker's reconcile passes (lost messages, expired leases, retention)."""
    webhook_retry_max_delay: float = 300.0
    webhook_lease: float = 300.0
    """Seconds an event handed to a delivery task stays hidden; unsettled by then (its task or
    worker lost, a Redis error in it), it is handed over again."""
    """Longest wait between two attempts of one webhook event (seconds)."""
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str | None = None
    webhook_secret: str | None = None
    """Standard Webhooks secret, `whsec_<base64>`."""
    webhook_timeout: float = 10.0
    webhook_max_attempts: int = 6
    api_keys: list[str] = field(default_factory=list)
    """Bootstrap keys the HTTP API accepts as admin keys (prefer `scalecap keys create`)."""
    api_cors_origins: list[str] = field(default_factory=list)
    """Origins browsers may call the HTTP API from (empty: CORS off)."""
    api_max_body_bytes: int = 16 * 1024 * 1024
    """Largest JSON request body of the HTTP API; more is 413."""
    api_max_upload_bytes: int = 4 * 1024 * 1024 * 1024
    """Largest streamed JSONL manifest upload (POST /v1/batches, application/x-ndjson); more is 413."""
    api_caption_timeout: float = 30.0
    """Seconds POST /v1/captions waits for its caption before answering 202 with the job to poll."""
    api_retry_after: int = 30
    """Retry-After seconds of a 429 (quota) answer."""
    session_secret: str | None = None
    """Signs the viewer's login cookies; unset: a random one per API process (logins end on restart)."""
    allowed_roots: list[str] = field(default_factory=list)
    """Local directories images may be read from by workers and the API (empty: none)."""
    allow_private_urls: bool = False
    """Let workers fetch http(s) images from private/loopback addresses."""
    allowed_networks: list[str] = field(default_factory=list)
    """Private networks (CIDR) image URLs may still reach, e.g. an internal image store."""
    llm_api_key: str | None = None
    """Key of the separate language model (config llm_base_url); never stored in Redis."""
    max_image_bytes: int = 64 * 1024 * 1024
    max_decode_pixels: int = 40_000_000
    """Largest image (width x height, from its header) a worker decodes; more is ImageTooLarge."""
    max_concurrent_decodes: int = 4
    """Image decodes at once in one process, whatever the job concurrency."""
    max_questions_limit: int = 64
    """Largest max_questions a batch config may ask for (the API refuses more with 422)."""
    default_max_queued: int = 100_000
    """Quota of API keys created without --max-queued: images queued or running at once."""
    share_records: bool = False
    """Let API keys reuse each other's records of the same image, config and model (off: each
    owner's records are its own, so nobody learns what another captioned)."""
    fetch_retries: int = 3
    """Retries of an image fetch after a transient error (HTTP 5xx, timeout, S3 SlowDown)."""
    fetch_backoff: float = 0.5
    """First backoff of those retries in seconds; doubles each time (with jitter), at most 8 s."""
    allowed_buckets: list[str] = field(default_factory=list)
    """s3:// buckets images may be read from (empty: any the S3 credentials reach)."""
    redis_ca_cert: str | None = None
    """CA certificate file for rediss:// URLs (broker, results); default: the system's CAs."""
    remote_control: bool = False
    """Let `celery inspect/control` (and Flower's worker actions) command the workers."""
    task_events: bool = True
    """Celery task events (task-sent from producers, task-* and heartbeats from workers): Flower."""
    metrics_port: int | None = None
    """A worker's Prometheus /metrics, /healthz and /readyz port (none: no metrics server)."""
    metrics_host: str = "0.0.0.0"
    """Address the worker's metrics server listens on."""
    heartbeat_max_age: float = 60.0
    """Seconds without a heartbeat from the engine's event loop before /healthz fails."""
    stall_timeout: float = 300.0
    """Seconds with images in flight and none finished before /healthz fails (a hung engine);
    below job_timeout (which cancels a hung image, and with it the evidence), above one image's time."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with every non-None override applied (CLI flags beat the environment)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def s3_client_kwargs(self) -> dict[str, Any]:
        """boto3 client arguments; unset values fall back to the usual AWS_* variables."""
        kw: dict[str, Any] = {}
        if self.s3_endpoint_url:
            kw["endpoint_url"] = self.s3_endpoint_url
        if self.s3_access_key_id:
            kw["aws_access_key_id"] = self.s3_access_key_id
        if self.s3_secret_access_key:
            kw["aws_secret_access_key"] = self.s3_secret_access_key
        if self.s3_region:
            kw["region_name"] = self.s3_region
        return kw


def _coerce(name: str, typ: Any, raw: str) -> Any:
    t = str(typ)
    try:
        if t.startswith("list"):
            return _split(raw)
        if t.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{PREFIX}{name.upper()}={raw!r} is not a valid {t}") from exc
    return raw
