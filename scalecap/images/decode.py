"""Image loading: any image reference becomes an RGB PIL image within bounds, or a typed error.

Workers read references from manifests written by someone else, so loading is also a guard:
byte caps while reading, a pixel cap read from the header before any decoding (a 50 KB PNG can
claim 20000x20000 pixels), a bound on decodes at once (one worker runs ~64 jobs; a few big decodes
together must not kill them all), local paths confined to allowed roots after resolving symlinks,
http(s) fetches that refuse loopback, private and link-local addresses at connect time, on every
redirect hop, and cloud metadata addresses always (scalecap.netguard), and s3:// buckets confined
to an allow-list. Transient fetch failures (5xx, timeouts, S3 throttling) are retried with backoff
before they count. Every error names the source, so a failed record says which image and why.
Pillow's global settings are read, never changed: this runs in many threads at once.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import os
import random
import re
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from scalecap.errors import (
    ConfigError,
    EmptyImage,
    ImageAccessDenied,
    ImageError,
    ImageFetchError,
    ImageNotFound,
    ImageTooLarge,
    NotAnImage,
    TruncatedImage,
)
from scalecap.netguard import (
    AddressPolicy,
    AddressRefused,
    bucket_refusal,
    forbidden_reason,
    guarded_transport,
    parse_networks,
)

__all__ = [
    "ImageLimits",
    "describe_source",
    "encode_data_url",
    "image_ref_kind",
    "load_image",
]

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
_CHUNK = 1 << 16
_USER_AGENT = "scalecap-fleet image loader"
# Decoder failures that mean "the data stops early or is damaged" rather than "not an image".
_DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError, IndexError, struct.error, zlib.error)

SourceKind = Literal["image", "bytes", "path", "file", "http", "s3", "data", "shard", "unsupported"]
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class ImageLimits:
    """What one load may cost and reach. Defaults suit a worker reading untrusted manifests."""

    max_bytes: int = 64 * 1024 * 1024
    """Encoded bytes read from any source; reading stops at the first byte over."""
    max_decode_pixels: int = 40_000_000
    """Width x height from the header, checked before decoding: 40 Mpx is a 120 MB RGB bitmap.
    Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS, 179 Mpx) still applies above that."""
    max_concurrent_decodes: int = 4
    """Decodes at once in this process (all ImageLimits with this value share one gate);
    fetching does not hold a slot."""
    min_pixels: int = 3136
    """Smaller images are upscaled to about this many pixels, keeping the aspect ratio."""
    max_pixels: int = 1003520
    """Larger images are downscaled to at most this many pixels, keeping the aspect ratio."""
    allowed_roots: Sequence[str | os.PathLike[str]] | None = None
    """Local directories: None allows any local path, [] none; symlinks are resolved first."""
    allow_private_urls: bool = False
    """Fetch http(s) from loopback, private, link-local, reserved or multicast addresses."""
    allowed_networks: Sequence[str] = ()
    """CIDR ranges exempt from the private-address refusal (an internal image store), while the
    rest stays refused. Cloud metadata addresses are refused even when listed here."""
    allowed_buckets: Sequence[str] = ()
    """s3:// buckets images may come from; empty allows any bucket the credentials reach."""
    http_timeout: float = 30.0
    """Seconds for one http(s) fetch try, redirects and body included."""
    fetch_retries: int = 3
    """Extra tries after a transient fetch failure (HTTP 5xx/408/429, timeout, reset, S3
    SlowDown/throttling/5xx); 0 disables. Then the error is ImageFetchError."""
    fetch_backoff: float = 0.5
    """First backoff cap in seconds; doubles per retry (full jitter)."""
    fetch_backoff_max: float = 8.0
    """Longest wait between tries, Retry-After included."""
    s3_client_factory: Callable[[], Any] | None = None
    """Returns a boto3 S3 client; default: one from the SCALECAP_S3_* settings, cached."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_decode_pixels", "min_pixels", "max_pixels", "max_concurrent_decodes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ImageLimits.{name} must be >= 1")
        if self.fetch_retries < 0 or self.fetch_backoff < 0 or self.fetch_backoff_max < 0:
            raise ConfigError("ImageLimits.fetch_retries, fetch_backoff and fetch_backoff_max must be >= 0")
        if self.max_pixels < self.min_pixels:
            raise ConfigError("ImageLimits.max_pixels must be >= min_pixels")
        if self.http_timeout <= 0:
            raise ConfigError("ImageLimits.http_timeout must be > 0")
        if isinstance(self.allowed_roots, (str, os.PathLike)):  # one root, not its characters
            self.allowed_roots = [self.allowed_roots]
        if isinstance(self.allowed_networks, str):
            self.allowed_networks = [self.allowed_networks]
        if isinstance(self.allowed_buckets, str):
            self.allowed_buckets = [self.allowed_buckets]
        _networks(self)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> ImageLimits:
        """The limits a worker or `scalecap caption` applies, from a scalecap Settings object."""
        values: dict[str, Any] = {
            "max_bytes": settings.max_image_bytes,
            "max_decode_pixels": settings.max_decode_pixels,
            "max_concurrent_decodes": settings.max_concurrent_decodes,
            "allowed_roots": list(settings.allowed_roots),
            "allow_private_urls": settings.allow_private_urls,
            "allowed_networks": list(settings.allowed_networks),
            "allowed_buckets": list(settings.allowed_buckets),
            "fetch_retries": settings.fetch_retries,
            "fetch_backoff": settings.fetch_backoff,
        }
        values.update(overrides)
        return cls(**values)


def _networks(limits: ImageLimits) -> tuple[Any, ...]:
    return parse_networks(limits.allowed_networks, "ImageLimits.allowed_networks")


# -- references --------------------------------------------------------------------------------


def image_ref_kind(ref: Any) -> SourceKind:
    """Which loader a reference goes to (backends use it to pass URLs through untouched)."""
    if isinstance(ref, Image.Image):
        return "image"
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(ref, os.PathLike):
        return "path"
    if not isinstance(ref, str):
        return "unsupported"
    head = ref[:10].lower()
    if head.startswith("data:"):
        return "data"
    if head.startswith(("http://", "https://")):
        return "http"
    if head.startswith("s3://"):
        return "s3"
    if head.startswith("file://"):
        return "file"
    if head.startswith(("wds+", "pq+")):  # one member/row of a shard: scalecap/images/shards.py
        return "shard"
    if _URI.match(ref):
        return "unsupported"
    return "path"


def describe_source(source: Any) -> str:
    """A short, log-safe name for a source: no URL credentials, no query strings, no payloads."""
    kind = image_ref_kind(source)
    if kind == "image":
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    if kind == "bytes":
        return f"<{memoryview(source).nbytes} bytes>"
    if kind == "path":
        return _shorten(os.fspath(source))
    if not isinstance(source, str):
        return f"<{type(source).__name__}>"
    if kind == "data":
        return f"{_shorten(source.split(',', 1)[0], 60)},… ({len(source)} chars)"
    if kind == "shard":
        from scalecap.images.shards import describe

        return describe(source)
    if kind in ("http", "s3", "unsupported"):
        try:
            parts = urlsplit(source)
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            if parts.port is not None:
                host += f":{parts.port}"
        except ValueError:
            return _shorten(source.split("?", 1)[0])
        text = f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")
        return _shorten(text)
    return _shorten(source)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- entry point -------------------------------------------------------------------------------


def load_image(source: Any, *, limits: ImageLimits | None = None) -> Image.Image:
    """Load `source` (PIL image, bytes, Path, or str: path, file://, http(s)://, s3://, data:).

    Returns a new RGB image with EXIF orientation applied and its pixel count within
    [min_pixels, max_pixels]. Raises an ImageError subclass naming the source.
    """
    limits = limits or ImageLimits()
    desc = describe_source(source)
    kind = image_ref_kind(source)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _warn_truncated_once()
    if kind == "image":
        with decode_gate(limits.max_concurrent_decodes):
            im = _check_and_load(source, limits, desc, draft=False)  # draft would alter the caller's
            return _finish(im, limits, desc, in_place=False)
    hint = ""
    if kind == "bytes":
        data = bytes(source)
    elif kind in ("path", "file"):
        data = _read_local(source, limits, desc)
    elif kind == "http":
        data, ctype = _fetch_http(source, limits, desc)
        hint = f"content-type {ctype}" if ctype else ""
    elif kind == "s3":
        data = _fetch_s3(source, limits, desc)
    elif kind == "data":
        data = _decode_data_uri(source, limits, desc)
    elif kind == "shard":
        from scalecap.images.shards import read_shard_ref

        data_or_ref = read_shard_ref(source, limits, desc)  # a URL column's row names its image
        if isinstance(data_or_ref, str):
            return load_image(data_or_ref, limits=limits)
        data = data_or_ref
    else:
        raise ImageError(f"{desc}: unsupported image reference ({type(source).__name__})")
    with decode_gate(limits.max_concurrent_decodes):
        return _decode(data, limits, desc, hint)


def encode_data_url(img: Image.Image, fmt: str = "JPEG", *, quality: int = 95) -> str:
    """A `data:` URL of the image, for APIs (OpenAI-compatible servers) that take images inline."""
    fmt = "JPEG" if fmt.upper() in ("JPG", "JPEG") else fmt.upper()
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = _to_rgb(img, describe_source(img))
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, format=fmt, **kwargs)
    mime = Image.MIME.get(fmt, f"image/{fmt.lower()}")
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


_gates_lock = threading.Lock()
_gates: dict[int, threading.BoundedSemaphore] = {}


def decode_gate(size: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore that bounds decodes at once (one per distinct size)."""
    with _gates_lock:
        gate = _gates.get(size)
        if gate is None:
            gate = _gates[size] = threading.BoundedSemaphore(size)
        return gate


_warned = threading.Event()


def _warn_truncated_once() -> None:
    if not _warned.is_set():
        _warned.set()
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set elsewhere in this process): "
            "truncated images will decode with grey areas instead of raising TruncatedImage"
        )


