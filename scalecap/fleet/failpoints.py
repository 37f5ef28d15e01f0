"""Named failpoints for the fault-injection tests: `SCALECAP_FAILPOINT=name:action[,name:action]`.

Ignored unless the variable is set (one dictionary lookup per point otherwise). Actions:
  exit       the process dies at once (os._exit(137)), as a `kill -9` there would leave it;
  raise      a FailpointError is raised at the point;
  sleep=N    the point waits N seconds (a hang).
Points (where they sit): `after_claim` (a worker claimed a chunk, nothing run),
`before_sink_write` (records made, none written: a run paused here past its lease must write
nothing when it wakes), `after_sink_write` (records written, the finish script not run),
`after_pop` (kombu popped a task message and has not yet recorded it as unacked: a worker that
dies here loses the message), `after_finish` (state final, before anything
else, e.g. before the I/O worker drains the outbox), `submit_after_register` (the producer
registered a chunk of jobs but has not published it), `before_publish_retry` (a worker is about
to publish a chunk queued again), `drain_after_take` (a drainer took an event from the outbox,
its webhook task not yet published), `webhook_after_send` (the webhook was POSTed, the attempt
not yet recorded nor the event settled).
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

ENV = "SCALECAP_FAILPOINT"
POINTS = ("after_claim", "before_sink_write", "after_sink_write", "after_finish",
          "submit_after_register", "before_publish_retry", "after_pop", "drain_after_take",
          "webhook_after_send")


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is `raise`."""


def _parse(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in raw.split(","):
        name, _, action = part.strip().partition(":")
        if not name:
            continue
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown failpoint {name!r} (known: {', '.join(POINTS)})")
        out[name] = action or "exit"
    return out


_cache: tuple[str, dict[str, str]] | None = None


def active() -> dict[str, str]:
    global _cache
    raw = os.environ.get(ENV, "")
    if _cache is None or _cache[0] != raw:
        _cache = (raw, _parse(raw) if raw else {})
    return _cache[1]


def hit(name: str) -> None:
    """Run the action configured for `name`, if any."""
    action = active().get(name)
    if action is None:
        return
    log.warning("failpoint %s: %s", name, action)
    if action == "exit":
        os._exit(137)
    if action == "raise":
        raise FailpointError(f"failpoint {name}")
    if action.startswith("sleep="):
        time.sleep(float(action.split("=", 1)[1]))
        return
    raise ValueError(f"{ENV}: unknown action {action!r} for {name}")


def install_kombu_hook() -> None:
    """Put `after_pop` between kombu's pop of a message and its unacked write (Redis transport's
    QoS.append), when that failpoint is set; a no-op otherwise."""
    if "after_pop" not in active():
        return
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.append

    def append(self, message, delivery_tag):  # type: ignore[no-untyped-def]
        hit("after_pop")
        return original(self, message, delivery_tag)

    kombu_redis.QoS.append = append
