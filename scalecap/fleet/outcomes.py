"""Every name the queue protocol's scripts answer with, the job states they move between, and
the small records BatchStore hands back (Claim, Finish, Outcome, Transition).

The Lua scripts (scalecap/fleet/lua/*.lua) reply with these strings and codes; callers compare
against the enum members, never against bare strings, so a renamed reply breaks at import time
rather than silently at run time. `ALLOWED` is the one table of job-state moves; the scripts
make no other move (tests/test_fleet_states.py drives every edge through the Lua), and
docs/protocol.md draws it as a Mermaid state diagram.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any


class JobState(StrEnum):
    """A job's state (`s` in its JSON in `batch:{b}:job`)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

ALLOWED: dict[JobState | None, frozenset[JobState]] = {
    None: frozenset({JobState.QUEUED, JobState.FAILED}),  # register (a bad row fails at once)
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.QUEUED,
                                 JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}
"""Job-state moves the scripts may make (None: not yet registered). Final states are sinks:
nothing moves a done, failed or cancelled job again."""


def allowed(before: JobState | str | None, after: JobState | str) -> bool:
    """Whether a script may move a job from `before` to `after`."""
    key = JobState(before) if before else None
    return JobState(after) in ALLOWED[key]


class BatchState(StrEnum):
    """A batch's state as `status` reports it (derived from its hash, not stored)."""

    SUBMITTING = "submitting"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    FINISHED = "finished"
    CANCELLED = "cancelled"


FINAL_BATCH_STATES = frozenset({BatchState.FINISHED, BatchState.CANCELLED})


class BatchReply(StrEnum):
    """What close_batch and finish_chunk answer for the batch as a whole."""

    OK = "ok"
    COMPLETED = "completed"
    """This call finished the batch (exactly one caller per completion gets it)."""
    MISSING = "missing"


class CreateReply(StrEnum):
    """create_batch's first reply element."""

    CREATED = "created"
    REOPENED = "reopened"
    MISMATCH = "mismatch"


class RegisterCode(IntEnum):
    """register_jobs' code per job."""

    NOTHING = 0
    """Final already, or repeated within this call: nothing to publish."""
    NEW = 1
    KNOWN = 2
    """Known and not final: published again (its message may be lost)."""
    BAD = 3
    """New but failed at once (a bad row)."""


class ClaimCode(StrEnum):
    """claim_chunk's code per job."""

    RUN = "run"
    """This run holds the job (detail: the record index entry, or '')."""
    FINAL = "final"
    BUSY = "busy"
    """Another run holds a live lease (a duplicate message)."""
    SKIP = "skip"
    """Waits for its quarantine-lane message."""
    QUARANTINED = "quarantined"
    """Its run was lost: sent to the quarantine lane, not charged."""
    DEAD = "dead"
    CANCELLED = "cancelled"
    MISSING = "missing"


class RunOutcome(StrEnum):
    """What a run reports per job to finish_chunk."""

    DONE = "done"
    FAILED = "failed"
    RETRY = "retry"
    """The job's own failure: one attempt charged, dead-lettered at max attempts."""
    REQUEUE = "requeue"
    """Not the job's fault (its sink is down): queued again, never charged nor dead-lettered
    (parked: the worker claims nothing for that sink until it answers)."""


class FinishCode(StrEnum):
    """finish_chunk's code per job."""

    OK = "ok"
    STALE = "stale"
    """The job no longer holds this run's token: nothing written, counted in stale_results."""
    DEAD = "dead"


class LeaseReply(StrEnum):
    """expire_lease's and renew_lease's first reply element."""

    EXPIRED = "expired"
    LIVE = "live"
    """The lease is not past its deadline by Redis' clock: nothing taken back."""
    HELD = "held"
    LOST = "lost"


# --- what BatchStore hands back -------------------------------------------------------------


@dataclass
class Transition:
    """The outcome of one state change; `completed` is true for exactly one caller per batch."""

    result: BatchReply

    @property
    def completed(self) -> bool:
        return self.result is BatchReply.COMPLETED

    @property
    def applied(self) -> bool:
        return self.result in (BatchReply.OK, BatchReply.COMPLETED)


@dataclass
class Claim:
    """What claim_chunk decided for each job of a chunk."""

    lease: str
    quarantine: str
    """The unpublished member of jobs sent to the quarantine lane ('' if none)."""
    codes: dict[str, tuple[ClaimCode, str]] = field(default_factory=dict)
    """job id -> (code, detail); detail is the record index entry JSON (or '') for RUN."""

    def runnable(self) -> list[str]:
        return [j for j, (c, _) in self.codes.items() if c is ClaimCode.RUN]


@dataclass
class Outcome:
    """One job's result of a run, for finish_chunk."""

    job_id: str
    outcome: RunOutcome
    location: str = ""
    error: dict[str, Any] | None = None


@dataclass
class Finish:
    result: BatchReply
    retry: str
    """The unpublished member of jobs queued again ('' if none)."""
    codes: dict[str, FinishCode] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.result is BatchReply.COMPLETED


__all__ = [
    "ALLOWED",
    "FINAL_BATCH_STATES",
    "FINAL_STATES",
    "BatchReply",
    "BatchState",
    "Claim",
    "ClaimCode",
    "CreateReply",
    "Finish",
    "FinishCode",
    "JobState",
    "LeaseReply",
    "Outcome",
    "RegisterCode",
    "RunOutcome",
    "Transition",
    "allowed",
]
