"""A DataFlow serving (open-dataflow, DataFlow-MM) as a chain backend: text only, so yes/no mode.

DataFlow's VLM servings return generated text and nothing else: no token logprobs and no teacher
forcing. The chain therefore runs on them with `sentence_filter='yesno'`, rated from the answer's
text (yes 1.0, no -1.0); contrastive mode needs token scores and is refused with a clear error.

Which serving method is used, first match wins:
- `generate_from_input_messages(conversations, image_list, system_prompt)` (DataFlow-MM's
  VLMServingABC). Each turn carries both schemas DataFlow-MM uses: `role`/`content` and
  `from`/`value` with an `<image>` placeholder.
- `generate_from_input_one_image(image_paths, text_prompts, system_prompt)` for turns with an image
  and `generate_from_input_multi_images` with no image for text-only turns (open-dataflow's
  `APIVLMServing_openai` and `LocalVLMServing_vllm`).
- `generate_from_input(user_inputs, system_prompt)` for text-only turns (a DataFlow LLM serving).

Servings take image *paths*, so each image the chain loaded is written once as a PNG to a private
temporary folder (removed when the image is released or the backend closes). Servings are blocking
and not always thread-safe (vLLM's `LLM`), so one dispatcher calls the serving at a time in a worker
thread, merging whatever requests of concurrent images are waiting into one call. Generation limits
(max tokens, temperature) are the serving's own settings; token counts and `finish_reason` are unknown.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import itertools
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scalecap.backends.base import GenerateRequest, GenerateResult, ScoreRequest, ScoreResult
from scalecap.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from PIL.Image import Image

CONTRASTIVE_UNSUPPORTED = (
    "{name} is a DataFlow serving: it returns generated text only, without token scores, so "
    "sentence_filter='contrastive' cannot run on it. Use "
    "ImageScaleCaptionGenerateConfig(sentence_filter='yesno'), or pass a scalecap backend that "
    "scores tokens (the vllm backend, or the openai backend against a vLLM server)."
)

KNOWN_SERVINGS = {
    "APIVLMServing_openai": "dataflow.serving.api_vlm_serving_openai",
    "LocalVLMServing_vllm": "dataflow.serving.local_model_vlm_serving",
}
"""Module of each open-dataflow VLM serving, for loading one without `dataflow.serving`'s
`__init__`, which imports every serving's dependencies (torch, Google API clients...)."""

_Waiting = tuple[list[GenerateRequest], "asyncio.Future[list[GenerateResult]]"]
"""One caller's requests and the future its results go to."""

_SETTLE_TURNS = 8
"""Event-loop turns the dispatcher yields before taking a batch."""

DATAFLOW_MM_ERROR_PREFIX = "Error: "
"""DataFlow-MM's API serving returns a failed request as this text instead of raising."""


