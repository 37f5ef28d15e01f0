"""Reusable checks of the backend contract (scalecap/backends/base.py), for any engine.

Every function takes `(backend, loop)`: a started backend and the loop it lives on (anything with
`run(coro)`, normally the session's `scalecap.runtime.BackgroundLoop`; engines bind to the loop
they were created on, so coroutines must run there). Each raises AssertionError on a breach.

The checks assume a model that writes gibberish (the tiny random-weight Qwen2-VL): they assert on
structure (order, counts, types, offsets, finite logprobs), never on content. A backend test file
calls them one per test, e.g.::

    def test_generate_order(vllm_backend, engine_loop):
        contract.check_generate_order(vllm_backend, engine_loop)

`run_all(backend, loop)` runs every check (handy for a quick smoke test of a new engine).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import pytest
from PIL import Image, ImageDraw

from scalecap.backends.base import (
    Backend,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    TokenScore,
)
from scalecap.errors import BackendError

T = TypeVar("T")

CONTINUATION = "A red square sits in the center. A small dog stands on the left."
PROMPT = "Describe this image in fine detail."
SYSTEM = "You are a careful visual assistant."
LOGPROB_EPS = 1e-4
"""Engines compute in bf16/fp32; a logprob may round a hair above 0."""


class Runner(Protocol):
    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T: ...


def make_image(colour: tuple[int, int, int] = (220, 30, 30), size: tuple[int, int] = (96, 72)) -> Any:
    """A small picture with some structure (a coloured field, a square, a line)."""
    img = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.rectangle((w // 4, h // 4, w // 2, h // 2), fill=(255 - colour[0], 200, colour[2]))
    draw.line((0, h - 1, w - 1, 0), fill=(10, 10, 10), width=3)
    return img


def _gen(backend: Backend, loop: Runner, requests: list[GenerateRequest]) -> list[GenerateResult]:
    results = loop.run(backend.generate(requests))
    assert isinstance(results, list), type(results)
    assert len(results) == len(requests)
    for r in results:
        assert isinstance(r, GenerateResult), type(r)
        assert isinstance(r.text, str)
    return results


def _score(backend: Backend, loop: Runner, requests: list[ScoreRequest]) -> list[ScoreResult]:
    results = loop.run(backend.score(requests))
    assert isinstance(results, list), type(results)
    assert len(results) == len(requests)
    for r in results:
        assert isinstance(r, ScoreResult), type(r)
    return results


# --- generate ------------------------------------------------------------------------------


def check_attributes(backend: Backend, loop: Runner) -> None:
    """The backend satisfies the protocol and names its model."""
    assert isinstance(backend, Backend)
    assert isinstance(backend.model_name, str) and backend.model_name
    assert isinstance(backend.supports_scoring, bool)


def check_generate_order(backend: Backend, loop: Runner) -> None:
    """Results come back in input order: each request has its own max_tokens, and a request that
    stopped on length reports exactly that many completion tokens."""
    max_tokens = [7, 2, 11, 4, 9, 1]
    image = make_image()
    requests = [
        GenerateRequest(
            prompt=f"{PROMPT} Request {i}.",
            image=image if i % 2 else None,
            system=SYSTEM if i % 3 else None,
            max_tokens=n,
        )
        for i, n in enumerate(max_tokens)
    ]
    results = _gen(backend, loop, requests)
    by_length = 0
    for n, r in zip(max_tokens, results, strict=True):
        assert r.prompt_tokens > 0, r
        assert 0 < r.completion_tokens <= n, (n, r)
        if r.finish_reason == "length":
            assert r.completion_tokens == n, (n, r)
            by_length += 1
    # A random model rarely emits the end-of-turn token; most requests must have run to length.
    assert by_length >= len(max_tokens) // 2, [(r.completion_tokens, r.finish_reason) for r in results]


def check_generate_counts_image_tokens(backend: Backend, loop: Runner) -> None:
    """The same prompt costs more prompt tokens with an image than without."""
    with_image, without = _gen(
        backend,
        loop,
        [
            GenerateRequest(prompt=PROMPT, image=make_image(), max_tokens=3),
            GenerateRequest(prompt=PROMPT, max_tokens=3),
        ],
    )
    assert with_image.prompt_tokens > without.prompt_tokens > 0, (with_image, without)
    assert with_image.completion_tokens > 0 and without.completion_tokens > 0


def check_generate_deterministic(backend: Backend, loop: Runner) -> None:
    """Greedy decoding (temperature 0) gives the same text for the same request."""
    req = GenerateRequest(prompt=PROMPT, image=make_image((30, 50, 220)), max_tokens=6)
    a, b = _gen(backend, loop, [req, req])
    (c,) = _gen(backend, loop, [req])
    assert a.text == b.text == c.text, (a.text, b.text, c.text)


def check_top_logprobs(backend: Backend, loop: Runner, k: int = 3) -> None:
    """top_logprobs=k gives, per generated token, a dict of up to k(+1) alternatives: the engine
    may add the sampled token when it is not among the top k."""
    plain, asked = _gen(
        backend,
        loop,
        [
            GenerateRequest(prompt="Is the square red? Answer yes or no.", max_tokens=3),
            GenerateRequest(
                prompt="Is the square red? Answer yes or no.",
                image=make_image(),
                max_tokens=3,
                top_logprobs=k,
            ),
        ],
    )
    assert not plain.top_logprobs, "top_logprobs returned although not asked for"
    assert asked.top_logprobs is not None
    assert len(asked.top_logprobs) == asked.completion_tokens, asked
    for alternatives in asked.top_logprobs:
        assert isinstance(alternatives, dict)
        assert 1 <= len(alternatives) <= k + 1, alternatives
        for token, lp in alternatives.items():
            assert isinstance(token, str)
            assert math.isfinite(lp) and lp <= LOGPROB_EPS, (token, lp)


def check_concurrent_calls(backend: Backend, loop: Runner) -> None:
    """Many coroutines may call generate and score at once (the chain does): each gets its own
    results, in its own order."""

    async def many() -> list[Any]:
        calls: list[Any] = []
        for i in range(4):
            calls.append(backend.generate([GenerateRequest(prompt=f"Call {i}.", max_tokens=i + 1)]))
            calls.append(backend.score([ScoreRequest(prompt=f"Call {i}.", continuation="A cat.")]))
        return await asyncio.gather(*calls)

    if not backend.supports_scoring:
        pytest.skip("backend does not score")
    out = loop.run(many())
    for i in range(4):
        (gen,) = out[2 * i]
        (score,) = out[2 * i + 1]
        assert isinstance(gen, GenerateResult) and 0 < gen.completion_tokens <= i + 1, gen
        assert isinstance(score, ScoreResult) and score.tokens, score


def check_empty(backend: Backend, loop: Runner) -> None:
    """An empty list in gives an empty list out, without touching the engine."""
    assert loop.run(backend.generate([])) == []
    if backend.supports_scoring:
        assert loop.run(backend.score([])) == []


def check_bad_input_raises(backend: Backend, loop: Runner, words: int = 6000) -> None:
    """A prompt longer than the engine's context raises BackendError (not a raw engine error,
    and not a silently truncated result)."""
    long_prompt = " ".join(["square"] * words)
    with pytest.raises(BackendError):
        loop.run(backend.generate([GenerateRequest(prompt=long_prompt, max_tokens=2)]))
    # The backend is still usable afterwards.
    (ok,) = _gen(backend, loop, [GenerateRequest(prompt=PROMPT, max_tokens=2)])
    assert ok.completion_tokens > 0


# --- score ---------------------------------------------------------------------------------


def check_score_tokens(backend: Backend, loop: Runner, continuation: str = CONTINUATION) -> None:
    """One TokenScore per continuation token; their spans tile the continuation in order; the
    logprobs are finite and <= 0."""
    assert backend.supports_scoring
    with_image, without = _score(
        backend,
        loop,
        [
            ScoreRequest(prompt=PROMPT, continuation=continuation, image=make_image(), system=SYSTEM),
            ScoreRequest(prompt=PROMPT, continuation=continuation, system=SYSTEM),
        ],
    )
    for result in (with_image, without):
        assert result.prompt_tokens > 0
        assert_tokens_tile(result.tokens, continuation)
    assert with_image.prompt_tokens > without.prompt_tokens
    assert [t.text for t in with_image.tokens] == [t.text for t in without.tokens]


def assert_tokens_tile(tokens: list[TokenScore], continuation: str) -> None:
    """Spans are in order, inside the text, match each token's text and cover it end to end."""
    assert tokens, "no token scores"
    assert len(tokens) <= len(continuation.encode()), (len(tokens), continuation)
    pos = 0
    for t in tokens:
        assert isinstance(t, TokenScore), type(t)
        assert 0 <= t.start <= t.end <= len(continuation), t
        assert t.start == pos, (t, pos)
        assert continuation[t.start : t.end] == t.text, t
        assert math.isfinite(t.logprob) and t.logprob <= LOGPROB_EPS, t
        pos = t.end
    assert pos == len(continuation), (pos, len(continuation))


