"""Expand what a user submits (manifests, directories, S3 prefixes, lists) into image rows, lazily.

Everything here is a generator: a 100-million-line manifest is read one line at a time, so
submission runs in constant memory and the first jobs are queued (and running) long before the
last line is read. A line that cannot become a job (bad JSON, no image field) is not dropped: it
becomes a row with an error, which the client records as a failed job with an error record.

Shards (WebDataset `.tar`, Parquet / HF datasets `.parquet`) expand into one row per image member
or row, each with a `wds+`/`pq+` reference (scalecap/images/shards.py) that tells a worker where its
bytes are. A tar is indexed by reading its headers in one forward pass (local files seek over the
data; S3 objects stream through a fixed buffer), a Parquet file by its footer and, when needed,
its URL/id columns one row group at a time: memory stays constant whatever the shard's size.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalecap.images.shards import (
    SIDECAR_EXTENSIONS,
    MemberRef,
    RowRef,
    Span,
    import_pyarrow_parquet,
    open_parquet,
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".jsonl.txt")
TAR_EXTENSIONS = (".tar",)
PARQUET_EXTENSIONS = (".parquet",)
_URL_SCHEMES = ("http://", "https://", "s3://", "file://", "data:")


@dataclass(frozen=True)
class SourceRow:
    """One future job: an image reference, or an error explaining why there is none."""

    ref: str
    error: dict[str, str] | None = None
    """Set for a row that cannot be captioned; `ref` then names the offending line."""


def _bad(where: str, kind: str, message: str) -> SourceRow:
    return SourceRow(ref=where, error={"stage": "submit", "type": kind, "message": message})


def is_manifest(name: str) -> bool:
    return name.lower().endswith(MANIFEST_EXTENSIONS)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name.lower())[1] in IMAGE_EXTENSIONS


def is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_EXTENSIONS)


def is_parquet(name: str) -> bool:
    return name.lower().endswith(PARQUET_EXTENSIONS)


def is_shard(name: str) -> bool:
    return is_tar(name) or is_parquet(name)


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> Iterator[str]:
    """`shards/{00000..00127}.tar` (zero padding kept) or `{a,b}`; several groups expand in turn."""
    m = _BRACE.search(pattern)
    if m is None:
        yield pattern
        return
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # not a pattern: a literal brace in a name
        yield from (head + "{" + body + "}" + t for t in expand_braces(tail))
        return
    for item in items:
        yield from expand_braces(head + item + tail)


def _resolve(ref: str, base: Path | None) -> str:
    """Relative local paths in a manifest are relative to the manifest's folder."""
    if ref.startswith(_URL_SCHEMES) or base is None:
        return ref
    p = Path(ref).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def manifest_rows(lines: Iterable[str], where: str, *, image_key: str = "image",
                  base: Path | None = None) -> Iterator[SourceRow]:
    """Rows of a JSONL manifest; each line an object whose `image_key` holds the reference."""
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        at = f"{where}:{n}"
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            yield _bad(at, "MalformedLine", f"line {n} is not JSON: {exc}")
            continue
        if isinstance(obj, str):
            yield SourceRow(_resolve(obj, base))
            continue
        if not isinstance(obj, dict):
            yield _bad(at, "MalformedLine", f"line {n} is not a JSON object")
            continue
        ref = obj.get(image_key)
        if not isinstance(ref, str) or not ref.strip():
            yield _bad(at, "MissingImageKey", f"line {n} has no {image_key!r} string")
            continue
        yield SourceRow(_resolve(ref.strip(), base))


def directory_rows(root: Path, shards: Callable[[str], Iterator[SourceRow]] | None = None
                   ) -> Iterator[SourceRow]:
    """Image files under `root`, recursively, in a stable (sorted) order, one folder at a time;
    `.tar`/`.parquet` files go through `shards` (one row per member or row)."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield _bad(str(folder), "UnreadableDirectory", str(exc))
            continue
        subdirs = []
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(Path(e.path))
            elif e.is_file() and is_image_name(e.name):
                yield SourceRow(str(Path(e.path).resolve()))
            elif e.is_file() and is_shard(e.name) and shards is not None:
                yield from shards(str(Path(e.path).resolve()))
        stack.extend(reversed(subdirs))


def _s3_lines(client: Any, bucket: str, key: str) -> Iterator[str]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    for raw in body.iter_lines():
        yield raw.decode("utf-8", errors="replace")


def s3_rows(url: str, client: Any, *, image_key: str = "image",
            shards: Callable[[str], Iterator[SourceRow]] | None = None) -> Iterator[SourceRow]:
    """An S3 manifest object, one image object, a shard, or every image object and shard under a
    prefix (shards go through `shards`)."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if is_manifest(key):
        yield from manifest_rows(_s3_lines(client, bucket, key), url, image_key=image_key)
        return
    if is_image_name(key):
        yield SourceRow(url)
        return
    if is_shard(key) and shards is not None:
        yield from shards(url)
        return
    prefix = key if not key or key.endswith("/") else key + "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if is_image_name(obj["Key"]):
                yield SourceRow(f"s3://{bucket}/{obj['Key']}")
            elif is_shard(obj["Key"]) and shards is not None:
                yield from shards(f"s3://{bucket}/{obj['Key']}")


