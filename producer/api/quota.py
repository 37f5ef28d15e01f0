"""Per-key quota: how many images a key may have queued or running at once.

Admission is one Lua script (scalecap/fleet/lua/quota_admit.lua): it sums, over the key's
batches that may still hold queued images, their queued and running counts plus the images
admitted but not yet registered, and reserves the new submission's images in the same step. So
concurrent submits cannot both pass: six requests of 3 images against a quota of 3 admit one.
A stream (upload, s3 source) of unknown length reserves all the room left, and its rows beyond
it become QuotaExceeded error rows. Keys made without --max-queued get SCALECAP_DEFAULT_MAX_QUEUED.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from importlib import resources
from typing import Any

from producer.sources import SourceRow
from scalecap.fleet.keys import ApiKey, active_batches_key, reservations_key
from scalecap.fleet.protocol import PREFIX

RESERVATION_GRACE = 600
"""Seconds a reservation for a batch that was never created still counts (a crashed submit)."""


class QuotaExceeded(Exception):
    """No room for the submission; `in_use` images are queued or running (or admitted)."""

    def __init__(self, limit: int, in_use: int, wanted: int | None) -> None:
        super().__init__(f"quota of {limit} images queued or running: {in_use} in use"
                         + (f", {wanted} more asked" if wanted is not None else ""))
        self.limit, self.in_use, self.wanted = limit, in_use, wanted


class Quota:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.r = client.redis
        self.default = int(getattr(client.settings, "default_max_queued", 100_000) or 0)
        src = resources.files("scalecap.fleet.lua").joinpath("quota_admit.lua").read_text()
        self._admit = self.r.register_script(src)

    def limit(self, key: ApiKey) -> int | None:
        """The key's quota: its own --max-queued, else the fleet default (None: no limit)."""
        if key.max_queued is not None:
            return key.max_queued
        return self.default or None

    def admit(self, key: ApiKey, batch_id: str, wanted: int | None) -> int | None:
        """Reserve `wanted` images (None: a stream, all the room left) for `batch_id`, atomically.

        Returns the images admitted (None: the key has no limit); raises QuotaExceeded when there
        is no room, or not room for all `wanted`."""
        limit = self.limit(key)
        if limit is None:
            return None
        ask = -1 if wanted is None else int(wanted)
        took, in_use = self._admit(
            keys=[active_batches_key(key.key_id), reservations_key(key.key_id)],
            args=[limit, ask, batch_id, PREFIX, RESERVATION_GRACE])
        if int(took) <= 0:
            raise QuotaExceeded(limit, int(in_use), wanted)
        return int(took)

    def release(self, key: ApiKey, batch_id: str) -> None:
        """Drop the reservation of a batch that was never created (its request failed first)."""
        if not self.r.exists(f"{PREFIX}batch:{batch_id}"):
            self.r.hdel(reservations_key(key.key_id), batch_id)
            self.r.srem(active_batches_key(key.key_id), batch_id)

    def in_use(self, key: ApiKey) -> int:
        """Images of `key` queued, running or admitted now (reserves nothing)."""
        limit = self.limit(key)
        _, in_use = self._admit(
            keys=[active_batches_key(key.key_id), reservations_key(key.key_id)],
            args=[max(limit or 0, 0), 0, "", PREFIX, RESERVATION_GRACE])
        return int(in_use)

    def room(self, key: ApiKey) -> int | None:
        """Images `key` may still add (None: no limit); a reading, not a reservation."""
        limit = self.limit(key)
        return None if limit is None else max(0, limit - self.in_use(key))

    def track(self, key: ApiKey, batch_id: str) -> None:
        """Count `batch_id` in the key's quota (for a submission admitted without `admit`)."""
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


__all__ = ["RESERVATION_GRACE", "Quota", "QuotaExceeded", "capped"]
