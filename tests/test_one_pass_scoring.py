"""One-pass contrastive scoring and raw logits on the real engines (tiny random-weight Qwen2-VL).

Greedy generation returns each sampled token's score; teacher forcing the generated ids with the
same prompt and image gives the same values, so the chain's with-image pass is not needed. These
tests hold both engines to that, compare the chain's one-pass rating with two passes over the same
ids, and run `logit_diff` on a vLLM engine started with logprobs_mode='raw_logits'.
"""

from __future__ import annotations

import pytest

from scalecap import prompts
from scalecap.backends.base import GenerateRequest, ScoreRequest
from scalecap.chain import ChainItem, ScaleCapChain
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.rating import token_deltas
from scalecap.stages.context import ImageContext
from tests import backend_contract as contract
from tests.fixtures_engines import ENGINE_TIMEOUT_S, VLLM_TEST_OPTIONS

pytestmark = [pytest.mark.engine, pytest.mark.slow]

SMALL = dict(max_init_tokens=48, max_answer_tokens=16, max_questions=2, max_question_tokens=24,
             max_object_summary_tokens=24, max_position_summary_tokens=24, max_final_tokens=32)


def test_vllm_generation_scores_equal_teacher_forcing(vllm_backend, engine_loop):
    contract.check_generation_token_scores(vllm_backend, engine_loop, tol=1e-6)


def test_vllm_fit_context_clamps_the_budget(vllm_backend, engine_loop):
    contract.check_fit_context(vllm_backend, engine_loop)


def test_transformers_generation_scores_equal_teacher_forcing(transformers_backend, engine_loop):
    contract.check_generation_token_scores(transformers_backend, engine_loop, tol=1e-3)


def test_transformers_fit_context_clamps_the_budget(transformers_backend, engine_loop):
    contract.check_fit_context(transformers_backend, engine_loop)


def _one_and_two_pass(backend, loop, mode):
    """The chain's one-pass deltas of a generated caption, and two passes over the same ids."""
    image = contract.make_image((220, 30, 30))
    config = ImageScaleCaptionGenerateConfig(score_mode=mode)
    ctx = ImageContext(image=image, config=config, vlm=backend, llm=backend, system=prompts.DEFAULT_SYSTEM)
    request = ctx.vlm_request(prompts.INIT_CAPTION, 40, token_scores=True)
    (gen,) = loop.run(backend.generate([request]))
    assert ctx.one_pass and gen.tokens

    async def both():
        (one,) = await ctx.deltas([(prompts.INIT_CAPTION, gen.text, gen)], mode)
        with_img, without = await backend.score([
            ScoreRequest(prompts.INIT_CAPTION, gen.text, image=image, system=ctx.system,
                         continuation_ids=gen.token_ids),
            ScoreRequest(prompts.INIT_CAPTION, gen.text, image=None, system=ctx.system,
                         continuation_ids=gen.token_ids),
        ])
        return one, token_deltas(with_img, without, mode)

    return loop.run(both())


@pytest.mark.parametrize("mode", ["log_ratio", "prob_diff"])
def test_one_pass_rating_equals_two_passes_on_vllm(vllm_backend, engine_loop, mode):
    one, two = _one_and_two_pass(vllm_backend, engine_loop, mode)
    assert len(one) == len(two) > 0
    assert [(t.start, t.end) for t, _ in one] == [(t.start, t.end) for t, _ in two]
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two, strict=True)) <= 1e-6


def test_chain_on_vllm_sends_one_scoring_request_per_caption(vllm_backend, engine_loop):
    """Counted at the backend: one-pass rating costs one score request per rated text, two-pass two."""

    class Counting:
        def __init__(self, inner):
            self.inner, self.scores = inner, []
            self.model_name, self.supports_scoring = inner.model_name, True
            self.supports_generation_logprobs = True
            self.max_model_len = inner.max_model_len

        async def generate(self, requests):
            return await self.inner.generate(requests)

        async def score(self, requests):
            self.scores.extend(requests)
            return await self.inner.score(requests)

    image = contract.make_image((30, 180, 40))
    out = {}
    for one_pass in (True, False):
        counting = Counting(vllm_backend)
        chain = ScaleCapChain(counting, ImageScaleCaptionGenerateConfig(**SMALL, one_pass_scoring=one_pass))
        rec = engine_loop.run(chain.caption(ChainItem(source=image, ref="one-pass")), timeout=300)
        assert "error" not in rec, rec
        out[one_pass] = (rec, counting.scores)
    (rec1, s1), (rec2, s2) = out[True], out[False]
    assert rec1["meta"]["scoring_passes"] == 1 and rec2["meta"]["scoring_passes"] == 2
    assert len(s1) == 1 and s1[0].image is None and s1[0].continuation_ids
    assert len(s2) == 2 and {r.image is None for r in s2} == {True, False}
    assert rec1["init_caption"] == rec2["init_caption"]  # greedy: the same caption either way
    assert "caption" in rec1["meta"]["truncated"]  # the random model never stops on its own
    assert len(rec1["sentence_scores"]) == len(rec1["sentences"]) >= 1


def test_logit_diff_on_a_raw_logits_vllm_engine(tiny_model_dir, engine_loop):
    """vLLM started with logprobs_mode='raw_logits': token scores are logits (the authors' rule),
    generation and teacher forcing still agree, and the chain runs in logit_diff mode only."""
    pytest.importorskip("vllm")
    from scalecap.backends.vllm import VLLMBackend
    from scalecap.errors import ConfigError

    backend = engine_loop.run(
        VLLMBackend.create(str(tiny_model_dir), **VLLM_TEST_OPTIONS, logprobs_mode="raw_logits"),
        timeout=ENGINE_TIMEOUT_S,
    )
    try:
        assert backend.score_values == "logits"
        contract.check_generation_token_scores(backend, engine_loop, tol=1e-6)
        (gen,) = engine_loop.run(backend.generate([
            GenerateRequest(prompt="Say something.", max_tokens=8, token_scores=True)]))
        assert any(t.logprob > 0 for t in gen.tokens), "raw logits, not logprobs (which are <= 0)"
        with pytest.raises(ConfigError, match="raw logits"):
            ScaleCapChain(backend, ImageScaleCaptionGenerateConfig())
        chain = ScaleCapChain(backend, ImageScaleCaptionGenerateConfig(**SMALL, score_mode="logit_diff"))
        rec = engine_loop.run(chain.caption(ChainItem(source=contract.make_image(), ref="raw")), timeout=300)
        assert "error" not in rec, rec
        assert rec["meta"]["score_mode"] == "logit_diff" and rec["golden_sentences"]
        # the same engine serves the authors' preset and yes/no rating (one position, two logits)
        for extra in ({"preset": "authors"}, {"sentence_filter": "yesno"}):
            chain = ScaleCapChain(backend, ImageScaleCaptionGenerateConfig(**SMALL, **extra))
            item = ChainItem(source=contract.make_image(), ref="raw")
            rec = engine_loop.run(chain.caption(item), timeout=300)
            assert "error" not in rec, (extra, rec)
            assert all(-1.0 <= s <= 1.0 for s in rec["sentence_scores"]) or "preset" in extra
        assert rec["meta"]["rule"] == {"sentence_filter": "yesno", "threshold": 0.0}
    finally:
        engine_loop.run(backend.aclose(), timeout=60)
