"""State of one image as it moves through the chain, and the engine calls it makes."""

from __future__ import annotations

import contextvars
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
    TokenScore,
    gather_or_cancel,
    generation_logprobs,
)
from scalecap.errors import StageError
from scalecap.rating import ScoreMode, token_deltas
from scalecap.templates import Templates

if TYPE_CHECKING:
    from PIL.Image import Image

    from scalecap.config import ImageScaleCaptionGenerateConfig

CURRENT_STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("scalecap_stage", default="")
"""The stage whose engine calls are running (benchmarks tag requests with it)."""


class UnusableText(ValueError):
    """A model output the chain cannot build on (empty caption, no sentence, empty fusion)."""


@dataclass
class ImageContext:
    """Everything the stages read and write for one image."""

    image: Image
    config: ImageScaleCaptionGenerateConfig
    vlm: Backend
    llm: Backend
    system: str
    text_system: str = ""
    image_ref: str = ""
    templates: Templates = field(default_factory=Templates)
    """Every text the stages send (ours, or the config's prompts)."""
    init_caption: str = ""
    caption_result: GenerateResult | None = None
    sentences: list[str] = field(default_factory=list)
    sentence_scores: list[float] = field(default_factory=list)
    unit_scores: list[list[float]] = field(default_factory=list)
    golden_sentences: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    object_owner: list[int] = field(default_factory=list)
    """Index of the golden sentence each object (and its two questions) came from."""
    object_questions: list[str] = field(default_factory=list)
    position_questions: list[str] = field(default_factory=list)
    object_answers: list[str] = field(default_factory=list)
    position_answers: list[str] = field(default_factory=list)
    answer_results: list[GenerateResult] = field(default_factory=list)
    answer_texts: list[str] = field(default_factory=list)
    """What fusion reads of each answer: the whole answer, or its passing sentences."""
    answer_scores: list[float | None] = field(default_factory=list)
    answer_kept: list[bool] = field(default_factory=list)
    object_summary: str = ""
    position_summary: str = ""
    final_caption: str = ""
    truncated: list[str] = field(default_factory=list)
    """Stages with a generation that stopped on its token limit, in order."""
    notes: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stage: str = "start"

    @property
    def one_pass(self) -> bool:
        """Whether with-image scores come from the generation itself (see docs/chain.md)."""
        c = self.config
        return (
            c.one_pass_scoring
            and c.sentence_filter == "contrastive"
            and c.temperature == 0
            and generation_logprobs(self.vlm)
        )

    # --- engine calls that keep the books ---------------------------------------------------

    def vlm_request(self, prompt: str, max_tokens: int, *, image: bool = True, **kw: Any) -> GenerateRequest:
        """A request with the image and the image system prompt, or text-only with the text one
        (and the config's repetition penalty, which the authors apply to their text-only calls)."""
        c = self.config
        return GenerateRequest(
            prompt=prompt,
            image=self.image if image else None,
            system=self.system if image else (self.text_system or self.system),
            max_tokens=max_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=c.seed,
            repetition_penalty=1.0 if image else c.repetition_penalty,
            **kw,
        )

    async def generate(
        self, backend: Backend, requests: Sequence[GenerateRequest], *, one_token: bool = False
    ) -> list[GenerateResult]:
        """Run requests; count tokens; note the stage when any generation hit its token limit
        (unless a single token is all that was asked for: a yes/no verdict)."""
        if not requests:
            return []
        results = await backend.generate(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
        for r in results:
            self.prompt_tokens += r.prompt_tokens
            self.completion_tokens += r.completion_tokens
            if r.finish_reason == "length" and not one_token and self.stage not in self.truncated:
                self.truncated.append(self.stage)
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

    async def deltas(
        self, items: Sequence[tuple[str, str, GenerateResult | None]], mode: ScoreMode
    ) -> list[list[tuple[TokenScore, float]]]:
        """Per-token image-vs-no-image differences of each (prompt, text, generation) item.

        One pass when the generation carries its own token scores (the text is its output): only
        the generated ids are teacher-forced, without the image. Two passes otherwise (text from
        elsewhere, sampling, a backend without generation logprobs). All requests of the call go
        to the engine together.
        """
        requests: list[ScoreRequest] = []
        plan: list[tuple[int, list[TokenScore] | None]] = []
        for prompt, text, gen in items:
            one = gen is not None and gen.tokens is not None and gen.token_ids is not None
            plan.append((len(requests), gen.tokens if one else None))  # type: ignore[union-attr]
            if one:
                requests.append(
                    ScoreRequest(prompt, text, image=None, system=self.system, continuation_ids=gen.token_ids)  # type: ignore[union-attr]
                )
            else:
                requests.append(ScoreRequest(prompt, text, image=self.image, system=self.system))
                requests.append(ScoreRequest(prompt, text, image=None, system=self.system))
        results = await self.score(requests)
        out = []
        for at, generated in plan:
            if generated is not None:
                without = results[at]
                if len(without.tokens) != len(generated):
                    raise RuntimeError(
                        f"teacher forcing gave {len(without.tokens)} token scores for "
                        f"{len(generated)} generated tokens"
                    )
                out.append(token_deltas(generated, without, mode))
            else:
                out.append(token_deltas(results[at], results[at + 1], mode))
        return out

    @staticmethod
    async def together(*coros: Any) -> list[Any]:
        """Concurrent calls of one image; when one fails the others are cancelled."""
        return await gather_or_cancel(list(coros))

    @contextmanager
    def timed(self, stage: str):
        """Time a stage and turn any failure inside it into a StageError naming it."""
        self.stage = stage
        token = CURRENT_STAGE.set(stage)
        t0 = time.perf_counter()
        try:
            yield
        except StageError:
            raise
        except Exception as exc:
            raise StageError(stage, exc, self.image_ref) from exc
        finally:
            CURRENT_STAGE.reset(token)
            self.stage_seconds[stage] = round(
                self.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0, 4
            )
