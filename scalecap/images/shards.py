"""References to one image inside a shard, and how a worker reads just that image.

A WebDataset tar shard or a Parquet file holds thousands of images; each becomes its own job whose
reference says exactly where its bytes are, so a worker reads one member or one row, never the
whole shard. Two forms (the fragment is form-encoded, the path percent-quoted):

    wds+s3://bucket/shards/00001.tar#key=000123&ext=jpg&offset=1536&size=4567&json=6656:312&txt=7168:45
    wds+file:///data/shards/00001.tar#key=000123&ext=jpg&offset=1536&size=4567
    pq+s3://bucket/data/train-00000.parquet#rg=3&row=17&col=image&id=abc
    pq+file:///data/train.parquet#rg=0&row=5&col=url&id=abc&url=https%3A%2F%2Fexample.com%2Fa.jpg

`offset`/`size` are the member's data in the tar (the producer reads them from the tar headers);
the sample's sidecars (`json`, `txt`) are recorded the same way as `offset:size` and read by range
on the worker, so the job (and Redis) never carries their text. A Parquet reference names the row
group, the row within it and the image column; `url` is set when that column holds a URL or path
(the worker then loads that URL with the usual guards), otherwise the cell holds the image bytes
(HF `Image` feature: a `{bytes, path}` struct, or plain binary). Local reads stay inside the
allowed roots; S3 reads use byte ranges and the same client, and bucket allow-list, as s3:// images.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from scalecap.errors import ImageAccessDenied, ImageError, ImageNotFound, ImageTooLarge, TruncatedImage

__all__ = [
    "SIDECAR_EXTENSIONS",
    "MemberRef",
    "RowRef",
    "S3RangeFile",
    "Span",
    "attach_source",
    "is_shard_ref",
    "locations",
    "parse_ref",
    "read_shard_ref",
    "source_meta",
]

SIDECAR_EXTENSIONS = ("json", "txt")
"""Sample members that travel into the record's meta.source (read by range at the worker)."""
MAX_SIDECAR_BYTES = 64 * 1024
"""A larger sidecar is not read (meta.source says so); alt texts and img2dataset JSON are ~1 KB."""
SCHEMES = ("wds+", "pq+")


@dataclass(frozen=True)
class Span:
    offset: int
    size: int


@dataclass(frozen=True)
class MemberRef:
    """One image member of a WebDataset tar shard."""

    shard: str
    """`s3://bucket/key` or an absolute local path."""
    key: str
    ext: str
    span: Span
    sidecars: dict[str, Span] = field(default_factory=dict)

    def to_ref(self) -> str:
        q: list[tuple[str, str]] = [("key", self.key), ("ext", self.ext),
                                    ("offset", str(self.span.offset)), ("size", str(self.span.size))]
        q += [(ext, f"{s.offset}:{s.size}") for ext, s in sorted(self.sidecars.items())]
        return "wds+" + _location(self.shard) + "#" + urlencode(q)


@dataclass(frozen=True)
class RowRef:
    """One row of a Parquet (or HF datasets) file."""

    file: str
    row_group: int
    row: int
    column: str
    id: str | None = None
    url: str | None = None

    def to_ref(self) -> str:
        q: list[tuple[str, str]] = [("rg", str(self.row_group)), ("row", str(self.row)), ("col", self.column)]
        if self.id is not None:
            q.append(("id", self.id))
        if self.url is not None:
            q.append(("url", self.url))
        return "pq+" + _location(self.file) + "#" + urlencode(q)


def _location(where: str) -> str:
    if where.startswith("s3://"):
        bucket, _, key = where[5:].partition("/")
        return f"s3://{bucket}/{quote(key, safe='/')}"
    if not os.path.isabs(where):
        raise ValueError(f"a shard path must be absolute: {where!r}")
    return "file://" + quote(where, safe="/")


def _unlocation(text: str) -> str:
    if text.startswith("s3://"):
        bucket, _, key = text[5:].partition("/")
        if not bucket or not key:
            raise ValueError("expected s3://bucket/key")
        return f"s3://{bucket}/{unquote(key)}"
    if text.startswith("file://"):
        path = unquote(text[7:])
        if not path.startswith("/"):
            raise ValueError("expected file:///absolute/path")
        return path
    raise ValueError("the shard must be s3:// or file://")


