"""ScaleCap: dense, hallucination-filtered image captions from one VLM called many times.

The chain as a library (no Celery, no vLLM at import time) and a drop-in for the DataFlow operator.
"""

from scalecap.chain import ChainItem, ScaleCapChain
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.errors import (
    BackendError,
    ConfigError,
    ImageError,
    ScaleCapError,
    StageError,
)

__version__ = "0.1.0"

_LAZY = {
    "ImageScaleCaptionGenerate": "scalecap.dataflow.operator",
    "FileStorage": "scalecap.dataflow.storage",
}
"""Imported on first use: they load DataFlow when it is installed, which workers do not need."""


def __getattr__(name: str) -> object:  # PEP 562
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scalecap' has no attribute {name!r}")

__all__ = [
    "BackendError",
    "ChainItem",
    "ConfigError",
    "FileStorage",
    "ImageError",
    "ImageScaleCaptionGenerate",
    "ImageScaleCaptionGenerateConfig",
    "ScaleCapChain",
    "ScaleCapError",
    "StageError",
    "__version__",
]
