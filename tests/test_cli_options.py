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


def parse_all(*argv: str) -> argparse.Namespace:
    from scalecap.cli.options import add_config_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    add_config_args(p)
    return p.parse_args(list(argv))


def test_preset_authors_starts_a_raw_logits_engine_unless_the_mode_says_otherwise():
    _, _, opts = engine_options(parse_all("--backend", "vllm", "--preset", "authors"), Settings())
    assert opts["logprobs_mode"] == "raw_logits"
    _, _, opts = engine_options(parse_all("--backend", "transformers", "--preset", "authors"), Settings())
    assert opts["raw_logits"] is True
    _, _, opts = engine_options(
        parse_all("--backend", "vllm", "--preset", "authors", "--score-mode", "log_ratio"), Settings())
    assert "logprobs_mode" not in opts
    with pytest.raises(SystemExit, match="--preset authors scores raw logits"):
        engine_options(parse_all("--backend", "openai", "--preset", "authors"), Settings())


def test_preset_prompts_and_max_questions_none_reach_the_config(tmp_path):
    from scalecap.cli.options import config_from_args

    cfg = config_from_args(parse_all("--preset", "authors"))
    assert (cfg.preset, cfg.score_mode, cfg.token_filter) == ("authors", "logit_diff", "all")
    assert cfg.max_questions is None
    cfg = config_from_args(
        parse_all("--preset", "authors", "--token-filter", "content", "--max-questions", "7"))
    assert (cfg.token_filter, cfg.max_questions) == ("content", 7)
    assert config_from_args(parse_all("--max-questions", "none")).max_questions is None
    assert config_from_args(parse_all()).max_questions == 20
    path = tmp_path / "p.toml"
    path.write_text('caption = "Say what you see."\n')
    cfg = config_from_args(parse_all("--prompts", str(path)))
    assert cfg.prompts == {"caption": "Say what you see."}
    with pytest.raises(SystemExit):
        parse_all("--max-questions", "lots")
