"""Good and bad image files for any test that loads images (`write_corpus(tmp_path)`).

Every file is generated, small and deterministic; the 20000x20000 PNG is a valid 1-bit image of
zeros that compresses to about 50 KB, so a loader that decodes before checking the header size
would allocate hundreds of megabytes.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, features

from scalecap.errors import (
    EmptyImage,
    ImageError,
    ImageNotFound,
    ImageTooLarge,
    NotAnImage,
    TruncatedImage,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)

GOOD = (
    "jpeg",
    "png",
    "exif_rotated_jpeg",
    "cmyk_jpeg",
    "png16",
    "gif_animated",
    "apng_animated",
    "rgba_png",
    "palette_png",
    "tiny_png",
    "big_jpeg",
) + (("webp_animated",) if features.check("webp") else ())
"""Names that load; each becomes an RGB image."""

EXPECTED_ERRORS: dict[str, type[ImageError]] = {
    "missing": ImageNotFound,
    "empty": EmptyImage,
    "truncated_jpeg": TruncatedImage,
    "text_as_jpg": NotAnImage,
    "huge_png": ImageTooLarge,
    "truncated_png": TruncatedImage,
}
"""Names that must fail, and the error each must raise."""

HUGE_SIDE = 20000

PNG16_VALUES = (np.arange(64 * 64, dtype=np.uint32) * 16).reshape(64, 64).astype(np.uint16)
"""The 16-bit samples of `png16` (0..65520); loaded right, pixel v reads round(v / 257)."""


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Incompressible RGB pixels, so cutting a file anywhere lands inside the pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def halves(size: tuple[int, int], left: tuple[int, ...], right: tuple[int, ...], mode: str = "RGB"):
    """An image whose left half is `left` and right half `right` (orientation and alpha tests)."""
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@functools.lru_cache(maxsize=4)
def huge_png_bytes(width: int = HUGE_SIDE, height: int = HUGE_SIDE) -> bytes:
    """A valid 1-bit greyscale PNG of zeros with the given header size (20000² ≈ 50 KB)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then packed zero bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _animated(fmt: str, colors: list[tuple[int, int, int]], **kwargs) -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in colors]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kwargs)


def _files() -> dict[str, bytes | None]:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, *BLUE] + [0] * (256 - 2) * 3)
    palette.paste(1, (32, 0, 64, 64))
    jpeg = encode(noise(128, 96, seed=1), "JPEG", quality=90)
    png = encode(noise(128, 96, seed=2), "PNG")
    files: dict[str, bytes | None] = {
        "jpeg": jpeg,
        "png": encode(noise(96, 64, seed=3), "PNG"),
        "exif_rotated_jpeg": encode(halves((96, 48), RED, BLUE), "JPEG", exif=exif.tobytes()),
        "cmyk_jpeg": encode(halves((64, 64), (255, 0, 0, 0), (0, 0, 0, 0), "CMYK"), "JPEG"),
        "png16": encode(Image.fromarray(PNG16_VALUES), "PNG"),
        "gif_animated": _animated("GIF", [RED, GREEN, BLUE], loop=0),
        "apng_animated": _animated("PNG", [BLUE, RED], loop=0),
        "rgba_png": encode(halves((64, 64), (0, 0, 0, 0), (255, 0, 0, 128), "RGBA"), "PNG"),
        "palette_png": encode(palette, "PNG", transparency=0),
        "tiny_png": encode(Image.new("RGB", (10, 10), GREEN), "PNG"),
        "big_jpeg": encode(Image.new("RGB", (2400, 1800), BLUE), "JPEG"),
        "missing": None,
        "empty": b"",
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "text_as_jpg": b"This is a text file with a .jpg name, not a picture.\n" * 4,
        "huge_png": huge_png_bytes(),
        "truncated_png": png[: len(png) // 2],
    }
    if "webp_animated" in GOOD:
        files["webp_animated"] = _animated("WEBP", [GREEN, RED], lossless=True)
    return files


_SUFFIX = {"webp_animated": ".webp", "gif_animated": ".gif", "text_as_jpg": ".jpg", "empty": ".jpg"}


def write_corpus(directory: str | Path) -> dict[str, Path]:
    """Write every corpus item into `directory`; returns name -> path (`missing` is not created)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, data in _files().items():
        suffix = _SUFFIX.get(name, ".jpg" if "jpeg" in name or name == "missing" else ".png")
        path = root / f"{name}{suffix}"
        if data is not None:
            path.write_bytes(data)
        out[name] = path
    return out
