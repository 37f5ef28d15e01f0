"""Worker presence in Redis, for readiness checks that cannot use Celery's remote control.

A worker calls `beat(redis, node, queues, rules)` every few seconds; `seen(redis, queue)` lists
the nodes that beat for that queue within `max_age` seconds. One sorted set per queue, scored by
the time of the last beat, so a dead worker ages out without anyone cleaning up. Beside it, a hash
holds the rating rules each node's engine can compute (a raw-logits engine serves logit_diff and
yesno, a logprobs engine log_ratio, prob_diff and yesno), so `scalecap submit` can warn when no
live worker can serve a batch's rule. Redis only.

Keys (prefix `scalecap:`): workers:{queue}         sorted set node -> unix time of its last beat
                           workers:{queue}:rules   hash node -> comma-separated rule names
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from scalecap.fleet.layout import PREFIX

DEFAULT_MAX_AGE = 30.0
"""Seconds after its last beat that a worker still counts as present."""


def presence_key(queue: str) -> str:
    return f"{PREFIX}workers:{queue}"


def rules_key(queue: str) -> str:
    return f"scalecap:workers:{queue}:rules"


def beat(
    redis_client: Any,
    node: str,
    queues: Iterable[str],
    ttl: float = 3600.0,
    rules: Sequence[str] | None = None,
) -> None:
    """Note that `node` consumes `queues` now (and, when known, which rules it serves)."""
    now = time.time()
    pipe = redis_client.pipeline(transaction=False)
    for q in queues:
        pipe.zadd(presence_key(q), {node: now})
        pipe.expire(presence_key(q), int(ttl))
        if rules is not None:
            pipe.hset(rules_key(q), node, ",".join(rules))
            pipe.expire(rules_key(q), int(ttl))
    pipe.execute()


def seen(redis_client: Any, queue: str, max_age: float = DEFAULT_MAX_AGE) -> list[str]:
    """Nodes that beat for `queue` within the last `max_age` seconds."""
    nodes = redis_client.zrangebyscore(presence_key(queue), time.time() - max_age, "+inf")
    return sorted(_text(n) for n in nodes)


def served_rules(
    redis_client: Any, queue: str, max_age: float = DEFAULT_MAX_AGE
) -> dict[str, list[str] | None]:
    """Live nodes of `queue` and the rules each serves (None: not said yet, engine starting)."""
    nodes = seen(redis_client, queue, max_age)
    if not nodes:
        return {}
    said = redis_client.hmget(rules_key(queue), nodes)
    return {n: (_text(r).split(",") if r else None) for n, r in zip(nodes, said, strict=True)}


def unserved_warning(
    redis_client: Any, queue: str, rule: str, max_age: float = DEFAULT_MAX_AGE
) -> str | None:
    """A line for the submitter when no live worker on `queue` can serve `rule`, else None."""
    served = served_rules(redis_client, queue, max_age)
    if any(r is None or rule in r for r in served.values()):
        return None
    hint = ("start one with `scalecap worker --raw-logits` (or --preset authors)" if rule == "logit_diff"
            else "start one without --raw-logits")
    if not served:
        return (f"no live worker on queue {queue}; the jobs wait until one that serves rule {rule!r} "
                f"starts ({hint})")
    offered = sorted({x for r in served.values() if r for x in r})
    return (f"no live worker on queue {queue} serves rule {rule!r} (they serve {', '.join(offered)}); "
            f"its jobs fail with ConfigError: {hint}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["DEFAULT_MAX_AGE", "beat", "presence_key", "rules_key", "seen", "served_rules", "unserved_warning"]
