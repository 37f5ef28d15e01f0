"""Thumbnails for the viewer, read through the workers' own guarded image loader.

The API loads an image only for a job of a batch the caller may read, and only with the limits a
worker would apply (`Settings`: allowed local roots, the private-address refusal on every http
hop, the allowed networks, the byte cap, the header pixel cap). So the viewer reaches exactly
what the fleet already reaches for that caller's batches: no new SSRF or path hole.

Memory is bounded: a JPEG is decoded at reduced size (Pillow `draft`, DCT scaling), every image
is shrunk with `reduce` before resampling, one decode runs at a time per API process, on one
thread (so at most one image of at most SCALECAP_MAX_DECODE_PIXELS is in memory), and the JPEG
bytes (or the failure) are cached once per (owner, image, size) in at most CACHE_BYTES.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Any

from scalecap.errors import ImageError, ImageFetchError
from scalecap.images import ImageLimits, load_image
from scalecap.settings import Settings

SIZES = (160, 640)
"""Longest side of the thumbnails served, in pixels (list rows, caption viewer)."""


def limits_for(settings: Settings, size: int) -> ImageLimits:
    """The worker's limits (`ImageLimits.from_settings`, as `scalecap worker` builds them),
    scaled for a preview."""

    def s3() -> Any:
        return _s3_client(settings)

    return ImageLimits.from_settings(
        settings,
        min_pixels=1,  # never upscale a preview; the browser scales it
        max_pixels=size * size,
        s3_client_factory=s3,
    )


_clients: dict[int, Any] = {}


def _s3_client(settings: Settings) -> Any:
    key = id(settings)
    if key not in _clients:
        from scalecap.images import s3_client

        _clients[key] = s3_client(settings)
    return _clients[key]


def snap_size(size: int) -> int:
    """The smallest served size at least `size` (the largest for anything bigger)."""
    return next((s for s in SIZES if s >= size), SIZES[-1])


CACHE_BYTES = 16 * 1024 * 1024
"""Thumbnail bytes kept per API process (least recently used go first)."""
_cache: OrderedDict[tuple[str, str, int], bytes | ImageError] = OrderedDict()
_cache_bytes = 0
_cache_lock = threading.Lock()
_decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="thumbnail")
"""One thumbnail decode at a time, always on the same thread: the viewer never holds two
full-size bitmaps, and the allocator reuses one arena instead of growing one per request thread."""


def _cache_get(key: tuple[str, str, int]) -> bytes | ImageError | None:
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
        return hit


def _cache_put(key: tuple[str, str, int], value: bytes | ImageError) -> None:
    global _cache_bytes
    cost = len(value) if isinstance(value, bytes) else 256
    with _cache_lock:
        if key in _cache:
            return
        _cache[key] = value
        _cache_bytes += cost
        while _cache_bytes > CACHE_BYTES and _cache:
            _, old = _cache.popitem(last=False)
            _cache_bytes -= len(old) if isinstance(old, bytes) else 256


def cache_clear() -> None:
    global _cache_bytes
    with _cache_lock:
        _cache.clear()
        _cache_bytes = 0


def thumbnail(ref: str, settings: Settings, size: int, *, owner: str = "") -> bytes:
    """JPEG bytes of `ref` fitting in size x size; raises scalecap.errors.ImageError.

    Cached per `owner` (the key that may read `ref`), so one tenant's views tell another nothing."""
    size = snap_size(size)
    key = (owner, hashlib.sha256(ref.encode("utf-8", "surrogatepass")).hexdigest(), size)
    hit = _cache_get(key)
    if hit is None:
        hit = _decoder.submit(_render_once, key, ref, settings, size).result()
    if isinstance(hit, ImageError):
        raise hit
    return hit


def _render_once(key: tuple[str, str, int], ref: str, settings: Settings, size: int) -> bytes | ImageError:
    """On the decoder thread: the cached entry (made while this request waited), or a new one."""
    hit = _cache_get(key)
    if hit is not None:
        return hit
    try:
        hit = _render(ref, settings, size)
    except ImageFetchError:
        raise  # may pass: not cached
    except ImageError as exc:
        hit = type(exc)(type(exc).__name__)  # keep the kind, not the message
    _cache_put(key, hit)
    return hit


def _render(ref: str, settings: Settings, size: int) -> bytes:
    im = load_image(ref, limits=limits_for(settings, size))  # JPEG: decoded via draft
    im.thumbnail((size, size), reducing_gap=2.0)  # reduce() first, then a cheap resample
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85, optimize=True)
    return buf.getvalue()


@lru_cache(maxsize=16)
def placeholder_svg(label: str) -> bytes:
    """A neutral tile for an image that cannot be shown, naming why (an error type, not a path)."""
    text = "".join(c for c in label if c.isalnum() or c in " -_.")[:40]
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="160" height="120" viewBox="0 0 160 120">'
        '<rect width="160" height="120" rx="8" fill="#e7e9ee"/>'
        '<path d="M52 78l18-22 14 16 10-12 14 18z" fill="#b8bdc9"/>'
        '<circle cx="100" cy="46" r="7" fill="#b8bdc9"/>'
        f'<text x="80" y="104" font-family="sans-serif" font-size="10" fill="#6b7280" '
        f'text-anchor="middle">{text}</text></svg>'
    ).encode()


__all__ = ["CACHE_BYTES", "SIZES", "cache_clear", "limits_for", "placeholder_svg", "snap_size", "thumbnail"]
