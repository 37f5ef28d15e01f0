"""Build a ready chain from names: the VLM engine, the optional separate LLM, the limits.

Shared by the DataFlow operator, `scalecap caption`, benchmarks and workers so they all start
engines the same way. Must run inside the event loop that will use the engines.
"""

from __future__ import annotations

from typing import Any

from scalecap.backends import create_backend
from scalecap.backends.base import Backend
from scalecap.chain import ScaleCapChain
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.images import ImageLimits


async def create_llm(config: ImageScaleCaptionGenerateConfig) -> Backend | None:
    """The separate language model of steps 3 and 6, when the config names one."""
    if not config.llm_base_url:
        return None
    return await create_backend(
        "openai",
        config.llm_model or "default",
        base_url=config.llm_base_url,
        api_key=config.llm_api_key,
    )


async def build_chain(
    vlm: Backend | str,
    model: str | None = None,
    config: ImageScaleCaptionGenerateConfig | None = None,
    *,
    concurrency: int = 64,
    image_limits: ImageLimits | None = None,
    **engine_options: Any,
) -> ScaleCapChain:
    """A chain on an existing backend, or on a new one named by `vlm` (alias or module:Class)."""
    config = config or ImageScaleCaptionGenerateConfig()
    if isinstance(vlm, str):
        if not model:
            raise ValueError("a model is required to create a backend by name")
        vlm = await create_backend(vlm, model, **engine_options)
    llm = await create_llm(config)
    return ScaleCapChain(vlm, config, llm=llm, concurrency=concurrency, image_limits=image_limits)
