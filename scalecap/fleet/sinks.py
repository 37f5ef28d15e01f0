"""Where records go: S3 (one object per record) or Redis (with a TTL).

Both write by key derived from (batch, job, attempt token): fenced records. Two runs of one job
(a worker that froze past its lease and woke while another ran the job) write two keys, never
one over the other; the finish script stores the location of the run the batch credits, and
results, export and the viewer read only that location. A sink that is down raises `SinkError`;
`probe` tells a sink that is down from a record the sink refused.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from scalecap.errors import ScaleCapError
from scalecap.fleet.layout import RESULT_PREFIX
from scalecap.images.s3 import s3_client  # the one S3 client factory (botocore retries here)

REDIS_PREFIX = RESULT_PREFIX
EXPORT_NAME = "records.jsonl"
_MULTIPART_CHUNK = 8 * 1024 * 1024  # boto3's default multipart threshold and part size


class SinkError(ScaleCapError):
    """A sink could not store or read a record (down, denied, missing bucket): retryable."""


@runtime_checkable
class Sink(Protocol):
    url: str

    def write(self, batch_id: str, job_id: str, row: dict[str, Any], attempt: str = "") -> str:
        """Store one run's record; returns its location (its own key per attempt token)."""
        ...

    def read(self, location: str) -> dict[str, Any]: ...

    def exists(self, location: str) -> bool: ...

    def batch_of(self, location: str) -> str | None:
        """The batch id a location of this sink belongs to (None: not one of its records)."""
        ...

    def probe(self) -> None:
        """Raise SinkError if the sink does not answer (down, denied)."""
        ...


