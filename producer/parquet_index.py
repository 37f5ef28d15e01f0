"""Parquet (and HF datasets) files indexed by their footer: one row per Parquet row, as a `pq+`
reference (scalecap.images.refs). A URL/path image column (and the id column) is read here one
batch at a time; an image-bytes column is never read here: each worker reads its own row."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from producer.source_rows import URL_SCHEMES, SourceRow, error_row
from scalecap.images.refs import RowRef
from scalecap.images.shards import import_pyarrow_parquet, open_parquet

__all__ = ["parquet_file_rows", "parquet_rows"]



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
    if ref.startswith(URL_SCHEMES) or ref.startswith("/"):
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
            yield error_row(where, "MissingColumn",
                       f"{where} has no column {col!r} ({flag}); its columns: {', '.join(names[:20])}")
            return
    kind = _column_kind(pa, pf.schema_arrow.field(image_column).type)
    if kind is None:
        yield error_row(where, "WrongColumnType", f"{where}: column {image_column!r} is "
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
                        yield error_row(ref.to_ref(), "MissingImage",
                                        f"row {row} of row group {rg} has no URL")
                    else:
                        yield SourceRow(ref.to_ref())
                    row += 1
        except Exception as exc:  # pyarrow: a corrupt row group costs its own rows only
            for r in range(row, n):
                yield error_row(RowRef(where, rg, r, image_column).to_ref(), "CorruptRowGroup",
                           f"{where}: row group {rg} cannot be read: {type(exc).__name__}: {exc}")


def parquet_file_rows(where: str, client: Any, image_column: str, id_column: str | None
                      ) -> Iterator[SourceRow]:
    """Rows of a local or S3 (`client`) Parquet file; an unreadable file is one error row."""
    import_pyarrow_parquet()  # no pyarrow: one clear error naming the [data] extra, not per file
    try:
        pf = open_parquet(where, s3_client=client)
    except Exception as exc:  # not Parquet, a cut footer, a missing object
        yield error_row(where, "UnreadableShard",
                   f"{where}: not a readable Parquet file: {type(exc).__name__}: {exc}")
        return
    with pf:
        yield from parquet_rows(where, pf, image_column=image_column, id_column=id_column)
