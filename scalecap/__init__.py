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
from scalecap.operator import ImageScaleCaptionGenerate
from scalecap.storage import FileStorage

__version__ = "0.1.0"

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
