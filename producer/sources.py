"""Expand what a user submits (manifests, directories, S3 prefixes, lists) into image rows, lazily.

Everything here is a generator: a 100-million-line manifest is read one line at a time, so
submission runs in constant memory and the first jobs are queued (and running) long before the
last line is read. A line that cannot become a job (bad JSON, no image field) is not dropped: it
becomes a row with an error, which the client records as a failed job with an error record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".jsonl.txt")
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
        except ValueError as exc:
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


def directory_rows(root: Path) -> Iterator[SourceRow]:
    """Image files under `root`, recursively, in a stable (sorted) order, one folder at a time."""
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
        stack.extend(reversed(subdirs))


def _s3_lines(client: Any, bucket: str, key: str) -> Iterator[str]:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    for raw in body.iter_lines():
        yield raw.decode("utf-8", errors="replace")


def s3_rows(url: str, client: Any, *, image_key: str = "image") -> Iterator[SourceRow]:
    """An S3 manifest object, one image object, or every image object under a prefix."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if is_manifest(key):
        yield from manifest_rows(_s3_lines(client, bucket, key), url, image_key=image_key)
        return
    if is_image_name(key):
        yield SourceRow(url)
        return
    prefix = key if not key or key.endswith("/") else key + "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if is_image_name(obj["Key"]):
                yield SourceRow(f"s3://{bucket}/{obj['Key']}")


def expand(
    sources: Iterable[Any] | str,
    *,
    image_key: str = "image",
    s3_client_factory: Callable[[], Any] | None = None,
) -> Iterator[SourceRow]:
    """Rows from any mix of: JSONL manifest paths, directories, s3:// manifests/prefixes/objects,
    image paths or URLs, dicts with `image_key`, or an iterable of those.

    `s3_client_factory` is called once, on the first s3:// source."""
    if isinstance(sources, (str, os.PathLike, dict)):
        sources = [sources]
    s3_client = None
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
        if s.startswith("s3://"):
            if s3_client is None:
                if s3_client_factory is None:
                    raise ValueError(f"{s}: an S3 source needs S3 settings (SCALECAP_S3_*)")
                s3_client = s3_client_factory()
            yield from s3_rows(s, s3_client, image_key=image_key)
        elif s.startswith(_URL_SCHEMES):
            yield SourceRow(s)
        elif os.path.isdir(s):
            yield from directory_rows(Path(s))
        elif is_manifest(s) and os.path.isfile(s):
            path = Path(s).resolve()
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from manifest_rows(f, str(path), image_key=image_key, base=path.parent)
        else:
            # An image path (it may exist only on the workers' filesystem).
            yield SourceRow(str(Path(s).expanduser().resolve()) if not s.startswith("/") else s)
