"""Our engines seen as a DataFlow serving, so a DataFlow pipeline can find and release them.

A DataFlow `PipelineABC` looks through each operator's attributes for an `LLMServingABC` and calls
its `cleanup()` once the last step using it has run (or before another serving takes over). The
operator keeps one of these handles as `vlm_serving`; `cleanup()` closes the chain's engines. One
handle per backend object: operators given the same backend share it, so the pipeline counts both
and releases the engine after the last of them.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

from scalecap.backends.base import Backend, GenerateRequest
from scalecap.dataflow.compat import ServingBase
from scalecap.runtime import BackgroundLoop


class BackendServing(ServingBase):  # type: ignore[misc, valid-type]
    """A DataFlow `LLMServingABC` over scalecap backends running on `loop`."""

    def __init__(self, backends: list[Backend], loop: BackgroundLoop) -> None:
        self.backends = backends
        self.loop = loop
        self.closed = False
        self.cleanups = 0
        """How many times cleanup() released the engines (a pipeline calls it once per forward)."""
        self.reopen: Callable[[], list[Backend]] | None = None
        """Set by an operator that can start its engines again after a cleanup."""

    @property
    def model_name(self) -> str:
        return self.backends[0].model_name

    def add(self, backend: Backend) -> None:
        if all(backend is not b for b in self.backends):
            self.backends.append(backend)

    # --- DataFlow's LLMServingABC ------------------------------------------------------------

    def start_serving(self) -> None:
        """Start the engines again after a cleanup, when they were built from a model name."""
        if not self.closed:
            return
        if self.reopen is None:
            raise RuntimeError(
                f"the serving {self.model_name!r} was cleaned up (DataFlow's pipeline releases a "
                "serving after its last step) and was passed in as an engine object, which cannot "
                "be started again: pass a model name or spec dict to restart it on demand"
            )
        self.backends = self.reopen()
        self.closed = False

    def generate_from_input(
        self, user_inputs: list[str], system_prompt: str = "", max_tokens: int = 1024
    ) -> list[str]:
        """Text-only generation on the VLM, for other DataFlow operators sharing this engine."""
        self.start_serving()
        system = system_prompt or None
        reqs = [GenerateRequest(prompt=u, system=system, max_tokens=max_tokens) for u in user_inputs]
        return [r.text for r in self.loop.run(self.backends[0].generate(reqs))]

    def cleanup(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.cleanups += 1
        for backend in self.backends:
            self.loop.run(backend.aclose())


_handles: weakref.WeakValueDictionary[int, BackendServing] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def serving_for(backend: Backend, loop: BackgroundLoop) -> BackendServing:
    """The one handle of `backend` while any operator holds it (a handle keeps its backend alive,
    so the id cannot be reused meanwhile)."""
    with _lock:
        handle = _handles.get(id(backend))
        if handle is None or not handle.backends or handle.backends[0] is not backend:
            handle = BackendServing([backend], loop)
            _handles[id(backend)] = handle
        return handle
