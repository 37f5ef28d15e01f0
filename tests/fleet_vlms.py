"""Test-only VLMs for fleet workers: the scripted model plus a call log and deliberate deaths.

Workers are separate processes, so "how much model work happened" is counted in a file: every
initial-caption call appends one line (O_APPEND writes of a short line do not interleave).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scalecap import prompts
from scalecap.backends.base import GenerateRequest, GenerateResult
from tests.scripted_vlm import ScriptedVLM, dominant_colour

LOG_ENV = "SCALECAP_TEST_VLM_LOG"


@dataclass
class FleetVLM(ScriptedVLM):
    """ScriptedVLM that logs each captioned image's colour and pid to $SCALECAP_TEST_VLM_LOG.

    slow_colour/slow_seconds: images of that colour take that long (jobs to cancel or kill).
    poison_colour: an image of that colour kills the whole worker process (os._exit(137)),
    as a job that crashes its engine would.
    """

    slow_colour: str | None = None
    slow_seconds: float = 0.0
    poison_colour: str | None = None
    log_path: str | None = None

    @classmethod
    async def create(cls, model: str = "scripted-vlm", **options: Any) -> FleetVLM:
        return cls(
            model_name=model,
            delay=float(options.pop("delay", 0.0)),
            slow_colour=options.pop("slow_colour", None),
            slow_seconds=float(options.pop("slow_seconds", 0.0)),
            poison_colour=options.pop("poison_colour", None),
            log_path=options.pop("log", None) or os.environ.get(LOG_ENV),
            score_values=options.pop("score_values", "logprobs"),  # "logits": a raw-logits engine
        )

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        for r in requests:
            if r.prompt != prompts.INIT_CAPTION or r.image is None:
                continue
            colour = dominant_colour(r.image)
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(f"{os.getpid()} {colour}\n")
            if colour == self.poison_colour:
                os._exit(137)
            if colour == self.slow_colour and self.slow_seconds:
                await asyncio.sleep(self.slow_seconds)
        return await super().generate(requests)

    # The scripted model keeps every call for assertions; a long-lived worker must not.
    def __post_init__(self) -> None:
        self.calls = _Discard()


class _Discard(list):
    def append(self, item: Any) -> None:
        return None


def read_log(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            return [(int(p), c) for p, c in (line.split() for line in f if line.strip())]
    except FileNotFoundError:
        return []
