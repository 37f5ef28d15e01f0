"""Image loading: any image reference becomes an RGB PIL image within bounds, or a typed error.

Workers read references from manifests written by someone else, so loading is also a guard:
byte caps while reading, a pixel cap read from the header before any decoding (a 50 KB PNG can
claim 20000x20000 pixels), local paths confined to allowed roots after resolving symlinks, and
http(s) fetches that refuse loopback, private and link-local addresses at connect time, on every
redirect hop. Every error names the source, so a failed record says which image and why.
Pillow's global settings are read, never changed: this runs in many threads at once.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import logging
import math
import os
import re
import socket
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
    ImageNotFound,
    ImageTooLarge,
    NotAnImage,
    TruncatedImage,
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

SourceKind = Literal["image", "bytes", "path", "file", "http", "s3", "data", "unsupported"]
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class ImageLimits:
    """What one load may cost and reach. Defaults suit a worker reading untrusted manifests."""

    max_bytes: int = 64 * 1024 * 1024
    """Encoded bytes read from any source; reading stops at the first byte over."""
    max_decode_pixels: int = 178_956_970
    """Width x height from the header, checked before decoding. The default is Pillow's own
    hard limit (2 x Image.MAX_IMAGE_PIXELS), which still applies if this is set higher."""
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
    rest (cloud metadata at 169.254.169.254, say) stays refused."""
    http_timeout: float = 30.0
    """Seconds for one http(s) fetch, redirects and body included."""
    s3_client_factory: Callable[[], Any] | None = None
    """Returns a boto3 S3 client; default: one from the SCALECAP_S3_* settings, cached."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_decode_pixels", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"ImageLimits.{name} must be >= 1")
        if self.max_pixels < self.min_pixels:
            raise ConfigError("ImageLimits.max_pixels must be >= min_pixels")
        if self.http_timeout <= 0:
            raise ConfigError("ImageLimits.http_timeout must be > 0")
        if isinstance(self.allowed_roots, (str, os.PathLike)):  # one root, not its characters
            self.allowed_roots = [self.allowed_roots]
        if isinstance(self.allowed_networks, str):
            self.allowed_networks = [self.allowed_networks]
        _networks(self)


def _networks(limits: ImageLimits) -> tuple[Any, ...]:
    try:
        return tuple(ipaddress.ip_network(n, strict=False) for n in limits.allowed_networks)
    except ValueError as exc:
        raise ConfigError(f"ImageLimits.allowed_networks: {exc}") from exc


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
    else:
        raise ImageError(f"{desc}: unsupported image reference ({type(source).__name__})")
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


def _fetch_http(url: str, limits: ImageLimits, desc: str) -> tuple[bytes, str]:
    """The body and its content type; redirects followed by hand so each hop is checked."""
    import httpx

    deadline = time.monotonic() + limits.http_timeout
    transport = None if limits.allow_private_urls else _public_only_transport(limits)
    client = httpx.Client(
        transport=transport,
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
                    _check_status(resp.status_code, resp.reason_phrase, where)
                    ctype = resp.headers.get("content-type", "")
                    return _read_capped(resp, limits, where, deadline), ctype
            except _AddressRefused as exc:
                raise ImageAccessDenied(f"{where}: {exc}") from exc
            except httpx.TimeoutException as exc:
                raise ImageError(f"{where}: timed out ({type(exc).__name__})") from exc
            except httpx.HTTPError as exc:
                raise ImageError(f"{where}: fetch failed: {type(exc).__name__}: {exc}") from exc
    raise ImageError(f"{desc}: more than {MAX_REDIRECTS} redirects")


def _check_status(status: int, reason: str, where: str) -> None:
    if status < 400:
        return
    text = f"{where}: HTTP {status} {reason}".rstrip()
    if status in (404, 410):
        raise ImageNotFound(text)
    if status in (401, 403):
        raise ImageAccessDenied(text)
    raise ImageError(text)


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
            raise ImageError(f"{where}: timed out after {limits.http_timeout} s reading the body")
    return bytes(buf)


def _fetch_s3(uri: str, limits: ImageLimits, desc: str) -> bytes:
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise ImageError(f"{desc}: expected s3://bucket/key")
    client = limits.s3_client_factory() if limits.s3_client_factory else _default_s3_client()
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise _s3_error(exc, desc) from exc
    except BotoCoreError as exc:
        raise ImageError(f"{desc}: S3 request failed: {exc}") from exc
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
        raise ImageError(f"{desc}: S3 read failed: {exc}") from exc
    finally:
        body.close()


def _s3_error(exc: Any, desc: str) -> ImageError:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    text = f"{desc}: S3 {code or status}: {err.get('Message', '')}".rstrip(": ")
    if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404") or status == 404:
        return ImageNotFound(text)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
        return ImageAccessDenied(text)
    return ImageError(text)


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
            except ImportError as exc:
                raise ImageError("s3:// images need boto3: pip install 'scalecap-fleet[producer]'") from exc
            client = _s3_clients[key] = boto3.client("s3", **kwargs)
    return client


# -- address guard -----------------------------------------------------------------------------


def _forbidden_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not a public one (None when it is), looking inside v4-in-v6 forms."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _forbidden_reason(ip.ipv4_mapped)
        if ip.sixtofour is not None and _forbidden_reason(ip.sixtofour):
            return "6to4 of " + str(_forbidden_reason(ip.sixtofour))
        if ip in _NAT64:
            return _forbidden_reason(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for attr in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(ip, "is_" + attr):
            return attr.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class _AddressRefused(ImageAccessDenied):
    """Raised inside the transport; re-raised as ImageAccessDenied with the source's name."""


