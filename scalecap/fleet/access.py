"""Which data a batch may read: its key's scope inside the fleet's allow-lists, decided from the
reference's text alone.

`refusal(ref, scope, roots, buckets)` says why a reference may not be read, naming which scope
refused (the key's, or the fleet's SCALECAP_ALLOWED_ROOTS / SCALECAP_ALLOWED_BUCKETS), or None.
The same function runs at submit (the HTTP API: images, manifests, shard references, thumbnails)
and in the worker before it opens anything, with the scope that travelled with the batch.
Nothing outside a scope is ever opened or listed to decide, so a refusal does not tell whether
the file, object or bucket exists; symlinks are resolved only for paths already inside both
scopes, so a link cannot lead out.

A scope is any object with `roots` (absolute directories) and `buckets` (`bucket` or
`bucket/prefix`) (scalecap/fleet/scope.py's Scope); None is fleet-wide (the CLI, an operator,
an `--all-data` key). A scope with neither reads only http(s) and data: URIs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

KEY_ROOTS = "the key's allowed roots"
KEY_BUCKETS = "the key's allowed buckets"
FLEET_ROOTS = "the fleet's SCALECAP_ALLOWED_ROOTS"
FLEET_BUCKETS = "the fleet's SCALECAP_ALLOWED_BUCKETS"


class ScopeRefused(PermissionError):
    """A reference outside a data scope; `scope` names which one refused."""

    def __init__(self, scope: str, detail: str) -> None:
        super().__init__(f"{detail}: outside {scope}")
        self.scope = scope


def _inside(path: str, roots: Sequence[str], *, resolve: bool) -> bool:
    from scalecap.images import under_roots

    return under_roots(path, roots, resolve=resolve)


def _local(path: str, scope: Any, fleet_roots: Sequence[str], shown: str) -> None:
    if not os.path.isabs(path) or "\x00" in path:
        raise ScopeRefused(FLEET_ROOTS, f"{shown}: a local path must be absolute")
    if not fleet_roots or not _inside(path, fleet_roots, resolve=False):
        raise ScopeRefused(FLEET_ROOTS, shown)
    key_roots = None if scope is None else tuple(scope.roots)
    if key_roots is not None and not _inside(path, key_roots, resolve=False):
        raise ScopeRefused(KEY_ROOTS, shown)
    # Inside both by its text: now (and only now) follow symlinks, so none leads out.
    if not _inside(path, fleet_roots, resolve=True):
        raise ScopeRefused(FLEET_ROOTS, shown)
    if key_roots is not None and not _inside(path, key_roots, resolve=True):
        raise ScopeRefused(KEY_ROOTS, shown)


def bucket_entry_allows(entry: str, bucket: str, key: str) -> bool:
    """`entry` is `bucket` (all of it) or `bucket/prefix` (keys at or below that folder)."""
    eb, _, prefix = entry.strip("/").partition("/")
    if eb != bucket:
        return False
    return not prefix or key == prefix or key.startswith(prefix + "/")


def _s3(bucket: str, key: str, scope: Any, fleet_buckets: Sequence[str], shown: str) -> None:
    if fleet_buckets and bucket not in fleet_buckets:
        raise ScopeRefused(FLEET_BUCKETS, shown)
    if scope is not None and not any(bucket_entry_allows(e, bucket, key) for e in scope.buckets):
        raise ScopeRefused(KEY_BUCKETS, shown)


def check(ref: str, scope: Any, fleet_roots: Sequence[str], fleet_buckets: Sequence[str] = ()) -> None:
    """Raise ScopeRefused when `ref` (or anything a shard reference makes a worker open) lies
    outside `scope` or the fleet's allow-lists; http(s) and data: are never refused here."""
    shown = ref[:120] + ("..." if len(ref) > 120 else "")
    low = ref[:16].lower()
    if low.startswith(("http://", "https://", "data:")):
        return
    if low.startswith(("wds+", "pq+")):
        from scalecap.images import locations

        try:
            opened = locations(ref)
        except Exception:  # malformed: whoever parses it next reports that
            raise ScopeRefused(KEY_ROOTS if scope is not None else FLEET_ROOTS,
                               f"{shown}: malformed shard reference") from None
        for loc in opened:
            check(loc, scope, fleet_roots, fleet_buckets)
        return
    if low.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        _s3(bucket, key, scope, fleet_buckets, shown)
        return
    if low.startswith("file:"):
        _local(unquote(urlsplit(ref).path), scope, fleet_roots, shown)
        return
    if "://" in ref[:32]:
        return  # not a reference any reader opens: refused as unsupported elsewhere
    _local(ref, scope, fleet_roots, shown)


def refusal(ref: str, scope: Any, fleet_roots: Sequence[str], fleet_buckets: Sequence[str]) -> str | None:
    """check() as a message, or None when `ref` may be read."""
    try:
        check(ref, scope, fleet_roots, fleet_buckets)
    except ScopeRefused as exc:
        return str(exc)
    return None


def check_listing(url: str, scope: Any, fleet_buckets: Sequence[str]) -> str:
    """An `s3://bucket/prefix` source to list: the whole listing must lie inside the scope.

    Returns the URL to list: `s3://b/p` under an entry `b/p` becomes `s3://b/p/`, so the
    listing cannot show a sibling `b/pq/...`."""
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.split("{", 1)[0]
    shown = url[:120]
    if not bucket or (fleet_buckets and bucket not in fleet_buckets):
        raise ScopeRefused(FLEET_BUCKETS, shown)
    if scope is None:
        return url
    for entry in scope.buckets:
        eb, _, ep = entry.strip("/").partition("/")
        if eb != bucket:
            continue
        if not ep or prefix.startswith(ep + "/"):
            return url
        if prefix == ep and "{" not in url:
            return url + "/"
    raise ScopeRefused(KEY_BUCKETS, shown)


__all__ = ["FLEET_BUCKETS", "FLEET_ROOTS", "KEY_BUCKETS", "KEY_ROOTS", "ScopeRefused", "bucket_entry_allows",
           "check", "check_listing", "refusal"]
