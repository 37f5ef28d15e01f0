"""DataFlow's base classes when the `dataflow` package (PyPI `open-dataflow`) imports, stand-ins if not.

The operator, the storage and the serving handle subclass these, so that inside a DataFlow
`PipelineABC` the operator is recorded at `compile()` (not run), its serving is found and cleaned
up, and the storage passes the pipeline's type check. Without DataFlow the package imports and
works on its own; `DATAFLOW_IMPORT_ERROR` says why DataFlow was not used.
"""

from __future__ import annotations

from typing import Any


class _OperatorStandIn:
    def __init__(self) -> None:
        pass


class _ServingStandIn:
    pass


class _StorageStandIn:
    pass


def _load() -> tuple[type, type, type, Any, str | None]:
    try:
        from dataflow.core import LLMServingABC, OperatorABC
        from dataflow.utils.registry import OPERATOR_REGISTRY
        from dataflow.utils.storage import DataFlowStorage
    except Exception as exc:  # not installed, or an install that cannot import (a broken dependency)
        return _OperatorStandIn, _ServingStandIn, _StorageStandIn, None, f"{type(exc).__name__}: {exc}"
    return OperatorABC, LLMServingABC, DataFlowStorage, OPERATOR_REGISTRY, None


OperatorBase, ServingBase, StorageBase, OPERATOR_REGISTRY, DATAFLOW_IMPORT_ERROR = _load()
HAVE_DATAFLOW = DATAFLOW_IMPORT_ERROR is None


def register_operator(cls: type) -> type:
    """Add `cls` to DataFlow's OPERATOR_REGISTRY (a no-op without DataFlow)."""
    if OPERATOR_REGISTRY is not None:
        OPERATOR_REGISTRY.register(cls)
    return cls


def is_dataflow_serving(obj: Any) -> bool:
    """A DataFlow serving object: an LLMServingABC, or anything with its generate methods."""
    if HAVE_DATAFLOW and isinstance(obj, ServingBase):
        return True
    return any(
        callable(getattr(obj, name, None))
        for name in ("generate_from_input_messages", "generate_from_input_one_image")
    )