# -- sources -----------------------------------------------------------------------------------


def _read_local(source: str | os.PathLike[str], limits: ImageLimits, desc: str) -> bytes:
    if isinstance(source, str) and image_ref_kind(source) == "file":
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"{desc}: file:// URIs on another host are not supported")
        path = unquote(parts.path)
    else:
        path = os.fspath(source)
    if limits.allowed_roots is not None and not limits.allowed_roots:
        raise ImageAccessDenied(f"{desc}: local files are not allowed (no allowed roots)")
    real = os.path.realpath(path)
    if limits.allowed_roots is not None and not _under_roots(real, limits.allowed_roots):
        raise ImageAccessDenied(f"{desc}: local path is outside the allowed roots")
    try:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise NotAnImage(f"{desc}: not a regular file")
        if st.st_size > limits.max_bytes:
            raise ImageTooLarge(f"{desc}: {st.st_size} bytes is over max_bytes={limits.max_bytes}")
        with open(real, "rb") as fh:
            # read(n) allocates n bytes up front: ask for what stat promised, not the cap.
            want = min(st.st_size, limits.max_bytes) + 1
            data = fh.read(want)
            if len(data) == want:  # bigger than stat said (still growing, or a /proc file)
                data += fh.read(limits.max_bytes + 1 - len(data))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ImageNotFound(f"{desc}: no such file") from exc
    except PermissionError as exc:
        raise ImageAccessDenied(f"{desc}: permission denied") from exc
    except OSError as exc:
        raise ImageError(f"{desc}: cannot read: {exc}") from exc
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{desc}: over max_bytes={limits.max_bytes}")
    return data


