"""The transformers backend (CPU) with the tiny random-weight Qwen2-VL, held to the same contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scalecap.backends import create_backend, resolve_backend_class
from scalecap.backends.base import GenerateRequest
from scalecap.errors import ConfigError
from tests import backend_contract as contract

pytestmark = [pytest.mark.engine]


@pytest.mark.parametrize("check", contract.ALL_CHECKS, ids=lambda c: c.__name__)
def test_contract(transformers_backend, engine_loop, check) -> None:
    check(transformers_backend, engine_loop)


def test_greedy_output_scores_higher_than_fixed_text(transformers_backend, engine_loop) -> None:
    contract.check_score_matches_generate(transformers_backend, engine_loop)


def test_score_unicode_continuation(transformers_backend, engine_loop) -> None:
    contract.check_score_unicode(transformers_backend, engine_loop)


def test_batches_split_by_settings_and_size(transformers_backend, engine_loop) -> None:
    """Mixed settings and more requests than max_batch_size still come back in order, and
    batching (left padding) does not change greedy output."""
    image = contract.make_image()
    requests = [
        GenerateRequest(prompt=f"Question {i}.", image=image if i % 2 else None, max_tokens=2 + i % 3)
        for i in range(20)
    ]
    together = engine_loop.run(transformers_backend.generate(requests))
    alone = [engine_loop.run(transformers_backend.generate([r]))[0] for r in requests[:4]]
    for r, q in zip(together, requests, strict=True):
        assert 0 < r.completion_tokens <= q.max_tokens
    assert [r.text for r in together[:4]] == [r.text for r in alone]


def test_sampling_with_seed_is_reproducible(transformers_backend, engine_loop) -> None:
    req = GenerateRequest(prompt="Tell me.", max_tokens=6, temperature=1.0, seed=7)
    (a,) = engine_loop.run(transformers_backend.generate([req]))
    (b,) = engine_loop.run(transformers_backend.generate([req]))
    assert a.text == b.text


def test_bad_options_are_config_errors(engine_loop, tiny_model_dir) -> None:
    with pytest.raises(ConfigError):
        engine_loop.run(create_backend("transformers", str(tiny_model_dir), no_such_option=1))
    with pytest.raises(ConfigError):
        engine_loop.run(create_backend("transformers", str(tiny_model_dir), dtype="float77"))


def test_alias_resolves() -> None:
    from scalecap.backends.transformers import TransformersBackend

    assert resolve_backend_class("transformers") is TransformersBackend


def test_module_does_not_import_torch() -> None:
    code = "import sys, scalecap.backends.transformers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"], out.stdout
