"""Fixtures that build the tiny model and start real engines on it, once per test session.

Engines bind to the event loop they were created on, so every engine lives on the session's
`engine_loop` (a BackgroundLoop thread) and tests run their coroutines with `engine_loop.run(coro)`.
Set SCALECAP_TINY_MODEL_DIR to reuse a model folder across sessions (built there if missing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scalecap.runtime import BackgroundLoop
from scalecap.testing.tiny_model import build_tiny_qwen2vl

ENGINE_TIMEOUT_S = 300.0

VLLM_TEST_OPTIONS: dict[str, Any] = {
    "max_model_len": 1024,
    "enforce_eager": True,
    "dtype": "bfloat16",
    "max_num_seqs": 16,
    "limit_mm_per_prompt": {"image": 1, "video": 0},
}
"""What the session's vLLM engine is started with (small context, no graph capture)."""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny random-weight Qwen2-VL (scalecap.testing.tiny_model)."""
    reuse = os.environ.get("SCALECAP_TINY_MODEL_DIR")
    out = Path(reuse) if reuse else tmp_path_factory.mktemp("tiny-qwen2vl")
    return build_tiny_qwen2vl(out)


@pytest.fixture(scope="session")
def engine_loop() -> Iterator[BackgroundLoop]:
    """The event loop every engine of the session lives on."""
    loop = BackgroundLoop(name="test-engine-loop")
    yield loop
    loop.stop()


@pytest.fixture(scope="session")
def engine_start_seconds() -> dict[str, float]:
    """Seconds each session engine took to start (name -> s), for reports."""
    return {}


@pytest.fixture(scope="session")
def vllm_backend(
    tiny_model_dir: Path, engine_loop: BackgroundLoop, engine_start_seconds: dict[str, float]
) -> Iterator[Any]:
    """One in-process vLLM engine on the tiny model for the whole session."""
    pytest.importorskip("vllm")
    from scalecap.backends.vllm import VLLMBackend

    t0 = time.perf_counter()
    backend = engine_loop.run(
        VLLMBackend.create(str(tiny_model_dir), **VLLM_TEST_OPTIONS), timeout=ENGINE_TIMEOUT_S
    )
    engine_start_seconds["vllm"] = time.perf_counter() - t0
    yield backend
    engine_loop.run(backend.aclose(), timeout=60)


@pytest.fixture(scope="session")
def transformers_backend(
    tiny_model_dir: Path, engine_loop: BackgroundLoop, engine_start_seconds: dict[str, float]
) -> Iterator[Any]:
    """The tiny model on Hugging Face transformers (CPU) for the whole session."""
    pytest.importorskip("transformers")
    from scalecap.backends.transformers import TransformersBackend

    t0 = time.perf_counter()
    backend = engine_loop.run(
        TransformersBackend.create(str(tiny_model_dir), device="cpu", max_model_len=1024),
        timeout=ENGINE_TIMEOUT_S,
    )
    engine_start_seconds["transformers"] = time.perf_counter() - t0
    yield backend
    engine_loop.run(backend.aclose(), timeout=60)