# -- WebDataset tar shards -------------------------------------------------------------------------

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
        yield _bad(f"{shard}#{key}", "NoImageMember", f"sample {key!r} has no image member ({names})")
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
                yield _bad(f"{shard}@{r.pos}", item.type, f"{shard}: {item.message}")
                return
            k, _ = _split_name(item.name)
            if k != key and group:
                yield from _sample_rows(shard, key or "", group)
                group = []
            key = k
            group.append(item)
    except OSError as exc:
        yield from (_sample_rows(shard, key or "", group) if group else ())
        yield _bad(f"{shard}@{r.pos}", "UnreadableShard", f"{shard}: read failed at byte {r.pos}: {exc}")
        return
    if group:
        yield from _sample_rows(shard, key or "", group)


def _local_tar_rows(path: str) -> Iterator[SourceRow]:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after the generator is drained
    except OSError as exc:
        yield _bad(path, "UnreadableShard", f"{path}: {exc}")
        return
    with fh:
        yield from wds_rows(path, _Forward(fh, os.fstat(fh.fileno()).st_size, seekable=True))


def _s3_tar_rows(url: str, client: Any) -> Iterator[SourceRow]:
    bucket, _, key = url[5:].partition("/")
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore ClientError/BotoCoreError: the shard, not the batch
        yield _bad(url, "UnreadableShard", f"{url}: {exc}")
        return
    body = obj["Body"]
    try:
        yield from wds_rows(url, _Forward(body, int(obj.get("ContentLength") or 0), seekable=False))
    finally:
        body.close()


# -- Parquet / HF datasets files -------------------------------------------------------------------


def _column_kind(pa: Any, typ: Any) -> str | None:
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "url"
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return "bytes"
    if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
        return "bytes"  # HF datasets' Image feature: {bytes, path}
    return None


def _join(base: str, ref: str) -> str:
    """A relative path in a URL column is relative to the Parquet file's folder (or S3 prefix)."""
    if ref.startswith(_URL_SCHEMES) or ref.startswith("/"):
        return ref
    if base.startswith("s3://"):
        return base.rsplit("/", 1)[0] + "/" + ref
    return str((Path(base).parent / ref).resolve())


def parquet_rows(where: str, pf: Any, *, image_column: str, id_column: str | None) -> Iterator[SourceRow]:
    """One row per Parquet row. A URL/path column is read here (with the id column) one batch at
    a time; an image-bytes column is never read here: each worker reads its own row."""
    import pyarrow as pa

    names = pf.schema_arrow.names
    for col, flag in ((image_column, "--image-column"), (id_column, "--id-column")):
        if col is not None and col not in names:
            yield _bad(where, "MissingColumn",
                       f"{where} has no column {col!r} ({flag}); its columns: {', '.join(names[:20])}")
            return
    kind = _column_kind(pa, pf.schema_arrow.field(image_column).type)
    if kind is None:
        yield _bad(where, "WrongColumnType", f"{where}: column {image_column!r} is "
                   f"{pf.schema_arrow.field(image_column).type}, not a URL/path string or image bytes")
        return
    columns = [c for c in ((image_column if kind == "url" else None), id_column) if c]
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if not columns:
            for row in range(n):
                yield SourceRow(RowRef(where, rg, row, image_column).to_ref())
            continue
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=4096, row_groups=[rg], columns=columns):
                urls = batch.column(image_column).to_pylist() if kind == "url" else [None] * batch.num_rows
                ids = batch.column(id_column).to_pylist() if id_column else [None] * batch.num_rows
                for url, ident in zip(urls, ids, strict=True):
                    ref = RowRef(where, rg, row, image_column, None if ident is None else str(ident),
                                 _join(where, url.strip()) if isinstance(url, str) and url.strip() else None)
                    if kind == "url" and ref.url is None:
                        yield _bad(ref.to_ref(), "MissingImage", f"row {row} of row group {rg} has no URL")
                    else:
                        yield SourceRow(ref.to_ref())
                    row += 1
        except Exception as exc:  # pyarrow: a corrupt row group costs its own rows only
            for r in range(row, n):
                yield _bad(RowRef(where, rg, r, image_column).to_ref(), "CorruptRowGroup",
                           f"{where}: row group {rg} cannot be read: {type(exc).__name__}: {exc}")


