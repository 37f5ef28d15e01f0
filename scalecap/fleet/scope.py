"""A batch's data scope: which local roots and S3 buckets/prefixes its jobs may read.

The submitting API key's scope travels with the batch (the `scope` field of its hash), so the
worker can check every read against it as well as the producer at submit. None means
fleet-wide (the CLI, an operator): the fleet's allow-lists (SCALECAP_ALLOWED_ROOTS,
SCALECAP_ALLOWED_BUCKETS) stay the outer bound either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scope:
    """Allowed local roots and S3 `bucket` or `bucket/prefix` entries (empty: none allowed)."""

    roots: tuple[str, ...] = ()
    buckets: tuple[str, ...] = ()
    """Entries `bucket` (the whole bucket) or `bucket/prefix` (keys under that prefix)."""

    @classmethod
    def of(cls, roots: Iterable[str] = (), buckets: Iterable[str] = ()) -> Scope:
        return cls(tuple(str(r) for r in roots), tuple(str(b).strip("/") for b in buckets))

    def to_json(self) -> str:
        return json.dumps({"roots": list(self.roots), "buckets": list(self.buckets)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Scope | None:
        """The stored form back; '' or None (no scope stored) is fleet-wide: None."""
        if not text:
            return None
        data: Any = json.loads(text)
        return cls.of(data.get("roots") or (), data.get("buckets") or ())

    @classmethod
    def of_batch(cls, batch: Mapping[str, Any] | None) -> Scope | None:
        """The scope stored on a batch hash (as BatchStore.batch returns it); None: fleet-wide."""
        return cls.from_json((batch or {}).get("scope"))


def scope_json(scope: Scope | None) -> str:
    """What the batch hash stores: '' for fleet-wide."""
    return scope.to_json() if scope is not None else ""


__all__ = ["Scope", "scope_json"]