def check_score_image_matters(backend: Backend, loop: Runner) -> None:
    """The image changes the continuation's logprobs (what the contrastive rating measures), and
    scoring is deterministic."""
    image = make_image((30, 180, 40))
    req_img = ScoreRequest(prompt=PROMPT, continuation=CONTINUATION, image=image)
    req_txt = ScoreRequest(prompt=PROMPT, continuation=CONTINUATION)
    a, b, a2 = _score(backend, loop, [req_img, req_txt, req_img])
    lp_a = [t.logprob for t in a.tokens]
    lp_b = [t.logprob for t in b.tokens]
    assert len(lp_a) == len(lp_b)
    assert max(abs(x - y) for x, y in zip(lp_a, lp_b, strict=True)) > 1e-4, "image made no difference"
    lp_a2 = [t.logprob for t in a2.tokens]
    assert max(abs(x - y) for x, y in zip(lp_a, lp_a2, strict=True)) < 0.05, (lp_a, lp_a2)


def check_score_matches_generate(backend: Backend, loop: Runner) -> None:
    """Teacher forcing the model's own greedy output scores its tokens as likely: the chosen
    token's logprob is the top one, so each is >= the logprob of any alternative. Checked
    loosely (bf16 ties): the mean logprob of a greedy continuation beats that of a fixed text."""
    (gen,) = _gen(backend, loop, [GenerateRequest(prompt=PROMPT, max_tokens=8)])
    if not gen.text.strip():
        pytest.skip("the random model wrote only whitespace or special tokens")
    own, fixed = _score(
        backend,
        loop,
        [
            ScoreRequest(prompt=PROMPT, continuation=gen.text),
            ScoreRequest(prompt=PROMPT, continuation=CONTINUATION),
        ],
    )
    mean = lambda r: sum(t.logprob for t in r.tokens) / len(r.tokens)  # noqa: E731
    assert mean(own) > mean(fixed), (gen.text, mean(own), mean(fixed))