def _under_roots(real: str, roots: Sequence[str | os.PathLike[str]]) -> bool:
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def _decode_data_uri(uri: str, limits: ImageLimits, desc: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise NotAnImage(f"{desc}: malformed data URI (no comma)")
    if not header.lower().endswith(";base64"):
        data = unquote_to_bytes(payload)
        if len(data) > limits.max_bytes:
            raise ImageTooLarge(f"{desc}: {len(data)} bytes is over max_bytes={limits.max_bytes}")
        return data
    if "%" in payload:
        payload = unquote(payload)
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > limits.max_bytes:
        raise ImageTooLarge(
            f"{desc}: about {len(payload) // 4 * 3} bytes is over max_bytes={limits.max_bytes}"
        )
    payload = payload.replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NotAnImage(f"{desc}: invalid base64 payload") from exc


class _Transient(Exception):
    """A fetch failure worth another try (5xx, 408/429, timeout, reset, S3 throttling)."""

    def __init__(self, text: str, retry_after: float | None = None) -> None:
        super().__init__(text)
        self.retry_after = retry_after


def _with_retries(fetch: Callable[[], Any], limits: ImageLimits, desc: str) -> Any:
    """Run `fetch`, retrying transient failures with full-jitter exponential backoff.

    At most `fetch_retries` retries, each wait at most `fetch_backoff_max` seconds (a server's
    Retry-After is honoured up to that cap); then ImageFetchError names what kept failing.
    """
    tries = int(limits.fetch_retries) + 1
    for attempt in range(1, tries + 1):
        try:
            return fetch()
        except _Transient as exc:
            if attempt >= tries:
                raise ImageFetchError(f"{exc} (gave up after {attempt} attempt(s))") from exc
            cap = min(limits.fetch_backoff_max, limits.fetch_backoff * 2 ** (attempt - 1))
            delay = random.uniform(0, cap)
            if exc.retry_after is not None:
                delay = min(limits.fetch_backoff_max, exc.retry_after)
            log.info("%s; retry %d of %d in %.2f s", exc, attempt, tries - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fetch_http(url: str, limits: ImageLimits, desc: str) -> tuple[bytes, str]:
    """The body and its content type; transient failures retried (each try with its own timeout)."""
    return _with_retries(lambda: _fetch_http_once(url, limits, desc), limits, desc)


def _fetch_http_once(url: str, limits: ImageLimits, desc: str) -> tuple[bytes, str]:
    """One try; redirects followed by hand so each hop is checked, every connect vetted."""
    import httpx

    deadline = time.monotonic() + limits.http_timeout
    client = httpx.Client(
        transport=guarded_transport(_policy(limits)),
        timeout=limits.http_timeout,
        follow_redirects=False,
        trust_env=False,
        # identity: images are compressed already, and a gzip bomb expands a chunk 1000-fold.
        headers={
            "User-Agent": _USER_AGENT,
            "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity",
        },
    )
    current = url
    with client:
        for hop in range(MAX_REDIRECTS + 1):
            where = desc if hop == 0 else f"{desc} (redirected to {describe_source(current)})"
            if urlsplit(current).scheme.lower() not in ("http", "https"):
                raise ImageAccessDenied(f"{where}: redirects only to http(s) are followed")
            try:
                with client.stream("GET", current) as resp:
                    if resp.is_redirect:
                        current = urljoin(current, resp.headers["location"])
                        continue
                    _check_status(resp, where)
                    ctype = resp.headers.get("content-type", "")
                    return _read_capped(resp, limits, where, deadline), ctype
            except AddressRefused as exc:
                raise ImageAccessDenied(f"{where}: {exc}") from exc
            except httpx.TimeoutException as exc:
                raise _Transient(f"{where}: timed out ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:  # connect refused/reset, broken response
                raise _Transient(f"{where}: fetch failed: {type(exc).__name__}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise ImageError(f"{where}: fetch failed: {type(exc).__name__}: {exc}") from exc
    raise ImageError(f"{desc}: more than {MAX_REDIRECTS} redirects")


_TRANSIENT_STATUSES = frozenset({408, 429})


def _check_status(resp: Any, where: str) -> None:
    status = resp.status_code
    if status < 400:
        return
    text = f"{where}: HTTP {status} {resp.reason_phrase}".rstrip()
    if status in (404, 410):
        raise ImageNotFound(text)
    if status in (401, 403):
        raise ImageAccessDenied(text)
    if status >= 500 or status in _TRANSIENT_STATUSES:
        raise _Transient(text, _retry_after(resp.headers.get("retry-after")))
    raise ImageError(text)


def _retry_after(value: str | None) -> float | None:
    """Delta-seconds only (an HTTP date is rare for images; the backoff applies then)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _read_capped(resp: Any, limits: ImageLimits, where: str, deadline: float) -> bytes:
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
        raise ImageTooLarge(f"{where}: Content-Length {declared} is over max_bytes={limits.max_bytes}")
    buf = bytearray()
    for chunk in resp.iter_bytes(_CHUNK):
        buf += chunk
        if len(buf) > limits.max_bytes:
            raise ImageTooLarge(f"{where}: body is over max_bytes={limits.max_bytes}")
        if time.monotonic() > deadline:
            raise _Transient(f"{where}: timed out after {limits.http_timeout} s reading the body")
    return bytes(buf)


def _fetch_s3(uri: str, limits: ImageLimits, desc: str) -> bytes:
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise ImageError(f"{desc}: expected s3://bucket/key")
    if bucket_refusal(uri, limits.allowed_buckets):
        raise ImageAccessDenied(f"{desc}: bucket {bucket!r} is not in allowed_buckets")
    client = limits.s3_client_factory() if limits.s3_client_factory else _default_s3_client()
    return _with_retries(lambda: _fetch_s3_once(client, bucket, key, limits, desc), limits, desc)


def _fetch_s3_once(client: Any, bucket: str, key: str, limits: ImageLimits, desc: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise _s3_error(exc, desc) from exc
    except BotoCoreError as exc:
        raise _s3_botocore_error(exc, f"{desc}: S3 request failed") from exc
    body = obj["Body"]
    try:
        size = obj.get("ContentLength")
        if size is not None and size > limits.max_bytes:
            raise ImageTooLarge(f"{desc}: {size} bytes is over max_bytes={limits.max_bytes}")
        buf = bytearray()
        while chunk := body.read(_CHUNK):
            buf += chunk
            if len(buf) > limits.max_bytes:
                raise ImageTooLarge(f"{desc}: body is over max_bytes={limits.max_bytes}")
        return bytes(buf)
    except BotoCoreError as exc:
        raise _s3_botocore_error(exc, f"{desc}: S3 read failed") from exc
    finally:
        body.close()


_S3_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
})  # fmt: skip


def _s3_error(exc: Any, desc: str) -> Exception:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    text = f"{desc}: S3 {code or status}: {err.get('Message', '')}".rstrip(": ")
    if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404") or status == 404:
        return ImageNotFound(text)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
        return ImageAccessDenied(text)
    if code in _S3_TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
        return _Transient(text)
    return ImageError(text)


def _s3_botocore_error(exc: Exception, what: str) -> Exception:
    """Connection-level botocore errors are transient; the rest (no credentials, ...) are not."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    transient = (ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError,
                 ResponseStreamingError)  # fmt: skip
    text = f"{what}: {type(exc).__name__}: {exc}"
    return _Transient(text) if isinstance(exc, transient) else ImageError(text)


_s3_lock = threading.Lock()
_s3_clients: dict[tuple[tuple[str, Any], ...], Any] = {}


def _default_s3_client() -> Any:
    """One boto3 client per distinct setting (clients are thread-safe; creating them is not)."""
    from scalecap.settings import Settings

    kwargs = Settings.from_env().s3_client_kwargs()
    key = tuple(sorted(kwargs.items()))
    with _s3_lock:
        client = _s3_clients.get(key)
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:
                raise ImageError("s3:// images need boto3: pip install 'scalecap-fleet[producer]'") from exc
            # One try per call: _with_retries owns retrying, so the count in an error is true.
            config = Config(retries={"mode": "standard", "total_max_attempts": 1})
            client = _s3_clients[key] = boto3.client("s3", config=config, **kwargs)
    return client


# -- address guard (scalecap.netguard) ---------------------------------------------------------

_forbidden_reason = forbidden_reason  # kept under its old name for callers and tests


def _policy(limits: ImageLimits) -> AddressPolicy:
    return AddressPolicy(limits.allow_private_urls, _networks(limits), "allow_private_urls")


# -- decoding ----------------------------------------------------------------------------------


def _decode(data: bytes, limits: ImageLimits, desc: str, hint: str = "") -> Image.Image:
    if not data:
        raise EmptyImage(f"{desc}: empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{desc}: {len(data)} bytes is over max_bytes={limits.max_bytes}")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over Pillow's own hard limit, at open
        raise ImageTooLarge(
            f"{desc}: too many pixels to decode (over max_decode_pixels={limits.max_decode_pixels}): {exc}"
        ) from exc
    except UnidentifiedImageError as exc:
        what = f" ({hint})" if hint else ""
        raise NotAnImage(f"{desc}: not an image format Pillow can read{what}; starts {data[:12]!r}") from exc
    except _DECODE_ERRORS as exc:
        raise TruncatedImage(f"{desc}: image header is cut short or corrupt: {exc}") from exc
    im = _check_and_load(im, limits, desc, draft=True)
    return _finish(im, limits, desc, in_place=True)


def _check_and_load(im: Image.Image, limits: ImageLimits, desc: str, *, draft: bool) -> Image.Image:
    """Refuse by header size, pick a cheaper JPEG scale if downscaling anyway, then decode fully."""
    w, h = im.size
    if w < 1 or h < 1:
        raise NotAnImage(f"{desc}: image has no pixels ({w}x{h})")
    if w * h > limits.max_decode_pixels:
        raise ImageTooLarge(
            f"{desc}: {w}x{h} = {w * h} pixels is over max_decode_pixels={limits.max_decode_pixels}"
        )
    if draft and getattr(im, "format", None) == "JPEG" and w * h > limits.max_pixels:
        # DCT scaling (1/2, 1/4, 1/8) to no less than the target: a no-op when too close.
        scale = math.sqrt(limits.max_pixels / (w * h))
        im.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{desc}: {exc}") from exc
    except _DECODE_ERRORS as exc:
        fmt = getattr(im, "format", None) or "image"
        raise TruncatedImage(f"{desc}: {fmt} data is cut short or corrupt: {exc}") from exc
    return im


def _finish(im: Image.Image, limits: ImageLimits, desc: str, *, in_place: bool) -> Image.Image:
    """Orientation, RGB, size. With in_place=False the result never is the caller's object."""
    original = im
    try:
        if in_place:
            ImageOps.exif_transpose(im, in_place=True)
        else:
            im = ImageOps.exif_transpose(im)
    except Exception as exc:  # a damaged EXIF block should not cost the image
        log.debug("%s: EXIF orientation ignored: %s", desc, exc)
    if im.mode in _HIGH_DEPTH:  # to 8-bit greyscale, then scaled while it is a byte a pixel
        im = _fit(_deep_to_l(im), limits)
    out = _fit(_to_rgb(im, desc), limits)
    return out.copy() if out is original and not in_place else out


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _to_rgb(im: Image.Image, desc: str) -> Image.Image:
    """RGB by the right route for each mode: scale deep images, composite alpha on white."""
    if im.mode in _HIGH_DEPTH:
        return _deep_to_l(im).convert("RGB")
    try:
        if im.mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            return canvas.convert("RGB")
        return im if im.mode == "RGB" else im.convert("RGB")
    except ValueError as exc:
        raise NotAnImage(f"{desc}: cannot convert mode {im.mode} to RGB: {exc}") from exc


_STRIP_PIXELS = 1 << 20


def _strips(im: Image.Image) -> Any:
    """(top row, samples) for strips of about a megapixel: the only wide copies ever made."""
    w, h = im.size
    rows = max(1, _STRIP_PIXELS // w)
    for y in range(0, h, rows):
        yield y, np.asarray(im.crop((0, y, w, min(h, y + rows))))


def _deep_to_l(im: Image.Image) -> Image.Image:
    """8-bit greyscale from a 16/32-bit or float image, one strip at a time.

    The whole-image route (an int32 or float64 copy of every sample, then temporaries of the
    same size) cost 8 to 24 bytes a pixel; this costs the 1-byte result plus one strip.
    """
    w, h = im.size
    out = np.empty((h, w), np.uint8)
    lo, hi = _value_range(im)
    sixteen = im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535)
    for y, arr in _strips(im):
        out[y : y + arr.shape[0]] = _to_8bit(arr, sixteen, lo, hi)
    return Image.fromarray(out, "L")


def _value_range(im: Image.Image) -> tuple[float, float]:
    """Smallest and largest sample, NaN counted as 0 and infinities as the float extremes."""
    if im.mode != "F":
        lo, hi = im.getextrema()
        return float(lo), float(hi)  # type: ignore[arg-type]
    lo, hi = math.inf, -math.inf
    for _, arr in _strips(im):
        a = np.nan_to_num(arr)
        lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    return lo, hi


def _to_8bit(arr: np.ndarray, sixteen: bool, lo: float, hi: float) -> np.ndarray:
    """16-bit data maps 0..65535 onto 0..255 (v/257, rounded); anything else by its own range.

    Mode I holds 16-bit sources (PGM, some TIFFs) as int32, so values within 0..65535 are taken
    as 16-bit; floats within 0..1 as fractions. `lo`/`hi` are the whole image's range.
    """
    if sixteen:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    a = np.nan_to_num(arr.astype(np.float64))
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _fit(im: Image.Image, limits: ImageLimits) -> Image.Image:
    """Scale into [min_pixels, max_pixels], keeping the aspect ratio."""
    w, h = im.size
    n = w * h
    if n > limits.max_pixels:
        s = math.sqrt(limits.max_pixels / n)
        nh = max(1, math.floor(h * s))
        nw = max(1, min(math.floor(w * s), limits.max_pixels // nh))
        if nw * nh > limits.max_pixels:  # a 1-pixel-high sliver
            nh = max(1, limits.max_pixels // nw)
        return im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if n < limits.min_pixels:
        s = math.sqrt(limits.min_pixels / n)
        nw, nh = math.ceil(w * s), math.ceil(h * s)
        if nw * nh > limits.max_pixels:
            nw, nh = max(1, math.floor(w * s)), max(1, math.floor(h * s))
        return im.resize((nw, nh), Image.Resampling.BICUBIC)
    return im
