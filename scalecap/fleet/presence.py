"""Worker presence in Redis, for readiness checks that cannot use Celery's remote control.

A worker calls `beat(redis, node, queues)` every few seconds; `seen(redis, queue)` lists the
nodes that beat for that queue within `max_age` seconds. One sorted set per queue, scored by the
time of the last beat, so a dead worker ages out without anyone cleaning up. Redis only.

Key (prefix `scalecap:`): workers:{queue}   sorted set node -> unix time of its last beat
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from scalecap.fleet.layout import PREFIX

DEFAULT_MAX_AGE = 30.0
"""Seconds after its last beat that a worker still counts as present."""


def presence_key(queue: str) -> str:
    return f"{PREFIX}workers:{queue}"


def beat(redis_client: Any, node: str, queues: Iterable[str], ttl: float = 3600.0) -> None:
    """Note that `node` consumes `queues` now."""
    now = time.time()
    pipe = redis_client.pipeline(transaction=False)
    for q in queues:
        pipe.zadd(presence_key(q), {node: now})
        pipe.expire(presence_key(q), int(ttl))
    pipe.execute()


def seen(redis_client: Any, queue: str, max_age: float = DEFAULT_MAX_AGE) -> list[str]:
    """Nodes that beat for `queue` within the last `max_age` seconds."""
    nodes = redis_client.zrangebyscore(presence_key(queue), time.time() - max_age, "+inf")
    return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in nodes)


__all__ = ["DEFAULT_MAX_AGE", "beat", "presence_key", "seen"]
