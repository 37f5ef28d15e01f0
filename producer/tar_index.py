"""WebDataset tar shards indexed from their headers: one row per image member, with the member's
byte span and its sidecars' spans in a `wds+` reference (scalecap.images.refs), so a worker reads
just that member. One forward pass: a local file seeks over the data, an S3 object streams through
a fixed buffer, so memory stays constant whatever the shard's size. A damaged or cut shard keeps
every member before the damage and ends with an error row."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from producer.source_rows import SourceRow, error_row, is_image_name
from scalecap.images.refs import SIDECAR_EXTENSIONS, MemberRef, Span

__all__ = ["local_tar_rows", "s3_tar_rows", "tar_members", "wds_rows"]

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_MAX_META_HEADER = 1 << 20  # a pax or GNU long-name header larger than this is not a real one
_SKIP_CHUNK = 256 * 1024  # a streamed (S3) shard's member data is read through and dropped


@dataclass
class _Member:
    name: str
    offset: int
    size: int
    complete: bool


@dataclass
class _Problem:
    type: str
    message: str


class _Forward:
    """A forward-only reader over a local file (skips by seeking) or a stream (skips by reading
    through a fixed buffer), counting its position."""

    def __init__(self, fh: Any, size: int, seekable: bool) -> None:
        self.fh, self.size, self.seekable, self.pos = fh, size, seekable, 0

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.fh.read(n - len(out))
            if not chunk:
                break
            out += chunk
        self.pos += len(out)
        return bytes(out)

    def skip(self, n: int) -> int:
        if self.seekable:
            n = max(0, min(n, self.size - self.pos))
            self.fh.seek(self.pos + n)
            self.pos += n
            return n
        done = 0
        while done < n:  # read and drop: at most one chunk is held
            got = len(self.fh.read(min(_SKIP_CHUNK, n - done)))
            if not got:
                break
            done += got
            self.pos += got
        return done


def _pax_records(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data):
        sp = data.index(b" ", i)
        length = int(data[i:sp])
        key, _, value = data[sp + 1 : i + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def tar_members(r: _Forward) -> Iterator[_Member | _Problem]:
    """Regular members of a tar (name, data offset, size) in order, from headers only; a damaged
    or cut shard ends with a _Problem after every member before the damage."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        start = r.pos
        block = r.read(_BLOCK)
        if not block:
            yield _Problem("TruncatedShard", f"ends at byte {start} without the tar end-of-archive marker")
            return
        if len(block) < _BLOCK:
            yield _Problem("TruncatedShard", f"cut inside the tar header at byte {start}")
            return
        if block == _ZERO_BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            yield _Problem("CorruptShard", f"bad tar header at byte {start}: {exc}")
            return
        try:
            size = int(pax.get("size", info.size))
        except ValueError:
            size = info.size
        pad = -size % _BLOCK
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME):
            if size > _MAX_META_HEADER:
                yield _Problem("CorruptShard", f"tar extended header of {size} bytes at byte {start}")
                return
            data = r.read(size)
            if len(data) < size:
                yield _Problem("TruncatedShard", f"cut inside the tar extended header at byte {start}")
                return
            r.skip(pad)
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type == tarfile.XHDTYPE:
                try:
                    pax = _pax_records(data)
                except ValueError:
                    yield _Problem("CorruptShard", f"bad pax header at byte {start}")
                    return
            continue
        name = long_name or pax.get("path") or info.name
        long_name, pax = None, {}
        offset = r.pos
        got = r.skip(size)
        if info.isreg():
            yield _Member(name, offset, size, got == size)
        if got < size:
            return  # the member says why; nothing follows it
        r.skip(pad)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name."""
    name = name[2:] if name.startswith("./") else name
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _sample_rows(shard: str, key: str, members: list[_Member]) -> Iterator[SourceRow]:
    sidecars: dict[str, Span] = {}
    for m in members:
        ext = _split_name(m.name)[1]
        if ext in SIDECAR_EXTENSIONS and m.complete:
            sidecars[ext] = Span(m.offset, m.size)
    images = [m for m in members if is_image_name("x." + _split_name(m.name)[1])]
    if not images:
        names = ", ".join(m.name for m in members[:8])
        yield error_row(f"{shard}#{key}", "NoImageMember", f"sample {key!r} has no image member ({names})")
    for m in images:
        ref = MemberRef(shard, key, _split_name(m.name)[1], Span(m.offset, m.size), sidecars).to_ref()
        if m.complete:
            yield SourceRow(ref)
        else:
            yield SourceRow(ref, {"stage": "submit", "type": "TruncatedShard",
                                  "message": f"{m.name}: the shard ends inside this member's data"})


def wds_rows(shard: str, r: _Forward) -> Iterator[SourceRow]:
    """One row per image member of a tar shard (its sidecars recorded in the reference); a
    sample without an image, a cut member or a damaged header becomes an error row."""
    key: str | None = None
    group: list[_Member] = []
    try:
        for item in tar_members(r):
            if isinstance(item, _Problem):
                if group:
                    yield from _sample_rows(shard, key or "", group)
                    group = []
                yield error_row(f"{shard}@{r.pos}", item.type, f"{shard}: {item.message}")
                return
            k, _ = _split_name(item.name)
            if k != key and group:
                yield from _sample_rows(shard, key or "", group)
                group = []
            key = k
            group.append(item)
    except OSError as exc:
        yield from (_sample_rows(shard, key or "", group) if group else ())
        yield error_row(f"{shard}@{r.pos}", "UnreadableShard", f"{shard}: read failed at byte {r.pos}: {exc}")
        return
    if group:
        yield from _sample_rows(shard, key or "", group)


def local_tar_rows(path: str) -> Iterator[SourceRow]:
    """Rows of a local tar shard; an unreadable file is one error row."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after the generator is drained
    except OSError as exc:
        yield error_row(path, "UnreadableShard", f"{path}: {exc}")
        return
    with fh:
        yield from wds_rows(path, _Forward(fh, os.fstat(fh.fileno()).st_size, seekable=True))


def s3_tar_rows(url: str, client: Any) -> Iterator[SourceRow]:
    """Rows of a tar shard on S3, streamed once; an unreadable object is one error row."""
    bucket, _, key = url[5:].partition("/")
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore ClientError/BotoCoreError: the shard, not the batch
        yield error_row(url, "UnreadableShard", f"{url}: {exc}")
        return
    body = obj["Body"]
    try:
        yield from wds_rows(url, _Forward(body, int(obj.get("ContentLength") or 0), seekable=False))
    finally:
        body.close()
