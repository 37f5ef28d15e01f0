"""Image references that arrive over HTTP: what the API accepts, and never what it opens.

The API does not read images, directories or manifests named by a caller (FleetClient would
expand a local directory or manifest path on this host): every reference becomes one job as it
is, and the workers load it through their own guarded loader. A shard reference (`wds+...` for a
WebDataset member, `pq+...` for a Parquet row) is vetted by what it makes a worker open. Local
paths and file:// URIs are accepted only inside `SCALECAP_ALLOWED_ROOTS` (checked lexically and,
where the path exists here, after resolving symlinks), so a caller cannot name /etc/passwd or walk
out with `..`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from urllib.parse import unquote, urlsplit

from producer.sources import SourceRow
from scalecap.images import under_roots

MAX_REF_CHARS = 8 * 1024
"""Longest reference other than a data: URI (a URL, a path, a shard reference)."""
MAX_DATA_URI_CHARS = 8 * 1024 * 1024
"""A data: URI may be long; anything longer is refused before it reaches Redis."""


class RefError(ValueError):
    """A reference the API refuses; the message says why."""


def _check_local(path: str, roots: Sequence[str], shown: str) -> str:
    if not roots:
        raise RefError(f"{shown}: local files are not allowed (no SCALECAP_ALLOWED_ROOTS)")
    if not os.path.isabs(path):
        raise RefError(f"{shown}: a local path must be absolute")
    if "\x00" in path:
        raise RefError(f"{shown}: invalid path")
    norm = os.path.normpath(path)
    # the workers' rule (scalecap.images.local), lexically and, where the path exists here, resolved
    resolved_out = os.path.lexists(norm) and not under_roots(norm, roots)
    if not under_roots(norm, roots, resolve=False) or resolved_out:
        raise RefError(f"{shown}: outside the allowed roots")
    return norm


def check_ref(ref: object, roots: Sequence[str]) -> str:
    """The reference to queue, or RefError. http(s)://, s3://, data: and allowed local paths."""
    if not isinstance(ref, str) or not ref.strip():
        raise RefError("an image reference must be a non-empty string")
    ref = ref.strip()
    low = ref[:16].lower()
    limit = MAX_DATA_URI_CHARS if low.startswith("data:") else MAX_REF_CHARS
    if len(ref) > limit:
        raise RefError(f"reference longer than {limit} characters")
    shown = ref[:120] + ("..." if len(ref) > 120 else "")
    try:
        return _check(ref, low, roots, shown)
    except RefError:
        raise
    except (ValueError, TypeError, UnicodeError) as exc:  # urlsplit on "http://[::1", say
        raise RefError(f"{shown}: malformed reference ({type(exc).__name__})") from None


def _check(ref: str, low: str, roots: Sequence[str], shown: str) -> str:
    if low.startswith(("wds+", "pq+")):  # a WebDataset member or a Parquet row: vet what it opens
        from scalecap.images import locations

        try:
            opened = locations(ref)
        except Exception as exc:
            raise RefError(f"{shown}: malformed shard reference ({exc})") from exc
        for loc in opened:
            check_ref(loc, roots)
        return ref
    if low.startswith(("http://", "https://")):
        parts = urlsplit(ref)
        if not parts.hostname:
            raise RefError(f"{shown}: URL without a host")
        return ref
    if low.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        if not bucket or not key:
            raise RefError(f"{shown}: an s3:// image needs a bucket and a key")
        return ref
    if low.startswith("data:"):
        if "," not in ref[:512]:
            raise RefError(f"{shown}: malformed data URI")
        return ref
    if low.startswith("file:"):
        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise RefError(f"{shown}: file:// URIs on another host are not supported")
        _check_local(unquote(parts.path), roots, shown)
        return ref
    if "://" in ref[:32]:
        raise RefError(f"{shown}: unsupported scheme (use http(s)://, s3://, data: or an allowed path)")
    return _check_local(ref, roots, shown)


def checked_rows(rows: Iterable[SourceRow], roots: Sequence[str], *,
                 max_total_chars: int | None = None) -> Iterator[SourceRow]:
    """Rows with every refused reference turned into that row's error (nothing else is lost).

    With `max_total_chars`, the references of one submission may hold at most that many
    characters in all (what Redis keeps of them); rows beyond become SubmissionTooLarge rows."""
    total = 0
    for row in rows:
        if row.error:
            yield row
            continue
        try:
            ref = check_ref(row.ref, roots)
        except RefError as exc:
            yield SourceRow(ref=row.ref[:1000], error={"stage": "submit", "type": "ImageAccessDenied",
                                                       "message": str(exc)})
            continue
        total += len(ref)
        if max_total_chars is not None and total > max_total_chars:
            yield SourceRow(ref=ref[:1000], error={
                "stage": "submit", "type": "SubmissionTooLarge",
                "message": f"the submission's references are over {max_total_chars} characters in all"})
            continue
        yield SourceRow(ref)


__all__ = ["MAX_DATA_URI_CHARS", "MAX_REF_CHARS", "RefError", "check_ref", "checked_rows"]