def _dumps(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode()


def _record_name(job_id: str, attempt: str) -> str:
    _check_id("job_id", job_id)
    return f"{job_id}.{_check_id('attempt', attempt)}" if attempt else job_id


def _check_id(name: str, value: str) -> str:
    if not value or "/" in value or value in (".", "..") or any(c in value for c in "\n\r\0"):
        raise ValueError(f"{name} must be a non-empty path segment, not {value!r}")
    return value


# ----------------------------------------------------------------------------- S3


def _s3_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _describe(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        return f"{err.get('Code', '?')}: {err.get('Message', '') or exc}"
    return f"{type(exc).__name__}: {exc}"


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix") (prefix without slashes)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    return bucket, prefix.strip("/")


class S3Sink:
    """One JSON object per record at `{prefix}/{batch_id}/{job_id}.{attempt}.json`."""

    def __init__(self, url: str, client: Any) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.client = client

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _split(self, location: str) -> tuple[str, str]:
        bucket, key = parse_s3_url(location)
        if bucket != self.bucket:
            raise ValueError(f"{location} is not in bucket {self.bucket}")
        return bucket, key

    def check(self) -> None:
        """Fail now, clearly, if the bucket is missing or the credentials are wrong."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except _s3_errors() as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                why = "does not exist (create it first)"
            elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                why = (
                    f"is not accessible ({_describe(exc)}): check SCALECAP_S3_ACCESS_KEY_ID "
                    "and SCALECAP_S3_SECRET_ACCESS_KEY"
                )
            else:
                why = f"cannot be reached: {_describe(exc)}"
            raise SinkError(f"S3 sink {self.url}: bucket {self.bucket!r} {why}") from exc

    def probe(self) -> None:
        self.check()

    def batch_of(self, location: str) -> str | None:
        try:
            _, key = self._split(location)
        except ValueError:
            return None
        lead = self.prefix + "/" if self.prefix else ""
        if not key.startswith(lead) or key.count("/") != lead.count("/") + 1:
            return None
        return key[len(lead):].split("/", 1)[0]

    def write(self, batch_id: str, job_id: str, row: dict[str, Any], attempt: str = "") -> str:
        key = self._key(_check_id("batch_id", batch_id), _record_name(job_id, attempt) + ".json")
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=_dumps(row), ContentType="application/json"
            )
        except _s3_errors() as exc:
            raise SinkError(f"S3 sink {self.url}: writing {key}: {_describe(exc)}") from exc
        return f"s3://{self.bucket}/{key}"

    def read(self, location: str) -> dict[str, Any]:
        bucket, key = self._split(location)
        try:
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except _s3_errors() as exc:
            raise SinkError(f"S3 sink: reading {location}: {_describe(exc)}") from exc
        return json.loads(body)

    def exists(self, location: str) -> bool:
        bucket, key = self._split(location)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except _s3_errors() as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise SinkError(f"S3 sink: checking {location}: {_describe(exc)}") from exc

    def list_records(self, batch_id: str) -> Iterable[str]:
        """Locations of every record of a batch (the export file excluded), in key order."""
        prefix = self._key(_check_id("batch_id", batch_id)) + "/"
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith(".json"):
                        yield f"s3://{self.bucket}/{obj['Key']}"
        except _s3_errors() as exc:
            raise SinkError(f"S3 sink {self.url}: listing {prefix}: {_describe(exc)}") from exc

    def export_jsonl(
        self, batch_id: str, locations: Iterable[str] | None = None, key: str | None = None
    ) -> str:
        """Concatenate records into one JSONL object (default `{prefix}/{batch_id}/records.jsonl`).

        Records stream through a spooled temporary file (memory up to 8 MiB, then disk) and
        upload_fileobj switches to multipart for large exports, so memory stays bounded.
        `locations=None` exports every object of the batch found by listing, records of runs the
        batch did not credit included: pass the batch's job locations (FleetClient.export does).
        """
        if locations is None:
            locations = self.list_records(batch_id)
        key = key or self._key(_check_id("batch_id", batch_id), EXPORT_NAME)
        try:
            with tempfile.SpooledTemporaryFile(max_size=_MULTIPART_CHUNK) as buf:
                for location in locations:
                    bucket, obj_key = self._split(location)
                    body = self.client.get_object(Bucket=bucket, Key=obj_key)["Body"]
                    # Re-serialise on one line: stored objects are compact already, but
                    # this keeps one record per line whatever wrote them.
                    buf.write(_dumps(json.loads(body.read())) + b"\n")
                buf.seek(0)
                self.client.upload_fileobj(
                    buf, self.bucket, key, ExtraArgs={"ContentType": "application/x-ndjson"}
                )
        except _s3_errors() as exc:
            raise SinkError(f"S3 sink {self.url}: exporting {key}: {_describe(exc)}") from exc
        return f"s3://{self.bucket}/{key}"


# ----------------------------------------------------------------------------- Redis


class RedisSink:
    """Each record under `scalecap:result:{batch_id}:{job_id}:{attempt}` with a TTL (seconds)."""

    url = "redis"

    def __init__(self, redis_client: Any, ttl: int) -> None:
        self.redis = redis_client
        self.ttl = int(ttl)

    @staticmethod
    def key(batch_id: str, job_id: str, attempt: str = "") -> str:
        name = _check_id("job_id", job_id) + (f":{_check_id('attempt', attempt)}" if attempt else "")
        return f"{REDIS_PREFIX}{_check_id('batch_id', batch_id)}:{name}"

    def batch_of(self, location: str) -> str | None:
        try:
            key = self._key_of(location)
        except ValueError:
            return None
        return key[len(REDIS_PREFIX):].split(":", 1)[0]

    def probe(self) -> None:
        self._call("ping", self.redis.ping)

    @staticmethod
    def _key_of(location: str) -> str:
        if not location.startswith("redis://" + REDIS_PREFIX):
            raise ValueError(f"not a Redis sink location: {location!r}")
        return location[len("redis://") :]

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise SinkError(f"Redis sink: {what}: {type(exc).__name__}: {exc}") from exc

    def write(self, batch_id: str, job_id: str, row: dict[str, Any], attempt: str = "") -> str:
        key = self.key(batch_id, job_id, attempt)
        self._call(f"writing {key}", self.redis.set, key, _dumps(row), ex=self.ttl)
        return "redis://" + key

    def read(self, location: str) -> dict[str, Any]:
        key = self._key_of(location)
        raw = self._call(f"reading {key}", self.redis.get, key)
        if raw is None:
            raise SinkError(f"Redis sink: {key} is gone (expired after {self.ttl} s or never set)")
        return json.loads(raw)

    def exists(self, location: str) -> bool:
        key = self._key_of(location)
        return bool(self._call(f"checking {key}", self.redis.exists, key))


# ----------------------------------------------------------------------------- factory


def open_sink(url: str, *, settings: Any, redis_client: Any) -> Sink:
    """A sink from its URL: "redis", or "s3://bucket/prefix" (the bucket must exist)."""
    if url == "redis":
        return RedisSink(redis_client, settings.result_ttl)
    if url.startswith("s3://"):
        sink = S3Sink(url, s3_client(settings))
        sink.check()
        return sink
    raise ValueError(f"unknown sink {url!r}: use 'redis' or 's3://bucket/prefix'")
