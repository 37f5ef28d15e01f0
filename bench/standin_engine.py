"""A stand-in engine with a fixed capacity, so fleet benchmarks measure the queue, not the CPU.

A real worker's throughput is set by its GPU: vLLM serves a bounded number of sequences at once,
each taking roughly a fixed time. `FixedCapacityVLM` models exactly that: `slots` requests run at
once and each takes `latency` seconds, so one engine serves at most `slots / latency` requests/s
however many images are in flight. Its answers come from the deterministic scripted VLM (the
chain's logic runs for real on them), and it uses no CPU while "computing": eight of them on a
2-core machine behave like eight GPUs, not like eight processes fighting for two cores.

Use it as a worker backend: `scalecap worker --backend bench.standin_engine:FixedCapacityVLM
--backend-option slots=8 --backend-option latency=0.2`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scalecap.backends.base import GenerateRequest, GenerateResult, ScoreRequest, ScoreResult
from tests.scripted_vlm import ScriptedVLM


@dataclass
class FixedCapacityVLM(ScriptedVLM):
    """ScriptedVLM behind a capacity limit: `slots` concurrent requests of `latency` seconds each."""

    slots: int = 8
    latency: float = 0.2
    requests_served: int = 0
    _gate: asyncio.Semaphore | None = field(default=None, repr=False)

    @classmethod
    async def create(cls, model: str = "standin", **options: Any) -> FixedCapacityVLM:
        slots = int(options.pop("slots", 8))
        latency = float(options.pop("latency", 0.2))
        if slots < 1 or latency < 0:
            raise ValueError("slots must be >= 1 and latency >= 0")
        return cls(model_name=model, slots=slots, latency=latency)

    async def _serve(self, n: int) -> None:
        """Hold one slot per request for `latency` seconds; requests beyond `slots` wait."""
        if self._gate is None:  # made on the engine's own event loop
            self._gate = asyncio.Semaphore(self.slots)
        gate = self._gate

        async def one() -> None:
            async with gate:
                await asyncio.sleep(self.latency)

        await asyncio.gather(*(one() for _ in range(n)))
        self.requests_served += n

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        await self._serve(len(requests))
        return await super().generate(requests)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        await self._serve(len(requests))
        return await super().score(requests)
