"""Submission sessions: a batch completes only when every submission feeding it has ended.

Each submit (CLI, FleetClient, an HTTP upload) opens a session on its batch before it creates
or reopens the batch, keeps it alive with every chunk it registers, and closes it at the end.
Submission is closed (and the batch may finish) when the last open session closes. A session
whose producer is gone (no register for SCALECAP_SUBMIT_TIMEOUT seconds, by Redis's clock) is
closed by the reconciler (`close_expired`); one that ended without registering any job
cancels its batch, so every batch either finishes or is closed, and then gets its TTL.
Scripts: scalecap/fleet/lua/{open,touch,close}_session.lua.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from scalecap.fleet.protocol import PREFIX, BatchStore
from scalecap.fleet.scope import Scope, scope_json

SESSIONS_KEY = PREFIX + "sessions"
"""Zset of open sessions, member 'batch_id session_id', score its deadline (Redis seconds)."""


class Closed(StrEnum):
    """How a session ended (close_session.lua's ARGV[5])."""

    OK = "ok"
    FAILED = "failed"
    """The producer gave up partway (an upload cut, a source error): nothing registered cancels."""
    ABANDONED = "abandoned"
    """Closed by the reconciler past its deadline."""


class SessionReply(StrEnum):
    """What the session scripts answer (each script's header lists its own)."""

    OPENED = "opened"
    OPEN = "open"
    """open_session: already open (a resent call); close_session: other sessions remain."""
    OK = "ok"
    COMPLETED = "completed"
    """close_session: this close finished the batch (its event is in the outbox)."""
    ALIVE = "alive"
    """close_session with only_if_due: the deadline has not passed."""
    DROPPED = "dropped"
    """close_session: the batch was never created; the session's fields are deleted."""
    GONE = "gone"
    """Not open (closed already: a resent call, or the reconciler closed it)."""


class SessionGone(RuntimeError):
    """The session was closed meanwhile (by the reconciler: this producer was taken as gone)."""


def _split(member: str | bytes) -> tuple[str, str]:
    text = member.decode() if isinstance(member, bytes) else member
    batch_id, _, session = text.partition(" ")
    return batch_id, session


@dataclass
class Sessions:
    """The three session transitions of one BatchStore's Redis."""

    store: BatchStore
    timeout: float = 600.0

    def _run(self, name: str, batch_id: str, args: list[Any]) -> SessionReply:
        res = self.store.run_script(name, batch_id, [*args, SESSIONS_KEY])
        return SessionReply(res.decode() if isinstance(res, bytes) else str(res))

    def open(self, batch_id: str, session: str, scope: Scope | None = None) -> SessionReply:
        """Open (before create_batch); the scope is stored when this session creates the batch."""
        return self._run("open_session", batch_id, [session, scope_json(scope), int(self.timeout)])

    def touch(self, batch_id: str, session: str) -> None:
        """Push the deadline back; SessionGone when the reconciler has closed it."""
        if self._run("touch_session", batch_id, [session, int(self.timeout)]) == SessionReply.GONE:
            raise SessionGone(f"submission to batch {batch_id} was closed after "
                              f"{self.timeout:g} s without a register (SCALECAP_SUBMIT_TIMEOUT)")

    def close(self, batch_id: str, session: str, how: Closed = Closed.OK, *, only_if_due: bool = False
              ) -> SessionReply:
        """'completed' when this close finished the batch; see close_session.lua for the rest."""
        return self._run("close_session", batch_id, [session, str(how), "1" if only_if_due else "0"])

    def due(self, limit: int = 1000) -> Iterator[tuple[str, str]]:
        """(batch id, session) of sessions past their deadline by Redis's clock."""
        t = self.store.r.time()[0]
        for m in self.store.r.zrangebyscore(SESSIONS_KEY, "-inf", t, start=0, num=limit):
            yield _split(m)

    def open_count(self) -> int:
        return int(self.store.r.zcard(SESSIONS_KEY))


def close_expired(store: BatchStore, timeout: float, limit: int = 1000) -> int:
    """The reconciler's part: close every session whose producer went silent; returns how many.

    Each close re-checks the deadline inside its script, so a producer that registers at the
    same moment keeps its session."""
    sessions = Sessions(store, timeout)
    n = 0
    for batch_id, session in list(sessions.due(limit)):
        reply = sessions.close(batch_id, session, Closed.ABANDONED, only_if_due=True)
        if reply not in (SessionReply.ALIVE, SessionReply.GONE):
            n += 1
    return n


__all__ = ["SESSIONS_KEY", "Closed", "SessionGone", "SessionReply", "Sessions", "close_expired"]