def _parquet_rows(where: str, client: Any, image_column: str, id_column: str | None) -> Iterator[SourceRow]:
    import_pyarrow_parquet()  # no pyarrow: one clear error naming the [data] extra, not per file
    try:
        pf = open_parquet(where, s3_client=client)
    except Exception as exc:  # not Parquet, a cut footer, a missing object
        yield _bad(where, "UnreadableShard",
                   f"{where}: not a readable Parquet file: {type(exc).__name__}: {exc}")
        return
    with pf:
        yield from parquet_rows(where, pf, image_column=image_column, id_column=id_column)


# -- entry point -----------------------------------------------------------------------------------


def expand(
    sources: Iterable[Any] | str,
    *,
    image_key: str = "image",
    image_column: str | None = None,
    id_column: str | None = None,
    s3_client_factory: Callable[[], Any] | None = None,
) -> Iterator[SourceRow]:
    """Rows from any mix of: JSONL manifest paths, directories, s3:// manifests/prefixes/objects,
    WebDataset `.tar` shards and `.parquet` files (local or s3://, brace patterns such as
    `shards/{00000..00127}.tar` expand), image paths or URLs, dicts with `image_key`, or an
    iterable of those.

    `image_column` (default: `image_key`) names a Parquet file's image column: URL/path strings
    or image bytes; `id_column` keeps the dataset's own key. `s3_client_factory` is called once,
    on the first s3:// source."""
    if isinstance(sources, (str, os.PathLike, dict)):
        sources = [sources]
    column = image_column or image_key
    s3: list[Any] = []

    def s3_client(what: str) -> Any:
        if not s3:
            if s3_client_factory is None:
                raise ValueError(f"{what}: an S3 source needs S3 settings (SCALECAP_S3_*)")
            s3.append(s3_client_factory())
        return s3[0]

    def shards(where: str) -> Iterator[SourceRow]:
        client = s3_client(where) if where.startswith("s3://") else None
        if is_tar(where):
            yield from (_s3_tar_rows(where, client) if client is not None else _local_tar_rows(where))
        else:
            yield from _parquet_rows(where, client, column, id_column)

    for n, src in enumerate(sources, 1):
        if isinstance(src, dict):
            ref = src.get(image_key)
            if isinstance(ref, str) and ref.strip():
                yield SourceRow(ref.strip())
            else:
                yield _bad(f"item:{n}", "MissingImageKey", f"item {n} has no {image_key!r} string")
            continue
        if isinstance(src, SourceRow):
            yield src
            continue
        s = os.fspath(src)
        if _BRACE.search(s) and is_shard(s):
            for one in expand_braces(s):
                if one.startswith("s3://") or os.path.isfile(one):
                    yield from shards(one if one.startswith("s3://") else str(Path(one).resolve()))
                else:
                    yield _bad(one, "ShardNotFound", f"{one}: no such file (from the pattern {s})")
            continue
        if s.startswith("s3://"):
            yield from s3_rows(s, s3_client(s), image_key=image_key, shards=shards)
        elif s.startswith(_URL_SCHEMES):
            yield SourceRow(s)
        elif os.path.isdir(s):
            yield from directory_rows(Path(s), shards)
        elif is_shard(s):
            if os.path.isfile(s):
                yield from shards(str(Path(s).resolve()))
            else:
                yield _bad(s, "ShardNotFound", f"{s}: no such file")
        elif is_manifest(s) and os.path.isfile(s):
            path = Path(s).resolve()
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from manifest_rows(f, str(path), image_key=image_key, base=path.parent)
        else:
            # An image path (it may exist only on the workers' filesystem).
            yield SourceRow(str(Path(s).expanduser().resolve()) if not s.startswith("/") else s)