def is_shard_ref(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(SCHEMES)


def _span(text: str) -> Span:
    o, _, n = text.partition(":")
    span = Span(int(o), int(n))
    if span.offset < 0 or span.size < 0:
        raise ValueError("negative offset or size")
    return span


def parse_ref(ref: str) -> MemberRef | RowRef:
    """The parts of a `wds+`/`pq+` reference; ImageError if it is malformed."""
    scheme, _, rest = ref.partition("+")
    where, _, frag = rest.partition("#")
    try:
        q = dict(parse_qsl(frag, keep_blank_values=True, strict_parsing=bool(frag)))
        loc = _unlocation(where)
        if scheme == "wds":
            sidecars = {e: _span(q[e]) for e in SIDECAR_EXTENSIONS if e in q}
            return MemberRef(loc, q["key"], q.get("ext", ""), _span(f"{q['offset']}:{q['size']}"), sidecars)
        if scheme == "pq":
            rg, row = int(q["rg"]), int(q["row"])
            if rg < 0 or row < 0:
                raise ValueError("negative row group or row")
            return RowRef(loc, rg, row, q["col"], q.get("id"), q.get("url"))
    except KeyError as exc:
        raise ImageError(f"{_short(ref)}: malformed shard reference: no {exc.args[0]!r}") from exc
    except ValueError as exc:
        raise ImageError(f"{_short(ref)}: malformed shard reference: {exc}") from exc
    raise ImageError(f"{_short(ref)}: unknown shard reference scheme {scheme!r}")


def locations(ref: str) -> list[str]:
    """What a shard reference makes a worker open: the shard or file (s3:// URL or absolute path)
    and, for a URL column's row, that URL. A gate that vets references (the HTTP API) checks
    each of these as it would a plain image reference. ImageError if malformed."""
    p = parse_ref(ref)
    if isinstance(p, MemberRef):
        return [p.shard]
    return [p.file] + ([p.url] if p.url is not None else [])


def _short(ref: str, limit: int = 300) -> str:
    return ref if len(ref) <= limit else ref[: limit - 1] + "…"


def describe(ref: str) -> str:
    """Log-safe name: the shard and the member key or row (no URL payloads)."""
    try:
        p = parse_ref(ref)
    except ImageError:
        return _short(ref.split("#", 1)[0])
    if isinstance(p, MemberRef):
        return _short(f"{p.shard}#{p.key}.{p.ext}")
    return _short(f"{p.file}#rg={p.row_group}&row={p.row}")


# -- guarded byte ranges -------------------------------------------------------------------------


def _check_bucket(bucket: str, limits: Any, desc: str) -> None:
    """The s3:// images' bucket allow-list (SCALECAP_ALLOWED_BUCKETS; empty allows any)."""
    allowed = getattr(limits, "allowed_buckets", ())
    if allowed and bucket not in allowed:
        raise ImageAccessDenied(f"{desc}: bucket {bucket!r} is not in allowed_buckets")


def _s3_client(limits: Any) -> Any:
    from scalecap.images import load as images

    factory = getattr(limits, "s3_client_factory", None)
    return factory() if factory else images._default_s3_client()


def _local_path(path: str, limits: Any, desc: str) -> str:
    from scalecap.images import load as images

    roots = getattr(limits, "allowed_roots", None)
    if roots is not None and not roots:
        raise ImageAccessDenied(f"{desc}: local files are not allowed (no allowed roots)")
    real = os.path.realpath(path)
    if roots is not None and not images._under_roots(real, roots):
        raise ImageAccessDenied(f"{desc}: local path is outside the allowed roots")
    return real


def read_range(where: str, span: Span, limits: Any, desc: str) -> bytes:
    """Exactly `span` of a local file or S3 object, or a typed ImageError."""
    if span.size > limits.max_bytes:
        raise ImageTooLarge(f"{desc}: {span.size} bytes is over max_bytes={limits.max_bytes}")
    if span.size == 0:
        return b""
    if where.startswith("s3://"):
        data = _s3_range(where, span, limits, desc)
    else:
        real = _local_path(where, limits, desc)
        try:
            with open(real, "rb") as fh:
                fh.seek(span.offset)
                data = fh.read(span.size)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ImageNotFound(f"{desc}: no such shard") from exc
        except PermissionError as exc:
            raise ImageAccessDenied(f"{desc}: permission denied") from exc
        except OSError as exc:
            raise ImageError(f"{desc}: cannot read: {exc}") from exc
    if len(data) != span.size:
        raise TruncatedImage(
            f"{desc}: the shard ends {span.size - len(data)} bytes before this member's end "
            f"(offset {span.offset}, size {span.size}): truncated or rewritten since indexing"
        )
    return data


def _s3_range(url: str, span: Span, limits: Any, desc: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    from scalecap.images import load as images

    bucket, _, key = url[5:].partition("/")
    _check_bucket(bucket, limits, desc)
    client = _s3_client(limits)
    rng = f"bytes={span.offset}-{span.offset + span.size - 1}"

    def once() -> bytes:
        try:
            body = client.get_object(Bucket=bucket, Key=key, Range=rng)["Body"]
            try:
                return body.read(span.size + 1)
            finally:
                body.close()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # the object is shorter than the index says: reported as truncated
            raise images._s3_error(exc, desc) from exc  # transient ones are retried below
        except BotoCoreError as exc:
            raise ImageError(f"{desc}: S3 request failed: {exc}") from exc

    retries = getattr(images, "_with_retries", None)  # the s3:// images' retry policy
    return retries(once, limits, desc) if retries is not None else once()


class S3RangeFile(io.RawIOBase):
    """A seekable, read-only S3 object: every read is one ranged GET (pyarrow reads Parquet
    footers and column chunks through it, so only the needed bytes cross the network)."""

    def __init__(self, client: Any, bucket: str, key: str, size: int | None = None) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        if size is None:
            size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        rng = f"bytes={self.pos}-{self.pos + n - 1}"
        data = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=rng)["Body"].read()
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_parquet(where: str, *, s3_client: Any = None) -> Any:
    """A pyarrow ParquetFile on a local path or an S3 object (ranged reads)."""
    pq = import_pyarrow_parquet()
    if where.startswith("s3://"):
        bucket, _, key = where[5:].partition("/")
        return pq.ParquetFile(S3RangeFile(s3_client, bucket, key))  # unbuffered: each read is exact
    return pq.ParquetFile(where)


def import_pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImageError("Parquet sources need pyarrow: pip install 'scalecap-fleet[data]'") from exc
    return pq


# -- worker side ---------------------------------------------------------------------------------


def read_shard_ref(ref: str, limits: Any, desc: str) -> bytes | str:
    """The image bytes a reference points at, or (a Parquet URL column) the inner reference to load."""
    p = parse_ref(ref)
    if isinstance(p, MemberRef):
        return read_range(p.shard, p.span, limits, desc)
    if p.url is not None:
        if is_shard_ref(p.url):
            raise ImageError(f"{desc}: a URL column may not hold another shard reference")
        return p.url
    return _read_cell(p, limits, desc)


def _read_cell(p: RowRef, limits: Any, desc: str) -> bytes:
    """One row's image bytes: only this row group's image column is read, in small batches."""
    if p.file.startswith("s3://"):
        _check_bucket(p.file[5:].partition("/")[0], limits, desc)
        where = p.file
        client = _s3_client(limits)
    else:
        where, client = _local_path(p.file, limits, desc), None
    try:
        with open_parquet(where, s3_client=client) as pf:
            if p.row_group >= pf.num_row_groups:
                raise ImageNotFound(f"{desc}: the file has {pf.num_row_groups} row groups")
            if p.row >= pf.metadata.row_group(p.row_group).num_rows:
                raise ImageNotFound(f"{desc}: row group {p.row_group} has fewer rows")
            seen = 0
            for batch in pf.iter_batches(batch_size=64, row_groups=[p.row_group], columns=[p.column]):
                if p.row < seen + batch.num_rows:
                    cell = batch.column(0)[p.row - seen].as_py()
                    break
                seen += batch.num_rows
            else:  # pragma: no cover - metadata said the row exists
                raise ImageNotFound(f"{desc}: row not found")
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageNotFound(f"{desc}: no such file") from exc
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for damaged data
        if isinstance(getattr(exc, "response", None), dict):  # botocore ClientError
            from scalecap.images import load as images

            raise images._s3_error(exc, desc) from exc
        raise TruncatedImage(f"{desc}: cannot read this row: {type(exc).__name__}: {exc}") from exc
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if isinstance(cell, str):
        raise ImageError(f"{desc}: column {p.column!r} holds text, not image bytes")
    if not cell:
        raise ImageNotFound(f"{desc}: no image bytes in this row")
    if len(cell) > limits.max_bytes:
        raise ImageTooLarge(f"{desc}: {len(cell)} bytes is over max_bytes={limits.max_bytes}")
    return bytes(cell)


def source_meta(ref: str, limits: Any) -> dict[str, Any] | None:
    """meta.source of a shard job: where it came from and its sidecars; None for other refs.

    Never raises: a sidecar that cannot be read is named under `sidecar_errors`."""
    if not is_shard_ref(ref):
        return None
    try:
        p = parse_ref(ref)
    except ImageError as exc:
        return {"ref": ref, "error": str(exc)}
    if isinstance(p, RowRef):
        out: dict[str, Any] = {"format": "parquet", "file": p.file, "row_group": p.row_group, "row": p.row,
                               "column": p.column, "id": p.id}
        if p.url is not None:
            out["url"] = p.url
        return out
    out = {"format": "webdataset", "shard": p.shard, "key": p.key, "ext": p.ext}
    errors: dict[str, str] = {}
    for ext, span in sorted(p.sidecars.items()):
        if span.size > MAX_SIDECAR_BYTES:
            errors[ext] = f"{span.size} bytes is over {MAX_SIDECAR_BYTES}: not read"
            continue
        try:
            raw = read_range(p.shard, span, limits, f"{describe(ref)} .{ext}")
            text = raw.decode("utf-8", errors="replace")
            out[ext] = json.loads(text) if ext == "json" else text
        except (ImageError, ValueError) as exc:
            errors[ext] = f"{type(exc).__name__}: {exc}"
    if errors:
        out["sidecar_errors"] = errors
    return out


def attach_source(record: dict[str, Any], ref: str, limits: Any) -> dict[str, Any]:
    """Put meta.source on a record of a shard job (success or error record); others unchanged."""
    src = source_meta(ref, limits)
    if src is not None and isinstance(record, dict):
        meta = record.get("meta")
        if not isinstance(meta, dict):
            meta = record["meta"] = {}
        meta["source"] = src
    return record
