"""GPU pinning: a worker sees only its GPUs, decided before torch or vLLM first load.

CUDA reads CUDA_VISIBLE_DEVICES once, when the driver initialises; torch and vLLM initialise it
on import or on first use. Pinning after that silently does nothing, so it is an error here.
"""

from __future__ import annotations

import os
import re
import sys

from scalecap.errors import ConfigError

_GPU_LIST = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")
_ENGINE_MODULES = ("torch", "vllm")


class GPUPinningError(ConfigError):
    """The GPUs cannot be pinned (bad list, or torch/vLLM already imported)."""


def parse_gpus(gpus: str) -> list[int]:
    if not _GPU_LIST.match(gpus):
        raise GPUPinningError(f"--gpus must be a comma-separated list of indices, got {gpus!r}")
    ids = [int(g) for g in gpus.split(",")]
    if len(set(ids)) != len(ids):
        raise GPUPinningError(f"--gpus lists a GPU twice: {gpus!r}")
    return ids


def pin_gpus(gpus: str | None, environ: dict[str, str] | None = None) -> list[int] | None:
    """Set CUDA_VISIBLE_DEVICES (and device order) for this process; None leaves it alone.

    Returns the pinned indices; vLLM's tensor_parallel_size should not exceed their count.
    """
    if gpus is None or gpus == "":
        return None
    ids = parse_gpus(gpus)
    loaded = [m for m in _ENGINE_MODULES if m in sys.modules]
    if loaded:
        raise GPUPinningError(
            f"cannot pin GPUs {gpus!r}: {', '.join(loaded)} already imported in this process; "
            "pin before importing the engine (scalecap worker does this first)"
        )
    env = os.environ if environ is None else environ
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
    return ids
