"""Engines behind one contract (`Backend`). Heavy libraries are imported only when used."""

from __future__ import annotations

import importlib
from typing import Any

from scalecap.backends.base import (
    Backend,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    TokenScore,
)
from scalecap.errors import ConfigError

ALIASES = {
    "vllm": "scalecap.backends.vllm:VLLMBackend",
    "openai": "scalecap.backends.openai:OpenAIBackend",
    "transformers": "scalecap.backends.transformers:TransformersBackend",
    "dataflow": "scalecap.backends.dataflow_serving:DataFlowServingBackend",
}


def resolve_backend_class(name: str) -> type:
    """An alias (vllm, openai, transformers, dataflow) or a 'package.module:Class' path."""
    target = ALIASES.get(name, name)
    if ":" not in target:
        raise ConfigError(f"unknown backend {name!r}: use one of {sorted(ALIASES)} or 'module:Class'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = {"vllm": "worker", "transformers": "transformers"}.get(name)
        hint = f" (pip install 'scalecap-fleet[{extra}]')" if extra else ""
        raise ConfigError(f"backend {name!r} cannot be imported: {exc}{hint}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ConfigError(f"backend {target!r}: {module_name} has no {attr}") from exc


async def create_backend(name: str, model: str, **options: Any) -> Backend:
    """Build and start a backend inside the running event loop (engines bind to their loop).

    Every backend class implements `async create(model, **options)`; options a backend does not
    know are rejected by it with ConfigError.
    """
    cls = resolve_backend_class(name)
    return await cls.create(model, **options)


__all__ = [
    "ALIASES",
    "Backend",
    "GenerateRequest",
    "GenerateResult",
    "ScoreRequest",
    "ScoreResult",
    "TokenScore",
    "create_backend",
    "resolve_backend_class",
]
