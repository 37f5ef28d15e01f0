"""Local files, file:// URIs and data: URIs, and the one rule for which local paths may be read.

A path is read only inside the allowed roots, judged after resolving symlinks, so a link inside
a root cannot lead out of it. The HTTP API (producer/api/refs.py) applies the same rule to the
references it accepts, lexically and on the resolved path.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from scalecap.errors import ImageAccessDenied, ImageError, ImageNotFound, ImageTooLarge, NotAnImage
from scalecap.images.limits import ImageLimits
from scalecap.images.refs import image_ref_kind

__all__ = ["allowed_local_path", "decode_data_uri", "local_read_errors", "read_local", "under_roots"]

Roots = Sequence[str | os.PathLike[str]]


def under_roots(path: str, roots: Roots, *, resolve: bool = True) -> bool:
    """Whether `path` is one of `roots` or below one. With resolve, both sides have their symlinks
    resolved first; without, they are only made absolute and normalised (the lexical check)."""
    norm = os.path.realpath if resolve else (lambda p: os.path.normpath(os.path.abspath(p)))
    real = norm(path)
    for root in roots:
        r = norm(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def allowed_local_path(path: str, roots: Roots | None, desc: str) -> str:
    """The resolved path if `roots` allow reading it (None: any path; []: none), else
    ImageAccessDenied naming `desc`."""
    if roots is not None and not roots:
        raise ImageAccessDenied(f"{desc}: local files are not allowed (no allowed roots)")
    real = os.path.realpath(path)
    if roots is not None and not under_roots(real, roots):
        raise ImageAccessDenied(f"{desc}: local path is outside the allowed roots")
    return real


@contextmanager
def local_read_errors(desc: str, missing: str = "no such file") -> Iterator[None]:
    """OS errors while reading a local file, raised as the typed image errors naming `desc`."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ImageNotFound(f"{desc}: {missing}") from exc
    except PermissionError as exc:
        raise ImageAccessDenied(f"{desc}: permission denied") from exc
    except OSError as exc:
        raise ImageError(f"{desc}: cannot read: {exc}") from exc


def read_local(source: str | os.PathLike[str], limits: ImageLimits, desc: str) -> bytes:
    """The bytes of a local path or file:// URI, within the allowed roots and max_bytes."""
    if isinstance(source, str) and image_ref_kind(source) == "file":
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"{desc}: file:// URIs on another host are not supported")
        path = unquote(parts.path)
    else:
        path = os.fspath(source)
    real = allowed_local_path(path, limits.allowed_roots, desc)
    with local_read_errors(desc):
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
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"{desc}: over max_bytes={limits.max_bytes}")
    return data


def decode_data_uri(uri: str, limits: ImageLimits, desc: str) -> bytes:
    """The payload of a data: URI (base64 or percent-encoded), within max_bytes."""
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
