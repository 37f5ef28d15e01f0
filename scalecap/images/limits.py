"""ImageLimits: what one image load may cost (bytes, pixels, decodes at once) and reach (roots,
addresses, buckets). Every reader in this package takes one; it lives apart so none of them has
to import the public face (load.py) that imports them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scalecap.errors import ConfigError
from scalecap.netguard import AddressPolicy, parse_networks

__all__ = ["READ_CHUNK", "ImageLimits", "address_policy"]

READ_CHUNK = 1 << 16
"""Bytes per read from a response body or an S3 stream."""


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
    """Extra tries after a transient fetch failure (HTTP 5xx/408/425/429, timeout, reset, S3
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


def address_policy(limits: ImageLimits) -> AddressPolicy:
    """The connect-time address guard (scalecap.netguard) these limits ask for."""
    return AddressPolicy(limits.allow_private_urls, _networks(limits), "allow_private_urls")
