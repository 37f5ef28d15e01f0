"""Image loading, the package's public face: any image reference becomes an RGB PIL image within
bounds (load_image), or its encoded bytes read under the same guards (read_image_bytes), or a
typed error.

Workers read references from manifests written by someone else, so loading is also a guard:
byte caps while reading, a pixel cap before decoding (decode.py), local paths confined to allowed
roots after resolving symlinks (local.py), http(s) fetches that refuse loopback, private and
link-local addresses at connect time and on every redirect hop (fetch.py), s3:// buckets confined
to an allow-list (s3.py), shard members read by range (shards.py). Transient fetch failures are
retried with backoff before they count (transient.py). Every error names the source, so a failed
record says which image and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile

from scalecap.errors import ImageError
from scalecap.images.decode import decode_bytes, decode_gate, normalize_image, warn_truncated_once
from scalecap.images.fetch import fetch_http
from scalecap.images.limits import ImageLimits
from scalecap.images.local import decode_data_uri, read_local
from scalecap.images.refs import describe_source, image_ref_kind, parse_ref
from scalecap.images.s3 import fetch_s3
from scalecap.images.shards import read_shard_ref

__all__ = ["ImageBytes", "ImageLimits", "load_image", "read_image_bytes"]


@dataclass(frozen=True)
class ImageBytes:
    """An image's encoded bytes as read, before any decoding."""

    data: bytes
    desc: str
    """The log-safe name of the reference the bytes came from (a URL column's row: its URL)."""
    content_type: str = ""
    """The http(s) response's Content-Type; empty for other sources."""
    ext: str = ""
    """A WebDataset member's extension from its reference; empty for other sources."""


def read_image_bytes(source: Any, *, limits: ImageLimits | None = None) -> ImageBytes:
    """The encoded bytes `source` (bytes, Path, or str: path, file://, http(s)://, s3://, data:,
    wds+/pq+ shard reference) points at, read under `limits`' guards and caps, not decoded.

    For copying originals (the WebDataset export) as well as for load_image. A PIL image has no
    encoded bytes: ImageError, as for any unsupported reference.
    """
    limits = limits or ImageLimits()
    desc = describe_source(source)
    kind = image_ref_kind(source)
    if kind == "bytes":
        return ImageBytes(bytes(source), desc)
    if kind in ("path", "file"):
        return ImageBytes(read_local(source, limits, desc), desc)
    if kind == "http":
        data, ctype = fetch_http(source, limits, desc)
        return ImageBytes(data, desc, content_type=ctype)
    if kind == "s3":
        return ImageBytes(fetch_s3(source, limits, desc), desc)
    if kind == "data":
        return ImageBytes(decode_data_uri(source, limits, desc), desc)
    if kind == "shard":
        data_or_ref = read_shard_ref(source, limits, desc)  # a URL column's row names its image
        if isinstance(data_or_ref, str):
            return read_image_bytes(data_or_ref, limits=limits)
        return ImageBytes(data_or_ref, desc, ext=getattr(parse_ref(source), "ext", ""))
    raise ImageError(f"{desc}: unsupported image reference ({type(source).__name__})")


def load_image(source: Any, *, limits: ImageLimits | None = None) -> Image.Image:
    """Load `source` (PIL image, bytes, Path, or str: path, file://, http(s)://, s3://, data:).

    Returns a new RGB image with EXIF orientation applied and its pixel count within
    [min_pixels, max_pixels]. Raises an ImageError subclass naming the source.
    """
    limits = limits or ImageLimits()
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warn_truncated_once()
    if image_ref_kind(source) == "image":
        with decode_gate(limits.max_concurrent_decodes):
            return normalize_image(source, limits, describe_source(source))
    got = read_image_bytes(source, limits=limits)
    hint = f"content-type {got.content_type}" if got.content_type else ""
    with decode_gate(limits.max_concurrent_decodes):
        return decode_bytes(got.data, limits, got.desc, hint)
