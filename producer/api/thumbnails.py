"""Thumbnails for the viewer, read through the workers' own guarded image loader.

The API loads an image only for a job of a batch the caller may read, and only with the limits a
worker would apply (`Settings`: allowed local roots, the private-address refusal on every http
hop, the allowed networks, the byte cap, the header pixel cap). So the viewer reaches exactly
what the fleet already reaches for that caller's batches: no new SSRF or path hole.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

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


def thumbnail(ref: str, settings: Settings, size: int) -> bytes:
    """JPEG bytes of `ref` fitting in size x size; raises scalecap.errors.ImageError."""
    size = snap_size(size)
    im = load_image(ref, limits=limits_for(settings, size))
    im.thumbnail((size, size))
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


__all__ = ["SIZES", "limits_for", "placeholder_svg", "snap_size", "thumbnail"]
