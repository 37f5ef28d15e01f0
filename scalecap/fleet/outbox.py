"""Webhook events from the outbox to their delivery tasks, never lost on the way.

A transition that completes a batch (or a job, when asked) RPUSHes its event to the outbox in
the same script. A drainer hands events over one at a time (take_event.lua): each moves into the
pending set with a lease before its task is published, and stays there until its delivery task
settles it (settle_event.lua: delivered, refused for good, or replaced by its next attempt). A
publish that fails, a task message lost, a worker killed, a Redis or network error anywhere in
the task: the event's lease lapses and it is handed over again. Any number of drainers may run
at once, with no lock: each hand-over is one atomic step. Delivery is at least once; every copy
carries the same webhook-id, so a receiver deduplicates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from scalecap.fleet import failpoints
from scalecap.fleet.protocol import EVENT_JOB_COMPLETED, IO_JOBS_QUEUE, IO_QUEUE, OUTBOX_KEY, TASK_WEBHOOK
from scalecap.fleet.protocol import WEBHOOK_RETRIES_KEY as PENDING_KEY

DEFAULT_LEASE = 300.0
"""Seconds a handed-over event stays hidden before it is due again (SCALECAP_WEBHOOK_LEASE)."""


def _script(r: Any, name: str) -> Any:
    return r.register_script(resources.files("scalecap.fleet.lua").joinpath(f"{name}.lua").read_text())


def event_lane(event: dict[str, Any]) -> str:
    """Batch events and per-job events have their own lanes: a batch event never waits behind
    thousands of job events."""
    return IO_JOBS_QUEUE if event.get("type") == EVENT_JOB_COMPLETED else IO_QUEUE


@dataclass
class Drained:
    events: int = 0
    """New events handed over from the outbox."""
    retries_due: int = 0
    """Pending events handed over again: retries whose time came, or hand-overs whose task was lost."""


class Outbox:
    """The hand-over and settle steps over one Redis."""

    def __init__(self, redis_client: Any, lease: float = DEFAULT_LEASE) -> None:
        self.r = redis_client
        self.lease = float(lease)
        self._take = _script(redis_client, "take_event")
        self._settle = _script(redis_client, "settle_event")

    def take(self, which: str) -> str | None:
        """One event's JSON ('new': from the outbox, 'due': from the pending set), now pending."""
        raw = self._take(keys=[OUTBOX_KEY, PENDING_KEY], args=[which, self.lease])
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def settle(self, member: str, next_attempt: dict[str, Any] | None = None, delay: float = 0.0) -> bool:
        """Done with the event handed over as `member`; `next_attempt` is due after `delay` s.

        False when it was no longer pending (a second delivery of it settled it first)."""
        nxt = json.dumps(next_attempt, sort_keys=True) if next_attempt is not None else ""
        return bool(self._settle(keys=[PENDING_KEY], args=[member, nxt, max(0.0, float(delay))]))

    def drain(self, app: Any, limit: int = 500) -> Drained:
        """Hand over up to `limit` new events, then up to `limit` due ones, each as a webhook task
        in its lane. An error raised here leaves every event taken so far pending: due again."""
        out = Drained()
        for which in ("new", "due"):
            for _ in range(limit):
                member = self.take(which)
                if member is None:
                    break
                failpoints.hit("drain_after_take")
                event = json.loads(member)
                app.send_task(TASK_WEBHOOK, args=[event, member], queue=event_lane(event))
                if which == "new":
                    out.events += 1
                else:
                    out.retries_due += 1
        return out

    def pending(self) -> int:
        return int(self.r.zcard(PENDING_KEY))


__all__ = ["DEFAULT_LEASE", "PENDING_KEY", "Drained", "Outbox", "event_lane"]
