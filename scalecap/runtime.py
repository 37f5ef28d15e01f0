"""A long-lived event loop in a background thread.

Async engines (vLLM's AsyncLLM, an httpx client) belong to the loop they were created on. Sync
callers (the library, the DataFlow operator, `scalecap caption`, a Celery task thread) hand
coroutines to this one loop, so an engine is created once and reused across calls and threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self, name: str = "scalecap-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule `coro` on the loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and block this thread until it returns."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("BackgroundLoop.run() called from inside its own loop")
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


_default: BackgroundLoop | None = None
_lock = threading.Lock()


def default_loop() -> BackgroundLoop:
    """The process-wide loop shared by every sync entry point."""
    global _default
    with _lock:
        if _default is None or not _default.alive:
            _default = BackgroundLoop()
        return _default
