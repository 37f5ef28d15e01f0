"""Expand what a user submits (manifests, directories, S3 prefixes, lists) into image rows, lazily.

Everything here is a generator: a 100-million-line manifest is read one line at a time, so
submission runs in constant memory and the first jobs are queued (and running) long before the
last line is read. A line that cannot become a job (bad JSON, no image field) is not dropped: it
becomes a row with an error, which the client records as a failed job with an error record.

Shards (WebDataset `.tar`, Parquet / HF datasets `.parquet`) expand into one row per image member
or row, each with a `wds+`/`pq+` reference (scalecap/images/refs.py) that tells a worker where its
bytes are. A tar is indexed by reading its headers in one forward pass (local files seek over the
data; S3 objects stream through a fixed buffer), a Parquet file by its footer and, when needed,
its URL/id columns one row group at a time: memory stays constant whatever the shard's size.

Tar shards: tar_index.py; Parquet files: parquet_index.py; the row type: source_rows.py (its names
are importable from here too).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from producer.parquet_index import parquet_file_rows, parquet_rows
from producer.source_rows import (
    IMAGE_EXTENSIONS,
    MANIFEST_EXTENSIONS,
    PARQUET_EXTENSIONS,
    TAR_EXTENSIONS,
    URL_SCHEMES,
    SourceRow,
    error_row,
    is_image_name,
    is_manifest,
    is_parquet,
    is_shard,
    is_tar,
)
from producer.tar_index import local_tar_rows, s3_tar_rows, tar_members, wds_rows

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "PARQUET_EXTENSIONS",
    "TAR_EXTENSIONS",
    "SourceRow",
    "directory_rows",
    "expand",
    "expand_braces",
    "is_image_name",
    "is_manifest",
    "is_parquet",
    "is_shard",
    "is_tar",
    "manifest_rows",
    "parquet_rows",
    "s3_rows",
    "tar_members",
    "wds_rows",
]

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
    if ref.startswith(URL_SCHEMES) or base is None:
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
            yield error_row(at, "MalformedLine", f"line {n} is not JSON: {exc}")
            continue
        if isinstance(obj, str):
            yield SourceRow(_resolve(obj, base))
            continue
        if not isinstance(obj, dict):
            yield error_row(at, "MalformedLine", f"line {n} is not a JSON object")
            continue
        ref = obj.get(image_key)
        if not isinstance(ref, str) or not ref.strip():
            yield error_row(at, "MissingImageKey", f"line {n} has no {image_key!r} string")
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
            yield error_row(str(folder), "UnreadableDirectory", str(exc))
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
            yield from (s3_tar_rows(where, client) if client is not None else local_tar_rows(where))
        else:
            yield from parquet_file_rows(where, client, column, id_column)

    for n, src in enumerate(sources, 1):
        if isinstance(src, dict):
            ref = src.get(image_key)
            if isinstance(ref, str) and ref.strip():
                yield SourceRow(ref.strip())
            else:
                yield error_row(f"item:{n}", "MissingImageKey", f"item {n} has no {image_key!r} string")
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
                    yield error_row(one, "ShardNotFound", f"{one}: no such file (from the pattern {s})")
            continue
        if s.startswith("s3://"):
            yield from s3_rows(s, s3_client(s), image_key=image_key, shards=shards)
        elif s.startswith(URL_SCHEMES):
            yield SourceRow(s)
        elif os.path.isdir(s):
            yield from directory_rows(Path(s), shards)
        elif is_shard(s):
            if os.path.isfile(s):
                yield from shards(str(Path(s).resolve()))
            else:
                yield error_row(s, "ShardNotFound", f"{s}: no such file")
        elif is_manifest(s) and os.path.isfile(s):
            path = Path(s).resolve()
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from manifest_rows(f, str(path), image_key=image_key, base=path.parent)
        else:
            # An image path (it may exist only on the workers' filesystem).
            yield SourceRow(str(Path(s).expanduser().resolve()) if not s.startswith("/") else s)
