"""The ScaleCap chain over many images at once.

Each image is one coroutine that awaits the engine stage by stage. Many images' coroutines run on
one event loop, so the engine batches whatever is in flight and a fast image moves on while a slow
one is still answering. One image's failure becomes its error record and touches no other image.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scalecap.backends.base import score_values
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.errors import ConfigError, StageError
from scalecap.images import ImageLimits, load_image
from scalecap.record import base_meta, error_record, job_id, success_record
from scalecap.stages import answers, caption, fusion, golden, questions, second_filter
from scalecap.stages.context import ImageContext
from scalecap.templates import templates_for

if TYPE_CHECKING:
    from PIL.Image import Image

    from scalecap.backends.base import Backend

STAGES = (caption, golden, questions, answers, second_filter, fusion)
"""The chain, in order. Each module has NAME and `async run(ctx)`."""

ImageSource = Any  # str (path, file://, http(s)://, s3://, data:), Path, bytes or PIL Image


@dataclass
class ChainItem:
    """One image to caption: where it is, and the id its record is filed under."""

    source: ImageSource
    ref: str
    job_id: str | None = None


def rules_served(vlm: Backend) -> list[str]:
    """The rating rules a backend can compute: what a worker advertises for `scalecap submit`."""
    if not getattr(vlm, "supports_scoring", False):
        return ["yesno"]
    if score_values(vlm) == "logits":
        return ["logit_diff", "yesno"]
    return ["log_ratio", "prob_diff", "yesno"]


def check_backend(vlm: Backend, config: ImageScaleCaptionGenerateConfig) -> None:
    """Refuse a backend that cannot give what the config's rating needs, before any image runs."""
    name = type(vlm).__name__
    if config.sentence_filter != "contrastive":
        return  # yes/no compares two alternatives at one position: logprobs and raw logits both do
    if not getattr(vlm, "supports_scoring", False):
        raise ConfigError(f"backend {name} cannot score tokens; use sentence_filter='yesno'")
    values = score_values(vlm)
    if config.score_mode == "logit_diff" and values != "logits":
        raise ConfigError(
            f"score_mode 'logit_diff' needs raw logits, but backend {name} returns logprobs: start vLLM "
            "with logprobs_mode='raw_logits' (transformers: raw_logits=True), or use score_mode "
            "'log_ratio', its normalised form"
        )
    if config.score_mode != "logit_diff" and values == "logits":
        raise ConfigError(
            f"backend {name} returns raw logits (logprobs_mode='raw_logits'); score_mode "
            f"{config.score_mode!r} needs logprobs: use score_mode 'logit_diff' (preset 'authors') or "
            "sentence_filter 'yesno'"
        )


class ScaleCapChain:
    """Runs the six stages for any number of images on one backend (plus an optional LLM).

    `concurrency` bounds the images in flight; the engine sees every request of every image in
    flight, which is what keeps its continuous batching full.
    """

    def __init__(
        self,
        vlm: Backend,
        config: ImageScaleCaptionGenerateConfig | None = None,
        *,
        llm: Backend | None = None,
        concurrency: int = 64,
        image_limits: ImageLimits | None = None,
    ) -> None:
        self.vlm = vlm
        self.config = config or ImageScaleCaptionGenerateConfig()
        self.llm = llm or vlm
        self.concurrency = max(1, int(concurrency))
        self.image_limits = image_limits or ImageLimits(
            min_pixels=self.config.min_pixels, max_pixels=self.config.max_pixels
        )
        self.config_hash = self.config.config_hash()
        self.templates = templates_for(self.config)
        check_backend(vlm, self.config)

    def job_id_for(self, ref: str) -> str:
        return job_id(ref, self.config_hash)

    def _meta(self, jid: str | None) -> dict[str, Any]:
        meta = base_meta(
            job=jid,
            model=self.vlm.model_name,
            llm_model=getattr(self.llm, "model_name", None),
            config_hash=self.config_hash,
        )
        meta["preset"] = self.config.preset
        meta["rule"] = self.config.rule
        return meta

    async def caption_image(self, image: Image, *, ref: str = "", jid: str | None = None) -> dict[str, Any]:
        """The record of one already loaded image. Never raises for a per-image failure."""
        ctx = ImageContext(
            image=image,
            config=self.config,
            vlm=self.vlm,
            llm=self.llm,
            system=self.templates.system,
            text_system=self.templates.text_system,
            image_ref=ref,
            templates=self.templates,
        )
        try:
            for stage in STAGES:
                await stage.run(ctx)
        except StageError as exc:
            return error_record(exc.to_record(), self._meta(jid), ctx)
        return success_record(ctx, self._meta(jid))

    async def caption(self, item: ChainItem) -> dict[str, Any]:
        """Load one image and caption it; a load failure is an error record of stage 'load'."""
        jid = item.job_id if item.job_id is not None else self.job_id_for(item.ref)
        t0 = time.perf_counter()
        try:
            image = await asyncio.to_thread(load_image, item.source, limits=self.image_limits)
        except Exception as exc:
            meta = self._meta(jid)
            meta["stage_seconds"] = {"load": round(time.perf_counter() - t0, 4)}
            return error_record(StageError("load", exc, item.ref).to_record(), meta)
        load_seconds = round(time.perf_counter() - t0, 4)
        record = await self.caption_image(image, ref=item.ref, jid=jid)
        record["meta"].setdefault("stage_seconds", {})["load"] = load_seconds
        return record

    async def stream(self, items: Iterable[ChainItem]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """Caption items with up to `concurrency` in flight; yield (index, record) as each ends.

        Items are pulled from `items` lazily, so an endless or huge iterable streams in constant
        memory.
        """
        it = iter(enumerate(items))
        pending: set[asyncio.Task] = set()

        async def one(i: int, item: ChainItem) -> tuple[int, dict[str, Any]]:
            return i, await self.caption(item)

        def refill() -> None:
            while len(pending) < self.concurrency:
                try:
                    i, item = next(it)
                except StopIteration:
                    return
                pending.add(asyncio.ensure_future(one(i, item)))

        refill()
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    pending.discard(task)
                    yield task.result()
                refill()
        finally:
            for task in pending:
                task.cancel()

    async def caption_many(
        self,
        items: Sequence[ChainItem],
        on_result: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Records of every item, in input order."""
        out: list[dict[str, Any] | None] = [None] * len(items)
        async for i, record in self.stream(items):
            out[i] = record
            if on_result is not None:
                on_result(i, record)
        return out  # type: ignore[return-value]