def _vetted_addresses(host: str, port: int, networks: Sequence[Any]) -> list[str]:
    """Every address `host` resolves to, or ImageAccessDenied if any one of them is not public."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for addr in addrs:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
        reason = _forbidden_reason(ip)
        if reason and not any(ip in net for net in networks):
            shown = f"host {host}" + ("" if host == addr else f" resolves to {addr}")
            raise _AddressRefused(f"{shown}, a {reason} address: refused (allow_private_urls is off)")
    return addrs


_transport_lock = threading.Lock()
_transport_classes: dict[str, type] = {}


def _public_only_transport(limits: ImageLimits) -> Any:
    """An httpx transport whose every TCP connection goes to a vetted public address.

    The check sits where the socket is opened, so a redirect or a DNS answer that changes
    between check and connect cannot slip through; TLS still verifies the original host name.
    """
    with _transport_lock:
        if not _transport_classes:
            _transport_classes["transport"] = _build_transport_class()
    return _transport_classes["transport"](_networks(limits))


def _build_transport_class() -> type:
    import httpcore
    import httpx

    class PublicOnlyBackend(httpcore.SyncBackend):
        def __init__(self, networks: Sequence[Any]) -> None:
            self.networks = networks

        def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> Any:
            try:
                addrs = _vetted_addresses(host, port, self.networks)
            except socket.gaierror as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
            error: Exception = httpcore.ConnectError(f"no address for {host}")
            for addr in addrs:
                try:
                    return super().connect_tcp(addr, port, timeout, local_address, socket_options)
                except httpcore.ConnectError as exc:
                    error = exc
            raise error

    class PublicOnlyTransport(httpx.HTTPTransport):
        def __init__(self, networks: Sequence[Any]) -> None:
            super().__init__(trust_env=False)
            self._pool = httpcore.ConnectionPool(
                ssl_context=_ssl_context(), network_backend=PublicOnlyBackend(networks)
            )

    return PublicOnlyTransport


_ssl_lock = threading.Lock()
_ssl: list[Any] = []


def _ssl_context() -> Any:
    """One verified TLS context per process: building one reads the CA bundle."""
    import httpx

    with _ssl_lock:
        if not _ssl:
            _ssl.append(httpx.create_ssl_context())
    return _ssl[0]


# -- decoding ----------------------------------------------------------------------------------


def _decode(data: bytes, limits: ImageLimits, desc: str, hint: str = "") -> Image.Image:
    if not data:
        raise EmptyImage(f"{desc}: empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{desc}: {len(data)} bytes is over max_bytes={limits.max_bytes}")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over Pillow's own hard limit, at open
        raise ImageTooLarge(f"{desc}: too many pixels to decode: {exc}") from exc
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
    out = _fit(_to_rgb(im, desc), limits)
    return out.copy() if out is original and not in_place else out


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _to_rgb(im: Image.Image, desc: str) -> Image.Image:
    """RGB by the right route for each mode: scale deep images, composite alpha on white."""
    if im.mode in _HIGH_DEPTH:
        return Image.fromarray(_to_8bit(np.asarray(im), im.mode)).convert("RGB")
    try:
        if im.mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            return canvas.convert("RGB")
        return im if im.mode == "RGB" else im.convert("RGB")
    except ValueError as exc:
        raise NotAnImage(f"{desc}: cannot convert mode {im.mode} to RGB: {exc}") from exc


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """16-bit data maps 0..65535 onto 0..255 (v/257, rounded); anything else by its own range.

    Mode I holds 16-bit sources (PGM, some TIFFs) as int32, so values within 0..65535 are taken
    as 16-bit; floats within 0..1 as fractions.
    """
    if mode.startswith("I;16") or (mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535):
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = np.nan_to_num(arr.astype(np.float64))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
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
