"""The one contract every engine implements.

The contract is async and list-based: a list of requests in, results in the same order out. The
chain calls it from many images' coroutines at once; an engine that batches (vLLM, an OpenAI
server) sees every request in flight. Engines that do not batch across calls may serialise.

Images travel as decoded PIL images (the chain loads, orients and bounds them once); each engine
encodes them as it needs (vLLM takes PIL directly, an HTTP server gets a data URL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass
class GenerateRequest:
    """One chat turn: [system], user(image?, prompt) -> assistant text.

    When `image` is given it is placed first in the user turn, after the system prompt, so every
    call for one image shares one prefix (prefix and multimodal cache reuse).
    """

    prompt: str
    image: Image | None = None
    system: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    """1.0 is none; the chain sets it on text-only calls only (config `repetition_penalty`)."""
    top_logprobs: int = 0
    """When > 0, return the top-k alternatives of each generated token (yes/no rating)."""
    token_scores: bool = False
    """Return each generated token's id and score (vLLM's `logprobs=0`): under greedy decoding
    these equal what teacher forcing the same ids with the same prompt and image gives, so the
    contrastive rating needs no with-image pass. Backends without `supports_generation_logprobs`
    ignore it."""
    fit_context: bool = False
    """Lower max_tokens to what the model's context leaves after the prompt, instead of failing
    (the large fusion budgets). Backends that cannot count the prompt ignore it."""


@dataclass
class GenerateResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    top_logprobs: list[dict[str, float]] | None = None
    """Per generated token: {decoded token text: logprob} of the top-k alternatives."""
    finish_reason: str | None = None
    """"stop" (end of turn or a stop string), "length" (hit max_tokens or the context), or None."""
    tokens: list[TokenScore] | None = None
    """With `token_scores`: one entry per generated token of `text` (end-of-turn tokens left out),
    spans over `text`; `logprob` holds what `score` would give (see Backend.score_values)."""
    token_ids: list[int] | None = None
    """With `token_scores`: the ids of `tokens`, to teacher-force them without re-tokenising."""


@dataclass
class ScoreRequest:
    """Teacher forcing: how likely is `continuation` as the assistant's reply?

    Same turn layout as GenerateRequest; the continuation is appended after the assistant
    header (no end-of-turn token) and every one of its tokens is scored.
    """

    prompt: str
    continuation: str
    image: Image | None = None
    system: str | None = None
    continuation_ids: list[int] | None = None
    """When given, teacher-force exactly these ids (the continuation is their decoding, as
    generated) instead of tokenising `continuation`; the result has one TokenScore per id."""


@dataclass
class TokenScore:
    text: str
    """The token's text as it appears in the continuation."""
    start: int
    """Character offset of the token in the continuation (end exclusive below)."""
    end: int
    logprob: float
    """The token's log-probability, or its raw logit on an engine whose `score_values` is
    "logits" (vLLM started with logprobs_mode="raw_logits")."""


@dataclass
class ScoreResult:
    tokens: list[TokenScore] = field(default_factory=list)
    prompt_tokens: int = 0


@runtime_checkable
class Backend(Protocol):
    """What the chain needs from a model engine."""

    model_name: str
    supports_scoring: bool
    """True when `score` works (prompt logprobs / logits); contrastive mode needs it.

    Optional attributes, read with the helpers below so third-party backends need not have them:
    `supports_generation_logprobs` (bool: `token_scores` and `continuation_ids` work),
    `score_values` ("logprobs" or "logits": what TokenScore.logprob holds), `max_model_len`
    (int or None: the context, in tokens).
    """

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Run every request; results in input order. Raises BackendError on failure."""
        ...

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Teacher-force every request; results in input order."""
        ...

    async def aclose(self) -> None:
        """Release the engine (idempotent)."""
        ...


def char_offsets(pieces: Sequence[str], text: str) -> list[tuple[int, int]]:
    """Character spans of decoded token pieces laid end to end over `text`.

    Used by engines that return token strings without offsets (an OpenAI server). Pieces that
    do not line up (replacement characters of split UTF-8 bytes) get zero-width spans at the
    current position, which the rating treats as non-content.
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    for piece in pieces:
        if piece and text.startswith(piece, pos):
            spans.append((pos, pos + len(piece)))
            pos += len(piece)
        else:
            idx = text.find(piece, pos) if piece and "\ufffd" not in piece else -1
            if idx != -1 and idx - pos <= 2:
                spans.append((idx, idx + len(piece)))
                pos = idx + len(piece)
            else:
                spans.append((pos, pos))
    return spans


ScoreValues = Literal["logprobs", "logits"]


def generation_logprobs(backend: Any) -> bool:
    """Whether `backend` returns generated tokens' scores and teacher-forces given ids."""
    return bool(getattr(backend, "supports_generation_logprobs", False))


def score_values(backend: Any) -> ScoreValues:
    """What the backend's token scores are: "logprobs" (the default) or raw "logits"."""
    return "logits" if getattr(backend, "score_values", "logprobs") == "logits" else "logprobs"


T = TypeVar("T")


async def gather_or_cancel(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Await all together; on the first failure cancel the rest, so their engine requests stop
    using the engine, and raise that failure."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return []
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
    if failed is not None:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise failed.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]
