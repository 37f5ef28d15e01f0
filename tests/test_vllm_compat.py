"""The vLLM release rules (scalecap/backends/vllm_compat.py), without starting an engine.

Engine arguments of releases other than the installed one are dataclasses shaped like theirs (a
release without `logprobs_mode`, one with another set of values); the installed release's own
`AsyncEngineArgs` is checked too when vLLM is importable.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import pytest

from scalecap.backends import vllm_compat as compat
from scalecap.errors import ConfigError


@dataclasses.dataclass
class ArgsWithoutLogprobsMode:
    model: str = ""
    max_model_len: int | None = None


@dataclasses.dataclass
class ArgsWithLogprobsMode:
    model: str = ""
    logprobs_mode: Literal["raw_logprobs", "raw_logits"] = "raw_logprobs"


@pytest.mark.parametrize(("text", "want"), [
    ("0.24.0", (0, 24, 0)), ("0.32.0+cpu", (0, 32, 0)), ("0.25.1rc1.dev3+g12ab", (0, 25, 1)),
    ("0.30", (0, 30, 0)), ("dev", None),
])
def test_parse_version(text, want) -> None:
    assert compat.parse_version(text) == want


def test_older_release_is_refused_newer_is_tried(caplog) -> None:
    with pytest.raises(ConfigError, match=r"0\.23\.1 is older .*0\.24\.x to 0\.32\.x"):
        compat.check_version("0.23.1")
    assert compat.check_version("0.24.0") == (0, 24, 0)
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        assert compat.check_version("0.40.0") == (0, 40, 0)
    assert "newer than the tested range" in caplog.text


def test_raw_logits_on_a_release_without_logprobs_mode_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"vLLM 0\.9\.0 has no logprobs_mode.*raw logits"):
        compat.engine_options(ArgsWithoutLogprobsMode, "0.9.0", {"model": "m", "logprobs_mode": "raw_logits"})
    # the default needs no such option
    opts = {"model": "m", "logprobs_mode": "raw_logprobs"}
    with pytest.raises(ConfigError, match=r"unknown vLLM engine option.*logprobs_mode"):
        compat.engine_options(ArgsWithoutLogprobsMode, "0.9.0", opts)
    assert compat.engine_options(ArgsWithoutLogprobsMode, "0.9.0", {"model": "m"}) == {"model": "m"}


def test_logprobs_mode_values_come_from_the_release() -> None:
    assert compat.logprobs_modes(ArgsWithLogprobsMode) == ("raw_logprobs", "raw_logits")
    assert compat.logprobs_modes(ArgsWithoutLogprobsMode) is None
    ok = {"model": "m", "logprobs_mode": "raw_logits"}
    assert compat.engine_options(ArgsWithLogprobsMode, "0.30.0", ok) == ok
    with pytest.raises(ConfigError, match="logprobs_mode must be one of raw_logprobs, raw_logits"):
        compat.engine_options(ArgsWithLogprobsMode, "0.30", dict(model="m", logprobs_mode="processed_logits"))


def test_raw_logits_before_0_26_are_refused() -> None:
    """0.24 and 0.25 return logprobs for prompt tokens even under raw_logits (seen on 0.24)."""
    opts = {"model": "m", "logprobs_mode": "raw_logits"}
    with pytest.raises(ConfigError, match=r"vLLM 0\.25\.1 gives logits for generated tokens but logprobs"):
        compat.engine_options(ArgsWithLogprobsMode, "0.25.1", opts)
    assert compat.engine_options(ArgsWithLogprobsMode, "0.26.0", opts) == opts
    assert compat.engine_options(ArgsWithLogprobsMode, "0.24", dict(model="m", logprobs_mode="raw_logprobs"))


def test_unknown_options_are_named() -> None:
    with pytest.raises(ConfigError, match=r"for vLLM 0\.30\.0: colour, no_such"):
        compat.engine_options(ArgsWithLogprobsMode, "0.30.0", {"model": "m", "no_such": 1, "colour": 2})


def test_request_error_unwraps_the_engine_wrapper() -> None:
    class EngineGenerateError(Exception):
        pass

    cause = ValueError("bad prompt")
    try:
        raise EngineGenerateError() from cause
    except EngineGenerateError as exc:
        assert compat.request_error(exc) is cause
    other = RuntimeError("x")
    assert compat.request_error(other) is other


@pytest.mark.engine  # imports vLLM (about 10 s)
def test_installed_release_is_in_range_and_has_the_options_the_backend_uses() -> None:
    """The vLLM of this environment (0.32 in the main venv, 0.24 in the second): every option
    VLLMBackend.create passes, and logprobs_mode with both logit values."""
    vllm = pytest.importorskip("vllm")
    from vllm.engine.arg_utils import AsyncEngineArgs

    version = compat.check_version(vllm.__version__)
    assert version is not None and compat.OLDEST <= version[:2] <= compat.NEWEST
    used = {"model", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "max_num_seqs",
            "dtype", "enforce_eager", "enable_prefix_caching", "trust_remote_code", "load_format", "seed",
            "limit_mm_per_prompt"}
    assert used <= compat.engine_arg_names(AsyncEngineArgs)
    modes = compat.logprobs_modes(AsyncEngineArgs)
    assert modes is not None and {"raw_logprobs", "raw_logits", "processed_logits"} <= set(modes)
    assert compat.final_only(vllm).name == "FINAL_ONLY"
