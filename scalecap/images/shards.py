"""Reading one image out of a shard: a WebDataset tar member by byte range, or one Parquet row.

The reference format (MemberRef, RowRef, parse_ref) is in refs.py. A worker reads only what a
reference names, never the whole shard: local reads stay inside the allowed roots (local.py);
S3 reads use byte ranges and the same client, bucket allow-list and retries as s3:// images (s3.py).
"""

from __future__ import annotations

import io
import json
from typing import Any

from scalecap.errors import ImageError, ImageNotFound, ImageTooLarge, TruncatedImage
from scalecap.images.limits import ImageLimits
from scalecap.images.local import allowed_local_path, local_read_errors
from scalecap.images.refs import MemberRef, RowRef, Span, describe_shard, is_shard_ref, parse_ref
from scalecap.images.s3 import check_bucket, client_for, s3_error, split_s3_url
from scalecap.images.transient import with_retries

__all__ = [
    "MAX_SIDECAR_BYTES",
    "S3RangeFile",
    "attach_source",
    "import_pyarrow_parquet",
    "open_parquet",
    "read_range",
    "read_shard_ref",
    "source_meta",
    "verify_shard_ref",
]

MAX_SIDECAR_BYTES = 64 * 1024
"""A larger sidecar is not read (meta.source says so); alt texts and img2dataset JSON are ~1 KB."""


# -- guarded byte ranges -------------------------------------------------------------------------


def read_range(where: str, span: Span, limits: ImageLimits, desc: str) -> bytes:
    """Exactly `span` of a local file or S3 object, or a typed ImageError."""
    if span.size > limits.max_bytes:
        raise ImageTooLarge(f"{desc}: {span.size} bytes is over max_bytes={limits.max_bytes}")
    if span.size == 0:
        return b""
    if where.startswith("s3://"):
        data = _s3_range(where, span, limits, desc)
    else:
        real = allowed_local_path(where, limits.allowed_roots, desc)
        with local_read_errors(desc, "no such shard"), open(real, "rb") as fh:
            fh.seek(span.offset)
            data = fh.read(span.size)
    if len(data) != span.size:
        raise TruncatedImage(
            f"{desc}: the shard ends {span.size - len(data)} bytes before this member's end "
            f"(offset {span.offset}, size {span.size}): truncated or rewritten since indexing"
        )
    return data


def _s3_range(url: str, span: Span, limits: ImageLimits, desc: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
    check_bucket(bucket, limits, desc)
    client = client_for(limits)
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
            raise s3_error(exc, desc) from exc  # transient ones are retried below
        except BotoCoreError as exc:
            raise ImageError(f"{desc}: S3 request failed: {exc}") from exc

    return with_retries(once, limits, desc)  # the s3:// images' retry policy


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
        bucket, key = split_s3_url(where)
        return pq.ParquetFile(S3RangeFile(s3_client, bucket, key))  # unbuffered: each read is exact
    return pq.ParquetFile(where)


def import_pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImageError("Parquet sources need pyarrow: pip install 'scalecap-fleet[data]'") from exc
    return pq


# -- worker side ---------------------------------------------------------------------------------


def read_shard_ref(ref: str, limits: ImageLimits, desc: str) -> bytes | str:
    """The image bytes a reference points at, or (a Parquet URL column) the inner reference to load."""
    p = parse_ref(ref)
    if isinstance(p, MemberRef):
        return _member(p, p.ext, p.span, limits, desc)
    if p.url is not None:
        if is_shard_ref(p.url):
            raise ImageError(f"{desc}: a URL column may not hold another shard reference")
        return p.url
    return _read_cell(p, limits, desc)


def _member(p: MemberRef, ext: str, span: Span, limits: ImageLimits, desc: str) -> bytes:
    """A member's data, read with its tar header, which must name exactly this sample's `.ext`
    member (members.py): whoever wrote the reference, no other bytes are read."""
    from scalecap.images.members import read_member

    def read(offset: int, size: int) -> bytes:
        return read_range(p.shard, Span(offset, size), limits, desc)

    return read_member(read, p.key, ext, span.offset, span.size, desc)


def _read_cell(p: RowRef, limits: ImageLimits, desc: str) -> bytes:
    """One row's image bytes: only this row group's image column is read, in small batches."""
    if p.file.startswith("s3://"):
        check_bucket(split_s3_url(p.file)[0], limits, desc)
        where = p.file
        client = client_for(limits)
    else:
        where, client = allowed_local_path(p.file, limits.allowed_roots, desc), None
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
            raise s3_error(exc, desc) from exc
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


def source_meta(ref: str, limits: ImageLimits) -> dict[str, Any] | None:
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
            raw = _member(p, ext, span, limits, f"{describe_shard(ref)} .{ext}")
            text = raw.decode("utf-8", errors="replace")
            out[ext] = json.loads(text) if ext == "json" else text
        except (ImageError, ValueError) as exc:
            errors[ext] = f"{type(exc).__name__}: {exc}"
    if errors:
        out["sidecar_errors"] = errors
    return out


def attach_source(record: dict[str, Any], ref: str, limits: ImageLimits) -> dict[str, Any]:
    """Put meta.source on a record of a shard job (success or error record); others unchanged."""
    src = source_meta(ref, limits)
    if src is not None and isinstance(record, dict):
        meta = record.get("meta")
        if not isinstance(meta, dict):
            meta = record["meta"] = {}
        meta["source"] = src
    return record


def verify_shard_ref(ref: str, limits: Any, desc: str) -> None:
    """Re-derive a client's shard reference from the shard itself, reading no member's data.

    `wds+`: the 512-byte tar header before the image member and before each sidecar must name
    exactly that member (NotThisMember). `pq+`: the file's footer must hold the row group, the row
    and the column. Raises an ImageError saying what does not match."""
    from scalecap.images.members import BLOCK, NotThisMember, check_header

    p = parse_ref(ref)
    if isinstance(p, MemberRef):
        parts = [(p.ext, p.span), *sorted(p.sidecars.items())]
        for ext, span in parts:
            if span.offset < BLOCK or span.offset % BLOCK:
                raise NotThisMember(f"{desc}: .{ext}: a member's data starts on a 512-byte block "
                                    "after its header")
            header = read_range(p.shard, Span(span.offset - BLOCK, BLOCK), limits, desc)
            check_header(header, p.key, ext, span.size, f"{desc} .{ext}")
        return
    client = limits.s3_client_factory() if p.file.startswith("s3://") and limits.s3_client_factory else None
    try:
        with open_parquet(p.file, s3_client=client) as pf:
            meta = pf.metadata
            ok = (p.row_group < meta.num_row_groups and p.row < meta.row_group(p.row_group).num_rows
                  and p.column in pf.schema_arrow.names)
    except ImageError:
        raise
    except Exception as exc:
        raise NotThisMember(f"{desc}: not a readable Parquet file ({type(exc).__name__})") from None
    if not ok:
        raise NotThisMember(f"{desc}: the file has no such row group, row or column")
