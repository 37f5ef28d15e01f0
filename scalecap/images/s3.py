"""s3:// reads: the bucket allow-list, the one S3 client factory, and typed errors.

`s3_client` is the only place a boto3 S3 client is built from Settings: the fleet's result sinks
and the producer use it with botocore's own retries; image reads use it with one try per call,
because transient.py owns their retrying (so the attempt count in an error is true).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from scalecap.errors import ImageAccessDenied, ImageError, ImageNotFound, ImageTooLarge
from scalecap.images.limits import READ_CHUNK, ImageLimits
from scalecap.images.transient import Transient, with_retries
from scalecap.retry import is_temporary_error, is_temporary_s3

__all__ = [
    "bucket_allowed",
    "bucket_refusal",
    "check_bucket",
    "client_for",
    "fetch_s3",
    "s3_client",
    "s3_error",
    "split_s3_url",
]


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; either may be empty when the URL lacks it."""
    bucket, _, key = url[5:].partition("/")
    return bucket, key


# -- the bucket allow-list ---------------------------------------------------------------------


def bucket_allowed(bucket: str, allowed: Sequence[str]) -> bool:
    """The allow-list rule (SCALECAP_ALLOWED_BUCKETS): an empty list allows any bucket."""
    return not allowed or bucket in allowed


def bucket_refusal(ref: str, allowed: Sequence[str]) -> str | None:
    """Why `s3://bucket/...` may not be read under the allow-list `allowed` (empty: any), or None.

    Checked by workers before every S3 image read and by the producer at submit time.
    """
    if not allowed or not isinstance(ref, str) or ref[:5].lower() != "s3://":
        return None
    bucket = split_s3_url(ref)[0]
    if bucket_allowed(bucket, allowed):
        return None
    return f"s3://{bucket}/…: bucket {bucket!r} is not in allowed_buckets (SCALECAP_ALLOWED_BUCKETS)"


def check_bucket(bucket: str, limits: ImageLimits, desc: str) -> None:
    """ImageAccessDenied naming `desc` when the limits' allow-list refuses `bucket`."""
    if not bucket_allowed(bucket, limits.allowed_buckets):
        raise ImageAccessDenied(f"{desc}: bucket {bucket!r} is not in allowed_buckets")


# -- clients -----------------------------------------------------------------------------------


def s3_client(settings: Any, *, total_attempts: int = 6, **config: Any) -> Any:
    """A boto3 S3 client from Settings (SCALECAP_S3_*): standard-mode retries up to
    `total_attempts` tries a call (1: the caller retries), bounded timeouts, path-style
    addressing on a custom endpoint. `config` adds botocore Config options."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise ImportError("s3:// needs boto3: pip install 'scalecap-fleet[producer]'") from exc
    cfg = Config(
        retries={"total_max_attempts": total_attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
        **config,
    )
    return boto3.client("s3", config=cfg, **settings.s3_client_kwargs())


_lock = threading.Lock()
_clients: dict[tuple[tuple[str, Any], ...], Any] = {}


def _default_client() -> Any:
    """One image-read client per distinct setting (clients are thread-safe; creating them is not)."""
    from scalecap.settings import Settings

    settings = Settings.from_env()
    key = tuple(sorted(settings.s3_client_kwargs().items()))
    with _lock:
        client = _clients.get(key)
        if client is None:
            try:
                client = _clients[key] = s3_client(settings, total_attempts=1)
            except ImportError as exc:
                raise ImageError(f"s3:// images: {exc}") from exc
    return client


def client_for(limits: ImageLimits) -> Any:
    """The client image reads under `limits` use: its factory's, else the cached default."""
    return limits.s3_client_factory() if limits.s3_client_factory else _default_client()


# -- reads -------------------------------------------------------------------------------------


def fetch_s3(uri: str, limits: ImageLimits, desc: str) -> bytes:
    """The object's bytes within max_bytes; the bucket must be allowed; transient errors retried."""
    bucket, key = split_s3_url(uri)
    if not bucket or not key:
        raise ImageError(f"{desc}: expected s3://bucket/key")
    check_bucket(bucket, limits, desc)
    client = client_for(limits)
    return with_retries(lambda: _fetch_s3_once(client, bucket, key, limits, desc), limits, desc)


def _fetch_s3_once(client: Any, bucket: str, key: str, limits: ImageLimits, desc: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise s3_error(exc, desc) from exc
    except BotoCoreError as exc:
        raise _s3_botocore_error(exc, f"{desc}: S3 request failed") from exc
    body = obj["Body"]
    try:
        size = obj.get("ContentLength")
        if size is not None and size > limits.max_bytes:
            raise ImageTooLarge(f"{desc}: {size} bytes is over max_bytes={limits.max_bytes}")
        buf = bytearray()
        while chunk := body.read(READ_CHUNK):
            buf += chunk
            if len(buf) > limits.max_bytes:
                raise ImageTooLarge(f"{desc}: body is over max_bytes={limits.max_bytes}")
        return bytes(buf)
    except BotoCoreError as exc:
        raise _s3_botocore_error(exc, f"{desc}: S3 read failed") from exc
    finally:
        body.close()


def s3_error(exc: Any, desc: str) -> Exception:
    """The typed error for a botocore ClientError: not found, denied, Transient (retried) or other."""
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    text = f"{desc}: S3 {code or status}: {err.get('Message', '')}".rstrip(": ")
    if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404") or status == 404:
        return ImageNotFound(text)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
        return ImageAccessDenied(text)
    if is_temporary_s3(code, status if isinstance(status, int) else None):  # throttling, 5xx
        return Transient(text)
    return ImageError(text)


def _s3_botocore_error(exc: Exception, what: str) -> Exception:
    """Connection-level botocore errors are transient (scalecap.retry); the rest (no credentials,
    ...) are not."""
    text = f"{what}: {type(exc).__name__}: {exc}"
    return Transient(text) if is_temporary_error(exc) else ImageError(text)
