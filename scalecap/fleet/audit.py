"""Every job reachable: find queued jobs whose task message vanished, and publish them again.

A job that is not final always has one of: a message in its lane (the broker's list), an
unacknowledged entry (kombu's `unacked` hash: a worker holds it), a live lease, or a note in
`unpublished`. kombu pops a message before it records it as unacked, so a worker that dies in
between (or Redis losing its last second of AOF) leaves a queued job with none of these, and
nothing else would ever bring it back.

`Auditor.audit` reads, in this order, the notes, the lanes and the unacked hash (a producer
publishes before it drops its note, so a job cannot slip between the reads), then every queued
job of every unfinished batch. A job found with nothing that reaches it is a suspect; a suspect
found again by the next audit with the same `updated_at` (no script touched it meanwhile) is
restored to the lane it is in: the normal lane, or the quarantine lane for a job waiting there.
A message restored twice is harmless (workers skip final and busy jobs). The I/O worker audits
every `AUDIT_EVERY` reconcile passes, so a vanished message is published again within two
audits (docs/protocol.md states the bound).
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from scalecap.fleet.layout import (
    BATCHES_KEY,
    PREFIX,
    UNPUBLISHED_KEY,
    batch_key,
    job_states_key,
    quarantine_queue,
)
from scalecap.fleet.messages import Chunk, JobMessage, decode
from scalecap.fleet.outcomes import JobState

log = logging.getLogger(__name__)

AUDIT_EVERY = 10
"""The I/O worker audits once per this many reconcile passes (SCALECAP_RECONCILE_INTERVAL)."""
SUSPECTS_KEY = PREFIX + "audit:suspects"
"""hash "{batch}\\t{job}" -> updated_at of the job found unreachable by the last audit."""
UNACKED_KEY = "unacked"
"""kombu's Redis transport keeps delivered, unacknowledged messages here (its default name)."""
_PRIORITY_SEP, _PRIORITY_STEPS = "\x06\x16", (3, 6, 9)
PAGE = 1000


@dataclass
class AuditReport:
    open_batches: int = 0
    reachable: int = 0
    suspects: int = 0
    restored: int = 0
    unreachable: list[tuple[str, str]] = field(default_factory=list)


Reach = tuple[str, str, bool]
"""(batch, job, in the quarantine lane): a normal-lane message does not reach a job that waits
in the quarantine lane (the claim skips it there)."""


def _message_jobs(raw: Any) -> Iterator[Reach]:
    """What one kombu message reaches (a list entry, or an unacked [message, ...])."""
    try:
        data = json.loads(raw)
        if isinstance(data, list):
            data = data[0]
        body = data["body"]
        if data.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        msg = JobMessage.from_json(args[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return  # not a caption task (a webhook event, another app's message)
    for j, _ in msg.jobs:
        yield msg.batch_id, j, msg.quarantine


class Auditor:
    """Finds and restores jobs no message, unacked entry, lease or note reaches."""

    def __init__(self, r: Any, publish: Any = None) -> None:
        self.r = r
        self.publish = publish
        """publish(chunk) sends a chunk's messages (Reconciler passes publish_chunk)."""

    def _lanes_present(self, lanes: set[str]) -> set[Reach]:
        seen: set[Reach] = set()
        for lane in lanes:
            for key in (lane, *(f"{lane}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS)):
                start = 0
                while True:
                    page = self.r.lrange(key, start, start + PAGE - 1)
                    for raw in page:
                        seen.update(_message_jobs(raw))
                    if len(page) < PAGE:
                        break
                    start += PAGE
        for _, raw in self.r.hscan_iter(UNACKED_KEY, count=PAGE):
            seen.update(_message_jobs(raw))
        return seen

    def _noted(self) -> set[Reach]:
        """Jobs in `unpublished` notes, by lane (leases hold running jobs, not queued ones)."""
        noted: set[Reach] = set()
        for member in self.r.zrange(UNPUBLISHED_KEY, 0, -1):
            chunk = Chunk.parse(member)
            noted.update((chunk.batch_id, j, chunk.quarantine) for j, _ in chunk.jobs)
        return noted

    def _open_batches(self) -> dict[str, str]:
        """batch id -> its queue, for every batch that has not finished and has queued jobs."""
        out: dict[str, str] = {}
        ids = [decode(b) for b in self.r.zrange(BATCHES_KEY, 0, -1)]
        for i in range(0, len(ids), PAGE):
            pipe = self.r.pipeline(transaction=False)
            for b in ids[i : i + PAGE]:
                pipe.hmget(batch_key(b), "created_at", "finished_at", "queue", "queued")
            for b, (created, finished, queue, queued) in zip(ids[i : i + PAGE], pipe.execute(),
                                                             strict=True):
                if created is not None and finished is None and queue and int(queued or 0) > 0:
                    out[b] = decode(queue)
        return out

    def audit(self, *, restore: bool = True) -> AuditReport:
        """One audit; restores suspects confirmed by the previous audit. `restore=False` only
        reports the jobs nothing reaches now (`unreachable`) and changes nothing."""
        rep = AuditReport()
        batches = self._open_batches()
        rep.open_batches = len(batches)
        noted = self._noted()
        lanes = {q for q in batches.values()} | {quarantine_queue(q) for q in batches.values()}
        present = self._lanes_present(lanes) | noted
        before = {decode(k): decode(v) for k, v in self.r.hgetall(SUSPECTS_KEY).items()}
        suspects: dict[str, str] = {}
        confirmed: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for b, queue in batches.items():
            for j, raw in self.r.hscan_iter(job_states_key(b), count=PAGE):
                j = decode(j)
                job = json.loads(raw)
                if job.get("s") != JobState.QUEUED:
                    continue
                if (b, j, job.get("q") == 1) in present:
                    rep.reachable += 1
                    continue
                key, u = f"{b}\t{j}", str(job.get("u", ""))
                rep.unreachable.append((b, j))
                if before.get(key) == u:
                    lane = quarantine_queue(queue) if job.get("q") == 1 else queue
                    confirmed.setdefault((b, lane), []).append((j, job.get("r", "")))
                else:
                    suspects[key] = u
        rep.suspects = len(suspects)
        if not restore:  # a look only (bench.chaos' invariant): the suspects stay as they were
            return rep
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(SUSPECTS_KEY)
        if suspects:
            pipe.hset(SUSPECTS_KEY, mapping=suspects)
        pipe.execute()
        for (b, lane), jobs in confirmed.items():
            self._restore(b, lane, jobs)
            rep.restored += len(jobs)
        return rep

    def _restore(self, b: str, lane: str, jobs: list[tuple[str, str]]) -> None:
        """Note the jobs as unpublished first (a crash here is repaired), then publish them."""
        member = json.dumps({"c": uuid.uuid4().hex + ":a", "b": b, "q": lane, "jobs": jobs})
        self.r.zadd(UNPUBLISHED_KEY, {member: 0})
        log.warning("audit: %d job(s) of batch %s had no message; published again to %s",
                    len(jobs), b, lane)
        if self.publish is not None:
            self.publish(Chunk.parse(member))
            self.r.zrem(UNPUBLISHED_KEY, member)
