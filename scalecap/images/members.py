"""A WebDataset member is read with its own tar header, so a reference cannot point anywhere else.

A `wds+` reference names byte ranges (the image member, its `.txt`/`.json` sidecars). Whoever
wrote it, the worker reads the 512-byte tar header just before each range with the range itself
and checks that it describes exactly that member: a valid header checksum, a regular file, the
range's size, and the sample's own key with the expected extension. So a hand-written reference
with `offset=0&txt=0:93` on some other file yields an error, never that file's bytes, and a
record carries no text that is not the sample's own `.txt`/`.json`. The HTTP API runs the same
check on the references clients send, before it queues them.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable

from scalecap.errors import ImageAccessDenied

BLOCK = 512


class NotThisMember(ImageAccessDenied):
    """The bytes before a range are not the tar header of the member the reference names."""


def member_name_matches(header_name: str, key: str, ext: str) -> bool:
    """Whether a tar member named `header_name` is sample `key`'s `.ext` member.

    A name over 100 bytes lives in a pax or GNU long-name header before this one; the ustar
    header then holds a cut copy, which must be the start of the full name."""
    name = header_name[2:] if header_name.startswith("./") else header_name
    want = f"{key}.{ext}"
    if name == want or name.lower() == f"{key}.{ext.lower()}":
        return True
    return len(want.encode()) > 99 and len(name) >= 90 and want.startswith(name)


def check_header(header: bytes, key: str, ext: str, size: int, desc: str) -> None:
    """NotThisMember unless `header` is the tar header of sample `key`'s `.ext` member of `size` bytes."""
    if len(header) != BLOCK:
        raise NotThisMember(f"{desc}: no tar header before this range")
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        raise NotThisMember(f"{desc}: the bytes before this range are not a tar header") from None
    if not info.isreg() or info.size != size or not member_name_matches(info.name, key, ext):
        raise NotThisMember(f"{desc}: the range is not the member {key}.{ext} of this shard")


def read_member(read: Callable[[int, int], bytes], key: str, ext: str, offset: int, size: int,
                desc: str) -> bytes:
    """The data of member `key.ext` at `offset` (`size` bytes), read with `read(offset, size)` in
    one range together with its header, which must name exactly that member (NotThisMember)."""
    if offset < BLOCK or offset % BLOCK:
        raise NotThisMember(f"{desc}: a member's data starts on a 512-byte block after its header")
    raw = read(offset - BLOCK, size + BLOCK)
    check_header(raw[:BLOCK], key, ext, size, desc)
    return raw[BLOCK:]


__all__ = ["BLOCK", "NotThisMember", "check_header", "member_name_matches", "read_member"]
