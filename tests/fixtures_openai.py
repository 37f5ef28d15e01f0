"""A real vLLM OpenAI-compatible server process on the tiny model, once per test session.

`vllm serve` fails under vllm-cpu (the CLI looks up package metadata of `vllm`), so the server is
started as `python -m vllm.entrypoints.openai.api_server` (it warns that this entry point is
deprecated; it is the one that works here). The server still runs its engine core in a child
process; terminating the server stops both. Start-up takes about half a minute on 2 cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from scalecap.runtime import BackgroundLoop

SERVED_MODEL_NAME = "tiny-qwen2vl"
SERVER_START_TIMEOUT_S = 180.0
SERVER_MAX_NUM_SEQS = 16


@dataclass
class VLLMServer:
    base_url: str
    """http://127.0.0.1:PORT/v1"""
    model: str
    log_path: Path
    start_seconds: float
    process: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def vllm_server(
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    engine_start_seconds: dict[str, float],
) -> Iterator[VLLMServer]:
    """Start the server on a free loopback port, wait for /health, stop it at session end."""
    pytest.importorskip("vllm")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TORCHDYNAMO_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_dir),
        "--served-model-name", SERVED_MODEL_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "1024", "--enforce-eager", "--dtype", "bfloat16",
        "--max-num-seqs", str(SERVER_MAX_NUM_SEQS),
        "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    t0 = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = t0 + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"vLLM server exited with {proc.returncode} during start-up:\n" + _tail(log_path, 60)
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() > deadline:
                pytest.fail(
                    f"vLLM server not healthy after {SERVER_START_TIMEOUT_S:.0f}s:\n" + _tail(log_path, 60)
                )
            time.sleep(0.5)
        elapsed = time.perf_counter() - t0
        engine_start_seconds["openai-server"] = elapsed
        yield VLLMServer(
            base_url=f"http://127.0.0.1:{port}/v1",
            model=SERVED_MODEL_NAME,
            log_path=log_path,
            start_seconds=elapsed,
            process=proc,
        )
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def openai_backend(vllm_server: VLLMServer, engine_loop: BackgroundLoop) -> Iterator[Any]:
    """The `openai` backend pointed at the session's vLLM server, living on `engine_loop`."""
    from scalecap.backends import create_backend

    backend = engine_loop.run(
        create_backend("openai", vllm_server.model, base_url=vllm_server.base_url, timeout=60.0)
    )
    yield backend
    engine_loop.run(backend.aclose(), timeout=30)
