"""State of one image as it moves through the chain, and the engine calls it makes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scalecap.backends.base import (
    Backend,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
)
from scalecap.errors import StageError

if TYPE_CHECKING:
    from PIL.Image import Image

    from scalecap.config import ImageScaleCaptionGenerateConfig


@dataclass
class ImageContext:
    """Everything the stages read and write for one image."""

    image: Image
    config: ImageScaleCaptionGenerateConfig
    vlm: Backend
    llm: Backend
    system: str
    image_ref: str = ""
    init_caption: str = ""
    sentences: list[str] = field(default_factory=list)
    sentence_scores: list[float] = field(default_factory=list)
    golden_sentences: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    object_questions: list[str] = field(default_factory=list)
    position_questions: list[str] = field(default_factory=list)
    object_answers: list[str] = field(default_factory=list)
    position_answers: list[str] = field(default_factory=list)
    answer_scores: list[float | None] = field(default_factory=list)
    answer_kept: list[bool] = field(default_factory=list)
    object_summary: str = ""
    position_summary: str = ""
    final_caption: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stage: str = "start"

    # --- engine calls that keep the books ---------------------------------------------------

    def vlm_request(self, prompt: str, max_tokens: int, *, image: bool = True, **kw: Any) -> GenerateRequest:
        c = self.config
        return GenerateRequest(
            prompt=prompt,
            image=self.image if image else None,
            system=self.system,
            max_tokens=max_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=c.seed,
            **kw,
        )

    async def generate(self, backend: Backend, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        if not requests:
            return []
        results = await backend.generate(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
        for r in results:
            self.prompt_tokens += r.prompt_tokens
            self.completion_tokens += r.completion_tokens
        return results

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []
        results = await self.vlm.score(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
        for r in results:
            self.prompt_tokens += r.prompt_tokens
        return results

    @contextmanager
    def timed(self, stage: str):
        """Time a stage and turn any failure inside it into a StageError naming it."""
        self.stage = stage
        t0 = time.perf_counter()
        try:
            yield
        except StageError:
            raise
        except Exception as exc:
            raise StageError(stage, exc, self.image_ref) from exc
        finally:
            self.stage_seconds[stage] = round(
                self.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0, 4
            )
