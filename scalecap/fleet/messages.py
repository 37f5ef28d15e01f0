"""The task message (a chunk of K images of one batch) and the chunk notes the scripts write.

JSON only, no Celery: the producer's client, the HTTP API and the workers share it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from scalecap.fleet.layout import PROTOCOL_VERSION, QUARANTINE_SUFFIX


def decode(v: Any) -> Any:
    """A Redis reply as str (redis-py answers bytes unless told otherwise)."""
    return v.decode() if isinstance(v, bytes) else v


@dataclass(frozen=True)
class JobMessage:
    """The body of one caption task: a chunk of (job id, image ref) of one batch, JSON only.

    Thin: the config lives in the batch hash (and in each worker's cache). Each image keeps its
    own job state, attempts and record; the chunk shares one claim and one finish script.
    `quarantine`: the chunk runs in the quarantine lane (alone in its worker).
    """

    batch_id: str
    jobs: tuple[tuple[str, str], ...]
    quarantine: bool = False
    v: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": self.v, "batch_id": self.batch_id,
                               "jobs": [list(j) for j in self.jobs]}
        if self.quarantine:
            out["quarantine"] = True
        return out

    @classmethod
    def from_json(cls, data: Any) -> JobMessage:
        if not isinstance(data, dict):
            raise ValueError(f"job message must be an object, got {type(data).__name__}")
        if data.get("v") != PROTOCOL_VERSION:
            raise ValueError(f"unsupported job message version {data.get('v')!r}")
        try:
            jobs = tuple((str(j), str(r)) for j, r in data["jobs"])
            return cls(batch_id=str(data["batch_id"]), jobs=jobs,
                       quarantine=bool(data.get("quarantine")))
        except KeyError as exc:
            raise ValueError(f"job message lacks {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ValueError(f"job message jobs must be [job_id, ref] pairs: {exc}") from exc


@dataclass(frozen=True)
class Chunk:
    """A chunk noted in `unpublished` (or a lease): decoded from its JSON member."""

    member: str
    batch_id: str
    queue: str
    jobs: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, member: str | bytes) -> Chunk:
        m = decode(member)
        d = json.loads(m)
        return cls(m, d["b"], d.get("q", ""), tuple((j, r) for j, r in d.get("jobs") or []))

    @property
    def quarantine(self) -> bool:
        return self.queue.endswith(QUARANTINE_SUFFIX)

    def messages(self, k: int) -> Iterator[JobMessage]:
        """The chunk as task messages of at most k images (one image each in quarantine)."""
        k = 1 if self.quarantine else max(1, int(k))
        for i in range(0, len(self.jobs), k):
            yield JobMessage(self.batch_id, self.jobs[i : i + k], self.quarantine)
