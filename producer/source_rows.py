"""One row of a submission (an image reference, or the error that stands for one) and the file
names that tell what a source is. Shared by the expanders (sources.py, tar_index.py,
parquet_index.py) and the HTTP API."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "PARQUET_EXTENSIONS",
    "TAR_EXTENSIONS",
    "URL_SCHEMES",
    "SourceRow",
    "error_row",
    "is_image_name",
    "is_manifest",
    "is_parquet",
    "is_shard",
    "is_tar",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".jsonl.txt")
TAR_EXTENSIONS = (".tar",)
PARQUET_EXTENSIONS = (".parquet",)
URL_SCHEMES = ("http://", "https://", "s3://", "file://", "data:")
"""References that are passed on as they are (never resolved as local paths)."""


@dataclass(frozen=True)
class SourceRow:
    """One future job: an image reference, or an error explaining why there is none."""

    ref: str
    error: dict[str, str] | None = None
    """Set for a row that cannot be captioned; `ref` then names the offending line."""


def error_row(where: str, kind: str, message: str) -> SourceRow:
    """A row that stands for a line, member or file that cannot become a job, saying why."""
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
