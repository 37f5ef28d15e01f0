"""Engine flags reach the backend's options: --raw-logits selects the logits that logit_diff reads."""

from __future__ import annotations

import argparse

import pytest

from scalecap.cli.options import add_engine_args, engine_options
from scalecap.settings import Settings


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p.parse_args(list(argv))


def test_raw_logits_sets_vllm_logprobs_mode():
    backend, model, opts = engine_options(parse("--backend", "vllm", "--model", "m", "--raw-logits"),
                                          Settings())
    assert (backend, model, opts["logprobs_mode"]) == ("vllm", "m", "raw_logits")
    _, _, plain = engine_options(parse("--backend", "vllm", "--model", "m"), Settings())
    assert "logprobs_mode" not in plain


def test_raw_logits_sets_transformers_option():
    _, _, opts = engine_options(parse("--backend", "transformers", "--raw-logits"), Settings())
    assert opts["raw_logits"] is True


def test_raw_logits_refused_for_a_remote_server():
    with pytest.raises(SystemExit, match="--raw-logits needs the vllm or transformers backend"):
        engine_options(parse("--backend", "openai", "--raw-logits"), Settings())