UNICODE_CONTINUATION = "Ein café 😀 — naïve  text.\nNew line: 日本語."


def check_score_unicode(backend: Backend, loop: Runner) -> None:
    """Multi-byte characters split over several byte-level tokens still tile the text (the
    extra tokens get zero-width spans). Engines that only return token strings (an OpenAI
    server) cannot always place split characters, so this is not in ALL_CHECKS."""
    check_score_tokens(backend, loop, continuation=UNICODE_CONTINUATION)


ALL_CHECKS: list[Callable[[Backend, Runner], None]] = [
    check_attributes,
    check_empty,
    check_generate_order,
    check_generate_counts_image_tokens,
    check_generate_deterministic,
    check_top_logprobs,
    check_concurrent_calls,
    check_score_tokens,
    check_score_image_matters,
    check_bad_input_raises,
]
"""The checks every scoring backend must pass (check_score_matches_generate and
check_score_unicode are extra)."""


def run_all(backend: Backend, loop: Runner) -> None:
    for check in ALL_CHECKS:
        check(backend, loop)


# --- one-pass scoring ---------------------------------------------------------------------------


def check_generation_token_scores(backend: Backend, loop: Runner, tol: float = 1e-3) -> None:
    """With `token_scores`, a greedy generation returns one score per generated token (end of turn
    left out), spans tiling its text, and the very values that teacher forcing those ids with the
    same prompt and image gives; without the image the same ids get their own scores."""
    assert getattr(backend, "supports_generation_logprobs", False)
    image = make_image((30, 50, 220))
    (gen,) = _gen(backend, loop, [
        GenerateRequest(prompt=PROMPT, image=image, system=SYSTEM, max_tokens=16, token_scores=True)
    ])
    assert gen.tokens is not None and gen.token_ids is not None, gen
    assert len(gen.tokens) == len(gen.token_ids) <= gen.completion_tokens
    assert gen.tokens, "no generated token scores"
    pos = 0
    for t in gen.tokens:
        assert pos <= t.start <= t.end <= len(gen.text) and gen.text[t.start : t.end] == t.text, t
        assert math.isfinite(t.logprob), t
        pos = t.end
    forced, without = _score(backend, loop, [
        ScoreRequest(PROMPT, gen.text, image=image, system=SYSTEM, continuation_ids=gen.token_ids),
        ScoreRequest(PROMPT, gen.text, image=None, system=SYSTEM, continuation_ids=gen.token_ids),
    ])
    assert len(forced.tokens) == len(without.tokens) == len(gen.tokens)
    assert [(t.start, t.end) for t in forced.tokens] == [(t.start, t.end) for t in gen.tokens]
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(gen.tokens, forced.tokens, strict=True)]
    assert max(diffs) <= tol, diffs
    assert max(abs(a.logprob - b.logprob) for a, b in zip(gen.tokens, without.tokens, strict=True)) > 1e-4
    (plain,) = _gen(backend, loop, [GenerateRequest(prompt=PROMPT, image=image, max_tokens=4)])
    assert plain.tokens is None and plain.token_ids is None


def check_fit_context(backend: Backend, loop: Runner, room: int = 24) -> None:
    """A text-only request with `fit_context` and a budget beyond the context runs to the context's
    end instead of failing. The prompt is sized to leave about `room` tokens (measured first)."""
    limit = getattr(backend, "max_model_len", None)
    if not limit:
        pytest.skip("backend does not know its context length")
    (probe,) = _gen(backend, loop, [GenerateRequest(prompt=" ".join(["square"] * 20), max_tokens=1)])
    (base,) = _gen(backend, loop, [GenerateRequest(prompt="square", max_tokens=1)])
    per_word = max(1, (probe.prompt_tokens - base.prompt_tokens) // 19)
    words = max(1, (limit - room - base.prompt_tokens) // per_word)
    prompt = " ".join(["square"] * words)
    (r,) = _gen(backend, loop, [GenerateRequest(prompt=prompt, max_tokens=10 * limit, fit_context=True)])
    assert r.completion_tokens > 0 and r.prompt_tokens + r.completion_tokens <= limit, r
