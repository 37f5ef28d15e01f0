"""Per-key quota: how many images a key may have queued or running at once.

The API remembers which of a key's batches may still hold queued images (a small Redis set per
key, scalecap/fleet/keys.py); their live counts come from FleetClient.status, and finished
batches leave the set as they are seen. The check happens at admission and is not a lock: two
requests arriving together may both pass, and a streamed manifest is cut at the quota instead
(rows beyond it become QuotaExceeded error rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from producer.client import BatchNotFound
from producer.sources import SourceRow
from scalecap.fleet.keys import ApiKey, active_batches_key


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Quota:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.r = client.redis

    def in_use(self, key: ApiKey) -> int:
        """Images of `key` queued or running now."""
        total = 0
        ak = active_batches_key(key.key_id)
        for raw in self.r.smembers(ak):
            b = _s(raw)
            try:
                st = self.client.status(b)
            except BatchNotFound:
                self.r.srem(ak, b)
                continue
            if st.get("finished_at") is not None:
                self.r.srem(ak, b)
                continue
            total += int(st.get("queued") or 0) + int(st.get("running") or 0)
        return total

    def room(self, key: ApiKey) -> int | None:
        """Images `key` may still add (None: no limit)."""
        if key.max_queued is None:
            return None
        return max(0, key.max_queued - self.in_use(key))

    def track(self, key: ApiKey, batch_id: str) -> None:
        self.r.sadd(active_batches_key(key.key_id), batch_id)


def capped(rows: Iterable[SourceRow], room: int | None) -> Iterator[SourceRow]:
    """Rows, with every image beyond `room` turned into a QuotaExceeded error row."""
    n = 0
    for row in rows:
        if room is not None and not row.error:
            n += 1
            if n > room:
                row = SourceRow(ref=row.ref[:1000], error={
                    "stage": "submit", "type": "QuotaExceeded",
                    "message": f"the key's quota of queued images was reached after {room} images"})
        yield row


__all__ = ["Quota", "capped"]
