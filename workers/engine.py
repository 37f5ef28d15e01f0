"""Engine lifetime in a worker: one backend per process, shared by every job thread.

The worker runs Celery's thread pool (no fork after the engine exists). Each task thread hands
its chunk's image coroutines to one BackgroundLoop, where the backend lives (each cancelled at the
job timeout); the chains admit `concurrency` images at once and the engine batches across all of
them. The backend is created lazily, once,
under a lock; chains (cheap) are cached per config hash and all share that backend.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from scalecap.backends.base import Backend
from scalecap.chain import ChainItem, ScaleCapChain
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.images import ImageLimits
from scalecap.runtime import BackgroundLoop
from scalecap.settings import Settings
from workers import metrics

log = logging.getLogger(__name__)

class JobTimeout(Exception):
    """An image ran past SCALECAP_JOB_TIMEOUT; its coroutine was cancelled (retryable)."""


RETRYABLE_RECORD_ERRORS = frozenset({"BackendError", "RetryableBackendError"})
"""Error types in a record that mean the engine failed, not the image: worth another delivery."""


class EngineRuntime:
    """Backend + chains of one worker process (see module docstring)."""

    def __init__(
        self,
        backend: str,
        model: str,
        options: dict[str, Any] | None = None,
        *,
        settings: Settings,
        concurrency: int = 64,
    ) -> None:
        self.backend_name = backend
        self.model = model
        self.options = dict(options or {})
        self.settings = settings
        self.concurrency = concurrency
        self._lock = threading.Lock()
        self._loop: BackgroundLoop | None = None
        self._vlm: Backend | None = None
        self._chains: dict[str, ScaleCapChain] = {}

    @property
    def loop(self) -> BackgroundLoop:
        with self._lock:
            if self._loop is None:
                self._loop = BackgroundLoop(name="scalecap-engine")
            return self._loop

    def vlm(self) -> Backend:
        """The backend, created on first use (and only once, whichever thread asks first)."""
        if self._vlm is not None:
            return self._vlm
        loop = self.loop
        with self._lock:
            if self._vlm is None:
                from scalecap.backends import create_backend

                log.info("starting %s engine for %s", self.backend_name, self.model)
                t0 = time.monotonic()
                self._vlm = loop.run(create_backend(self.backend_name, self.model, **self.options))
                metrics.engine_started(self.model, self.backend_name, time.monotonic() - t0)
            return self._vlm

    def limits(self, config: ImageScaleCaptionGenerateConfig) -> ImageLimits:
        """The image limits of one config, never scaling (up or down) beyond the decode cap,
        whatever the config asks: a 2x2 PNG cannot be blown up to 150 Mpx."""
        cap = int(self.settings.max_decode_pixels)
        return ImageLimits.from_settings(
            self.settings, min_pixels=min(config.min_pixels, cap), max_pixels=min(config.max_pixels, cap)
        )

    def chain(self, config_json: str | dict[str, Any]) -> ScaleCapChain:
        """The chain for one batch config; cached, so a batch's jobs share one chain object."""
        data = json.loads(config_json) if isinstance(config_json, str) else config_json
        config = ImageScaleCaptionGenerateConfig.from_dict(data)
        if config.llm_base_url and not config.llm_api_key and self.settings.llm_api_key:
            config = config.replace(llm_api_key=self.settings.llm_api_key)  # keys stay out of Redis
        key = config.config_hash() + ":" + str(config.llm_base_url or "")
        chain = self._chains.get(key)
        if chain is not None:
            return chain
        vlm = self.vlm()
        with self._lock:
            chain = self._chains.get(key)
            if chain is None:
                from scalecap.backends.setup import create_llm

                llm = self._loop.run(create_llm(config)) if config.llm_base_url else None  # type: ignore[union-attr]
                chain = ScaleCapChain(
                    vlm, config, llm=llm, concurrency=self.concurrency, image_limits=self.limits(config)
                )
                self._chains[key] = chain
        return chain

    def caption_chunk(
        self, config_json: str | dict[str, Any], items: list[tuple[str, str]], timeout: float | None,
        *, watch: Callable[[Future[Any]], None] | None = None,
    ) -> list[dict[str, Any] | BaseException]:
        """Records of a chunk's (job_id, ref) images, run concurrently on the engine's loop.

        Each image's coroutine is cancelled after `timeout` seconds (JobTimeout in its place):
        a hung image cannot hold its message past the visibility timeout. An exception is
        returned in the image's place, so one image's failure touches no other. `watch` gets
        the run's future: cancelling it (a lost lease, workers/leases.py) cancels every image's
        coroutine, and this raises concurrent.futures.CancelledError."""
        chain = self.chain(config_json)

        async def one(job_id: str, ref: str) -> dict[str, Any]:
            # metrics.track: in flight (and the stall check) while on the engine's loop
            coro = metrics.track(chain.caption(ChainItem(source=ref, ref=ref, job_id=job_id)))
            if not timeout:
                return await coro
            try:
                return await asyncio.wait_for(coro, timeout)
            except TimeoutError as exc:
                raise JobTimeout(f"the image ran longer than the job timeout ({timeout:g} s)") from exc

        async def run() -> list[Any]:
            return await asyncio.gather(*(one(j, r) for j, r in items), return_exceptions=True)

        from scalecap.images.shards import attach_source  # a shard member's key and sidecars

        out: list[dict[str, Any] | BaseException] = []
        future = self.loop.submit(run())
        if watch is not None:
            watch(future)
        for (_, ref), record in zip(items, future.result(), strict=True):
            if isinstance(record, BaseException):
                out.append(record)
                continue
            metrics.observe_record(record)  # stage seconds, tokens, error type
            out.append(attach_source(record, ref, chain.image_limits))
        return out

    def rules(self) -> list[str] | None:
        """Rating rules this worker's engine can compute; None before the engine exists."""
        from scalecap.chain import rules_served

        return rules_served(self._vlm) if self._vlm is not None else None

    def close(self) -> None:
        with self._lock:
            vlm, self._vlm = self._vlm, None
            loop, self._loop = self._loop, None
            self._chains.clear()
        if loop is None:
            return
        if vlm is not None:
            try:
                loop.run(vlm.aclose(), timeout=60)
            except Exception as exc:  # shutting down: report, do not mask the exit
                log.warning("engine shutdown: %s", exc)
        loop.stop()


_runtime: EngineRuntime | None = None


def configure(runtime: EngineRuntime | None) -> None:
    """Install the process's runtime (the worker CLI does this before consuming)."""
    global _runtime
    _runtime = runtime


def get_runtime() -> EngineRuntime:
    if _runtime is None:
        raise RuntimeError(
            "this worker has no engine (an --io worker received a caption job?); "
            "start it with scalecap worker --backend ... --model ..."
        )
    return _runtime


def is_retryable_record(record: dict[str, Any]) -> bool:
    """An error record caused by the engine (not the image): the job should run again."""
    err = record.get("error") if isinstance(record, dict) else None
    return bool(err) and err.get("stage") != "load" and err.get("type") in RETRYABLE_RECORD_ERRORS
