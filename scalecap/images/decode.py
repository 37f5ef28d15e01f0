"""Decoding within bounds: encoded bytes or a PIL image become an RGB image of a bounded size.

A pixel cap is read from the header before any decoding (a 50 KB PNG can claim 20000x20000
pixels), a process-wide gate bounds decodes at once (one worker runs ~64 jobs; a few big decodes
together must not kill them all), deep (16-bit, float) images are reduced a strip at a time, and
the result is scaled into [min_pixels, max_pixels]. Pillow's global settings are read, never
changed: this runs in many threads at once.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import struct
import threading
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from scalecap.errors import EmptyImage, ImageTooLarge, NotAnImage, TruncatedImage
from scalecap.images.limits import ImageLimits
from scalecap.images.refs import describe_source

__all__ = ["decode_bytes", "decode_gate", "encode_data_url", "normalize_image", "warn_truncated_once"]

log = logging.getLogger(__name__)

# Decoder failures that mean "the data stops early or is damaged" rather than "not an image".
_DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError, IndexError, struct.error, zlib.error)


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


def warn_truncated_once() -> None:
    """Say once per process that another library made Pillow accept truncated images."""
    if not _warned.is_set():
        _warned.set()
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set elsewhere in this process): "
            "truncated images will decode with grey areas instead of raising TruncatedImage"
        )


# -- decoding ----------------------------------------------------------------------------------


def normalize_image(im: Image.Image, limits: ImageLimits, desc: str) -> Image.Image:
    """A caller's PIL image checked, oriented, RGB and scaled; never the caller's object."""
    im = _check_and_load(im, limits, desc, draft=False)  # draft would alter the caller's
    return _finish(im, limits, desc, in_place=False)


def decode_bytes(data: bytes, limits: ImageLimits, desc: str, hint: str = "") -> Image.Image:
    """A new RGB image from encoded bytes; `hint` (a content type) goes into a not-an-image error."""
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
