"""Request and response bodies of the HTTP API (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from producer.submit_model import MODEL_PATTERN, api_fields, value_type


def _batch_request() -> type[BaseModel]:
    """BatchRequest, derived from SubmitOptions' `api` fields plus the rows (images or source)."""
    fields: dict[str, Any] = {
        "images": (list[str] | None, Field(
            default=None, min_length=1,
            description="Image references: http(s)://, s3://bucket/key, data: URIs, or local paths "
                        "inside the server's allowed roots")),
        "source": (str | None, Field(
            default=None, max_length=2048,
            description="Instead of images: s3://bucket/prefix/ (every image, JSONL manifest, "
                        "WebDataset .tar shard and .parquet file under it), one such object, or a "
                        "brace pattern such as s3://bucket/shards/{00000..00127}.tar")),
    }
    for f in api_fields():
        typ = dict[str, Any] | None if f.name == "config" else value_type(f)
        fields[f.name] = (typ, Field(default=f.default, description=f.metadata["help"],
                                     max_length=f.metadata["max_length"], pattern=f.metadata["pattern"]))
    return create_model(  # type: ignore[call-overload,no-any-return]
        "BatchRequest", __config__=ConfigDict(extra="forbid"),
        __doc__="A batch as JSON: a list of image references, or an s3:// prefix (or manifest) to "
                "expand; the other fields are SubmitOptions (producer/submit_model.py).",
        **fields)


BatchRequest = _batch_request()


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
