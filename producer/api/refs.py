"""Image references that arrive over HTTP: what the API accepts, and never what it opens.

The API does not read images, directories or manifests named by a caller (FleetClient would
expand a local directory or manifest path on this host): every reference becomes one job as it
is, and the workers load it through their own guarded loader. Two checks, in order:

- the form (RefError, a 400): a known scheme, a host, an absolute path, a bounded length;
- the data scope (RefRefused, a 403 naming the scope): the submitting key's roots and buckets
  inside the fleet's SCALECAP_ALLOWED_ROOTS / SCALECAP_ALLOWED_BUCKETS (scalecap/fleet/access.py),
  decided from the text, and for a shard reference (`wds+`/`pq+`) from every file it opens.

A client's shard reference is also re-derived from the shard itself (`verify_shard`: the tar
headers before its ranges, the Parquet footer) before it is queued, so only members the fleet
would have indexed are accepted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from producer.sources import SourceRow
from scalecap.fleet.access import ScopeRefused, check

MAX_REF_CHARS = 8 * 1024
"""Longest reference other than a data: URI (a URL, a path, a shard reference)."""
MAX_DATA_URI_CHARS = 8 * 1024 * 1024
"""A data: URI may be long; anything longer is refused before it reaches Redis."""
FLEET_WIDE: Any = None
"""The scope of a fleet-wide key (`--all-data`, admin): only the fleet's allow-lists apply."""


class RefError(ValueError):
    """A reference the API refuses; the message says why."""


class RefRefused(RefError):
    """A well-formed reference outside a data scope (403); `scope` names which one."""

    def __init__(self, exc: ScopeRefused) -> None:
        super().__init__(str(exc))
        self.scope = exc.scope


def _check_path(path: str, shown: str) -> None:
    if not os.path.isabs(path):
        raise RefError(f"{shown}: a local path must be absolute")
    if "\x00" in path:
        raise RefError(f"{shown}: invalid path")


def check_ref(ref: object, roots: Sequence[str], *, scope: Any = FLEET_WIDE,
              buckets: Sequence[str] = ()) -> str:
    """The reference to queue; RefError for a malformed one, RefRefused for one outside `scope`
    (None: fleet-wide) or the fleet's `roots`/`buckets`."""
    if not isinstance(ref, str) or not ref.strip():
        raise RefError("an image reference must be a non-empty string")
    ref = ref.strip()
    low = ref[:16].lower()
    limit = MAX_DATA_URI_CHARS if low.startswith("data:") else MAX_REF_CHARS
    if len(ref) > limit:
        raise RefError(f"reference longer than {limit} characters")
    shown = ref[:120] + ("..." if len(ref) > 120 else "")
    try:
        _check_form(ref, low, shown)
    except RefError:
        raise
    except (ValueError, TypeError, UnicodeError) as exc:  # urlsplit on "http://[::1", say
        raise RefError(f"{shown}: malformed reference ({type(exc).__name__})") from None
    try:
        check(ref, scope, roots, buckets)
    except ScopeRefused as exc:
        raise RefRefused(exc) from None
    return ref


def _check_form(ref: str, low: str, shown: str) -> None:
    if low.startswith(("wds+", "pq+")):  # a WebDataset member or a Parquet row: vet what it opens
        from scalecap.images import locations

        try:
            opened = locations(ref)
        except Exception as exc:
            raise RefError(f"{shown}: malformed shard reference ({exc})") from exc
        for loc in opened:
            _check_form(loc, loc[:16].lower(), shown)
        return
    if low.startswith(("http://", "https://")):
        if not urlsplit(ref).hostname:
            raise RefError(f"{shown}: URL without a host")
        return
    if low.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        if not bucket or not key:
            raise RefError(f"{shown}: an s3:// image needs a bucket and a key")
        return
    if low.startswith("data:"):
        if "," not in ref[:512]:
            raise RefError(f"{shown}: malformed data URI")
        return
    if low.startswith("file:"):
        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise RefError(f"{shown}: file:// URIs on another host are not supported")
        _check_path(unquote(parts.path), shown)
        return
    if "://" in ref[:32]:
        raise RefError(f"{shown}: unsupported scheme (use http(s)://, s3://, data: or an allowed path)")
    _check_path(ref, shown)


def verify_shard(ref: str, limits: Any) -> None:
    """RefError unless a client's `wds+`/`pq+` reference matches the shard's own headers or
    footer (other references pass untouched)."""
    if not ref.startswith(("wds+", "pq+")):
        return
    from scalecap.errors import ImageError
    from scalecap.images.shards import verify_shard_ref

    shown = ref[:120] + ("..." if len(ref) > 120 else "")
    try:
        verify_shard_ref(ref, limits, shown)
    except ImageError as exc:
        raise RefError(f"not a member the fleet would index: {exc}") from None


def ref_problem(exc: RefError, where: str) -> Exception:
    """The problem to answer: 403 naming the scope for RefRefused, 400 for a malformed reference."""
    from producer.api.problems import ApiProblem

    if isinstance(exc, RefRefused):
        return ApiProblem(403, "outside-scope", f"{where}: {exc}")
    return ApiProblem(400, "bad-reference", f"{where}: {exc}")


def checked_rows(rows: Iterable[SourceRow], roots: Sequence[str], *, scope: Any = FLEET_WIDE,
                 buckets: Sequence[str] = (), shard_limits: Any = None,
                 max_total_chars: int | None = None) -> Iterator[SourceRow]:
    """Rows with every refused reference turned into that row's error (nothing else is lost).

    `shard_limits`: re-derive client shard references (verify_shard) with these image limits.
    With `max_total_chars`, the references of one submission may hold at most that many
    characters in all (what Redis keeps of them); rows beyond become SubmissionTooLarge rows."""
    total = 0
    for row in rows:
        if row.error:
            yield row
            continue
        try:
            ref = check_ref(row.ref, roots, scope=scope, buckets=buckets)
            if shard_limits is not None:
                verify_shard(ref, shard_limits)
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


__all__ = ["FLEET_WIDE", "MAX_DATA_URI_CHARS", "MAX_REF_CHARS", "RefError", "RefRefused", "check_ref",
           "checked_rows", "ref_problem", "verify_shard"]