def serving_model_name(serving: Any) -> str:
    """A name for records: the serving's model, whichever attribute holds it."""
    for attr in ("model_name", "hf_model_name_or_path", "real_model_path", "model"):
        value = getattr(serving, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(serving).__name__


def load_serving_class(name: str) -> type:
    """A DataFlow serving class by name ('APIVLMServing_openai') or 'module:Class' path.

    open-dataflow's VLM servings are loaded from their own module file, without running
    `dataflow.serving`'s `__init__`: that imports every serving's dependencies (torch, Google API
    clients...), which the light install lacks and which cost seconds even where present.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load DataFlow serving {name!r}: {exc}") from exc
    module_name = KNOWN_SERVINGS.get(name)
    if module_name is None:
        try:
            return getattr(importlib.import_module("dataflow.serving"), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"unknown DataFlow serving {name!r}: {exc}") from exc
    if module_name not in sys.modules:
        import dataflow

        path = Path(dataflow.__file__).parent / "serving" / (module_name.rsplit(".", 1)[1] + ".py")
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot load {module_name} from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[module_name]
            raise
    return getattr(sys.modules[module_name], name)


class DataFlowServingBackend:
    """Wraps a DataFlow serving object. `owns_serving`: `aclose` calls its `cleanup()`."""

    supports_scoring = False

    def __init__(self, serving: Any, *, model_name: str | None = None, owns_serving: bool = False) -> None:
        self.serving = serving
        self.model_name = model_name or serving_model_name(serving)
        self.owns_serving = owns_serving
        self._pending: list[_Waiting] = []
        self._worker: asyncio.Task[None] | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="scalecap-dataflow-"))
        weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self._paths: dict[int, str] = {}
        self._paths_lock = threading.Lock()
        self._names = itertools.count()
        self._closed = False
        self.calls = 0
        """Serving calls made (each may carry the requests of several images)."""

    @classmethod
    async def create(
        cls, model: str, *, serving: str | type | None = None, **serving_options: Any
    ) -> DataFlowServingBackend:
        """Build the serving class (a name such as 'APIVLMServing_openai', or 'module:Class') with
        `model` as its model argument and `serving_options` as its other arguments."""
        if serving is None:
            raise ConfigError(
                "the dataflow backend needs serving='APIVLMServing_openai' (a DataFlow serving class "
                "name or 'module:Class') and that class's arguments; or pass a serving object to the operator"
            )
        serving_cls = load_serving_class(serving) if isinstance(serving, str) else serving
        params = inspect.signature(serving_cls).parameters
        for arg in ("model_name", "hf_model_name_or_path"):
            if arg in params:
                serving_options.setdefault(arg, model)
                break
        try:
            obj = await asyncio.to_thread(serving_cls, **serving_options)
        except TypeError as exc:
            raise ConfigError(f"{serving_cls.__name__}: {exc}") from exc
        return cls(obj, model_name=model, owns_serving=True)

    # --- Backend contract --------------------------------------------------------------------

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        if self._closed:
            raise BackendError(f"{self.model_name}: the DataFlow serving backend is closed")
        if not requests:
            return []
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[GenerateResult]] = loop.create_future()
        self._pending.append((list(requests), fut))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._dispatch())
        return await fut

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        raise BackendError(CONTRASTIVE_UNSUPPORTED.format(name=type(self.serving).__name__))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(BackendError("the DataFlow serving backend was closed"))
        self._pending.clear()
        if self.owns_serving and callable(getattr(self.serving, "cleanup", None)):
            await asyncio.to_thread(self.serving.cleanup)
        shutil.rmtree(self._tmp, ignore_errors=True)

    # --- dispatch ------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Serve what is waiting, one serving call at a time, until nothing is; `generate` starts
        a new dispatcher when the last one has returned."""
        while self._pending:
            # Let callers whose results were just set run up to their next request, so it joins
            # this call instead of the next one (a few loop turns: no wall-clock wait).
            for _ in range(_SETTLE_TURNS):
                await asyncio.sleep(0)
            batch = [(reqs, fut) for reqs, fut in self._pending if not fut.done()]
            self._pending.clear()
            if batch:
                await self._serve(batch)

    async def _serve(self, batch: list[_Waiting]) -> None:
        flat = [r for reqs, _ in batch for r in reqs]
        try:
            texts = await asyncio.to_thread(self._call, flat)
        except Exception as exc:
            if len(batch) > 1:
                # One caller's bad request must not fail the others: retry each caller alone.
                for reqs, fut in batch:
                    await self._serve([(reqs, fut)])
                return
            _, fut = batch[0]
            if not fut.done():
                fut.set_exception(_as_backend_error(exc, self.model_name))
            return
        i = 0
        for reqs, fut in batch:
            mine = texts[i : i + len(reqs)]
            i += len(reqs)
            if fut.done():
                continue
            bad = [t for t in mine if not isinstance(t, str) or t.startswith(DATAFLOW_MM_ERROR_PREFIX)]
            if bad:
                fut.set_exception(BackendError(f"{self.model_name}: the serving returned {bad[0]!r}"))
            else:
                fut.set_result([GenerateResult(text=t) for t in mine])  # token counts unknown

    def _call(self, requests: list[GenerateRequest]) -> list[Any]:
        """Blocking: every request through the serving, grouped by (has image, system prompt)."""
        self.calls += 1
        out: list[Any] = [None] * len(requests)
        groups: dict[tuple[bool, str], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.image is not None, r.system or ""), []).append(i)
        for (with_image, system), idx in groups.items():
            reqs = [requests[i] for i in idx]
            paths = [self._image_path(r.image) for r in reqs] if with_image else None
            texts = self._call_group(reqs, paths, system)
            if len(texts) != len(reqs):
                raise BackendError(f"{self.model_name}: {len(reqs)} requests, {len(texts)} replies")
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
        return out

    def _call_group(self, reqs: list[GenerateRequest], paths: list[str] | None, system: str) -> list[Any]:
        s = self.serving
        prompts = [r.prompt for r in reqs]
        if callable(getattr(s, "generate_from_input_messages", None)):
            convs = [
                [{"role": "user", "content": p, "from": "human", "value": f"<image>\n{p}" if paths else p}]
                for p in prompts
            ]
            kwargs: dict[str, Any] = {"conversations": convs}
            if paths:
                kwargs["image_list"] = [[path] for path in paths]
            if system:
                kwargs["system_prompt"] = system
            return list(s.generate_from_input_messages(**kwargs))
        if paths and callable(getattr(s, "generate_from_input_one_image", None)):
            return list(
                s.generate_from_input_one_image(image_paths=paths, text_prompts=prompts, system_prompt=system)
            )
        if not paths and callable(getattr(s, "generate_from_input_multi_images", None)):
            # APIVLMServing_openai sends system_prompt + user prompt as one text: keep them apart.
            return list(
                s.generate_from_input_multi_images(
                    list_of_image_paths=[[] for _ in prompts],
                    list_of_image_labels=[[] for _ in prompts],
                    user_prompts=prompts,
                    system_prompt=f"{system}\n\n" if system else "",
                )
            )
        if not paths and callable(getattr(s, "generate_from_input", None)):
            return list(s.generate_from_input(prompts, system_prompt=system))
        kind = "image" if paths else "text-only"
        raise BackendError(f"{type(s).__name__} has no method for {kind} requests")

    def _image_path(self, image: Image) -> str:
        """The image as a PNG in this backend's folder, written once per image object."""
        key = id(image)
        with self._paths_lock:
            path = self._paths.get(key)
            if path is not None:
                return path
            path = str(self._tmp / f"img-{next(self._names)}.png")
            (image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")).save(path, format="PNG")
            self._paths[key] = path
        weakref.finalize(image, self._forget, key, path)
        return path

    def _forget(self, key: int, path: str) -> None:
        with self._paths_lock:
            if self._paths.get(key) == path:
                del self._paths[key]
        Path(path).unlink(missing_ok=True)


def _as_backend_error(exc: BaseException, model: str) -> BackendError:
    if isinstance(exc, BackendError):
        return exc
    return BackendError(f"{model}: the DataFlow serving failed: {type(exc).__name__}: {exc}")
