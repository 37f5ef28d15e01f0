"""Request and response bodies of the HTTP API (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

BATCH_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
MODEL_PATTERN = r"^(?:[A-Za-z0-9._:@+-]*/)*[A-Za-z0-9._:@+-]*[A-Za-z0-9][A-Za-z0-9._:@+-]*/*$"
"""A hub id or a path whose last part names the model (it becomes the queue name)."""


class BatchRequest(BaseModel):
    """A batch as JSON: a list of image references, or an s3:// prefix (or manifest) to expand."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] | None = Field(
        default=None, min_length=1,
        description="Image references: http(s)://, s3://bucket/key, data: URIs, or local paths "
                    "inside the server's allowed roots")
    source: str | None = Field(
        default=None, description="Instead of images: s3://bucket/prefix/ (every image, JSONL "
                                  "manifest, WebDataset .tar shard and .parquet file under it), one "
                                  "such object, or a brace pattern such as "
                                  "s3://bucket/shards/{00000..00127}.tar", max_length=2048)
    model: str | None = Field(default=None, max_length=512, pattern=MODEL_PATTERN,
                              description="Model whose workers run the jobs (default: the server's)")
    config: dict[str, Any] | None = Field(default=None, description="ScaleCap config fields")
    sink: str = Field(default="redis", max_length=2048, description="'redis' or s3://bucket/prefix")
    webhook: str | None = Field(default=None, max_length=4096,
                                description="URL receiving the signed batch.completed event")
    webhook_jobs: bool = Field(default=False, description="Also send a job.completed event per image")
    batch_id: str | None = Field(default=None, pattern=BATCH_ID_PATTERN,
                                 description="Client-chosen id: resubmitting to it adds only new images")
    image_key: str = Field(default="image", max_length=128,
                           description="Field holding the image in a manifest's lines")
    image_column: str | None = Field(default=None, max_length=256,
                                     description="Parquet sources: the image column (URLs/paths, or "
                                                 "bytes as HF's Image feature stores them); "
                                                 "default: image_key")
    id_column: str | None = Field(default=None, max_length=256,
                                  description="Parquet sources: a column whose value is kept as the "
                                              "record's source key")


class CaptionRequest(BaseModel):
    """One image, captioned while the caller waits (up to a timeout)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="One image reference (as in BatchRequest.images)")
    model: str | None = Field(default=None, max_length=512, pattern=MODEL_PATTERN)
    config: dict[str, Any] | None = None


class SubmitCounts(BaseModel):
    submitted: int
    failed: int
    duplicates: int


class BatchAccepted(BaseModel):
    batch_id: str
    status_url: str
    results_url: str
    replayed: bool = Field(default=False,
                           description="True when an Idempotency-Key matched an earlier request")
    submission: SubmitCounts | None = Field(
        default=None, description="Rows queued, refused and duplicated (uploads, once read)")


class BatchStatus(BaseModel):
    """A batch's counters and state (more fields may appear)."""

    model_config = ConfigDict(extra="allow")

    batch_id: str
    state: str
    owner: str | None = None
    total: int = 0
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    dead_lettered: int = 0
    sink: str | None = None
    model: str | None = None
    queue: str | None = None
    config_hash: str | None = None
    webhook: str | None = None
    webhook_status: str | None = None
    webhook_attempts: list[dict[str, Any]] = Field(default_factory=list)
    created_at: float | None = None
    started_at: float | None = None
    closed_at: float | None = None
    finished_at: float | None = None


class BatchList(BaseModel):
    items: list[BatchStatus]
    total: int
    offset: int
    limit: int
    next_offset: int | None


class JobPage(BaseModel):
    items: list[dict[str, Any]]
    offset: int
    limit: int
    next_offset: int | None


class Failures(BaseModel):
    batch_id: str
    failed: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]


class CaptionResult(BaseModel):
    batch_id: str
    job_id: str | None
    state: str
    record: dict[str, Any] | None = Field(default=None, description="The image's record once finished")
    status_url: str
    result_url: str | None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="'ready' or 'not ready'")
    redis: bool
    model: str
    queue: str
    workers: list[str] = Field(description="Workers seen consuming the model's queue")
    signal: str = Field(description="How workers were seen: 'inspect' or 'heartbeat'")
    detail: str | None = None
