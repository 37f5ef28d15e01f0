"""Shared test set-up. Fixture families live in their own modules, registered here."""

from __future__ import annotations

import os

# The real vLLM engine on CPU, fast and offline (../shared/notes/vllm-on-cpu.md). Set before any
# test module imports vllm or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures_engines",
    "tests.fixtures_services",
    "tests.fixtures_openai",
    "tests.fleet_support",
    "tests.api_support",
]
