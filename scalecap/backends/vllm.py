"""vLLM's async engine in process: every request in flight is batched by the engine.

`generate` and `score` submit all their requests at once and await them together, and many
images' coroutines call them concurrently, so the engine's continuous batching sees everything in
flight. vLLM is imported inside `create`, never at module import (the producer side has no vLLM).

Generation can return each sampled token's id and logprob (`logprobs=0`), which under greedy
decoding equal teacher forcing of the same ids; `score` can teacher-force given ids. Together they
let the chain rate generated text with one (text-only) pass. An engine started with
`logprobs_mode="raw_logits"` returns raw logits in both places instead (`score_values`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import uuid
from collections.abc import Sequence
from typing import Any

from scalecap.backends import vllm_compat as compat
from scalecap.backends.base import (
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    TokenScore,
    gather_or_cancel,
)
from scalecap.backends.chat import ChatRenderer
from scalecap.errors import BackendError, ConfigError

LOGIT_MODES = ("raw_logits", "processed_logits")


class VLLMBackend:
    """One `vllm.v1.engine.async_llm.AsyncLLM` bound to the event loop it was created on."""

    supports_scoring = True
    supports_generation_logprobs = True

    def __init__(self, engine: Any, renderer: ChatRenderer, model_name: str, modules: Any) -> None:
        self.engine = engine
        self.renderer = renderer
        self.model_name = model_name
        config = getattr(engine, "model_config", None)
        self.max_model_len: int | None = getattr(config, "max_model_len", None)
        mode = str(getattr(config, "logprobs_mode", "raw_logprobs"))
        self.score_values = "logits" if mode in LOGIT_MODES else "logprobs"
        """What token scores hold: logprobs, or raw logits under logprobs_mode='raw_logits'."""
        self._vllm = modules
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._closed = False
        # One output per request, not one per step: we only read the last.
        self._final_only = compat.final_only(modules)

    @classmethod
    async def create(
        cls,
        model: str,
        *,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        max_num_seqs: int = 256,
        dtype: str = "auto",
        enforce_eager: bool = False,
        limit_mm_per_prompt: dict[str, int] | None = None,
        enable_prefix_caching: bool = True,
        trust_remote_code: bool = False,
        load_format: str = "auto",
        seed: int = 0,
        **extra_engine_args: Any,
    ) -> VLLMBackend:
        """Start the engine on the running loop (it binds to it). Blocks the loop while loading.

        `extra_engine_args` go to `AsyncEngineArgs` unchanged; names the installed vLLM does not
        have raise ConfigError, so a typo in a worker's config fails at start, not silently.
        Release differences (0.24 to 0.32) are handled in `vllm_compat`.
        """
        try:
            import vllm
            import vllm.sampling_params
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ConfigError(f"vllm is not installed: {exc} (pip install 'scalecap-fleet[worker]')") from exc

        compat.check_version(vllm.__version__)
        options: dict[str, Any] = dict(
            model=model,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=max_num_seqs,
            dtype=dtype,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            load_format=load_format,
            seed=seed,
            **extra_engine_args,
        )
        if limit_mm_per_prompt is not None:
            options["limit_mm_per_prompt"] = limit_mm_per_prompt
        compat.engine_options(AsyncEngineArgs, vllm.__version__, options)
        try:
            args = AsyncEngineArgs(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid vLLM engine options: {exc}") from exc

        renderer = await asyncio.to_thread(ChatRenderer.load, model, trust_remote_code=trust_remote_code)
        try:
            # Created on this loop's thread: the engine's client and output task belong to it.
            engine = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise BackendError(f"vLLM engine failed to start for {model!r}: {exc}") from exc
        return cls(engine, renderer, model_name=model, modules=vllm)

    # --- helpers -------------------------------------------------------------------------

    def _request_id(self) -> str:
        return f"scalecap-{self._prefix}-{next(self._ids)}"

    async def _final(self, prompt: dict[str, Any], params: Any) -> Any:
        """Run one request to completion and return its last RequestOutput."""
        if self._closed:
            raise BackendError("the vLLM backend is closed")
        last = None
        try:
            async for out in self.engine.generate(prompt, params, request_id=self._request_id()):
                last = out
        except asyncio.CancelledError:
            raise
        except BackendError:
            raise
        except Exception as exc:
            cause = compat.request_error(exc)
            raise BackendError(f"vLLM request failed: {type(cause).__name__}: {cause}") from exc
        if last is None:
            raise BackendError("vLLM returned no output")
        return last

    # --- contract ------------------------------------------------------------------------

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        if not requests:
            return []
        return await gather_or_cancel([self._generate_one(r) for r in requests])

    async def _generate_one(self, req: GenerateRequest) -> GenerateResult:
        text = self.renderer.render(req.prompt, system=req.system, has_image=req.image is not None)
        prompt: dict[str, Any] = {"prompt": text}
        max_tokens = req.max_tokens
        if req.image is not None:
            prompt["multi_modal_data"] = {"image": req.image}
        elif req.fit_context and self.max_model_len:
            # A text-only prompt can be counted here; leave room for at least one new token.
            ids = self.renderer.encode_prefix(text)
            prompt = {"prompt_token_ids": ids}
            room = self.max_model_len - len(ids)
            if room < 1:
                raise BackendError(f"prompt of {len(ids)} tokens fills the context ({self.max_model_len})")
            max_tokens = min(max_tokens, room)
        logprobs = req.top_logprobs or None
        if req.token_scores:
            logprobs = req.top_logprobs  # 0: only the sampled token's own score
        try:
            params = self._vllm.SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                repetition_penalty=req.repetition_penalty,
                logprobs=logprobs,
                output_kind=self._final_only,
            )
        except ValueError as exc:
            raise BackendError(f"invalid sampling parameters: {exc}") from exc
        out = await self._final(prompt, params)
        completion = out.outputs[0]
        top: list[dict[str, float]] | None = None
        if req.top_logprobs and completion.logprobs is not None:
            top = [_by_text(position, self.renderer) for position in completion.logprobs]
        tokens = ids = None
        if req.token_scores:
            tokens, ids = self._sampled_scores(completion)
        return GenerateResult(
            text=completion.text,
            prompt_tokens=len(out.prompt_token_ids or ()),
            completion_tokens=len(completion.token_ids),
            top_logprobs=top,
            finish_reason=completion.finish_reason,
            tokens=tokens,
            token_ids=ids,
        )

    def _sampled_scores(self, completion: Any) -> tuple[list[TokenScore], list[int]]:
        """Each generated token's own score, spans over the text; the end-of-turn token left out."""
        ids = list(completion.token_ids)
        positions = list(completion.logprobs or ())
        if len(positions) != len(ids):
            raise BackendError(f"vLLM returned {len(positions)} logprob entries for {len(ids)} tokens")
        ids = ids[: self.renderer.strip_special_tail(ids)]
        spans = self.renderer.spans_of_ids(ids, completion.text)
        tokens = []
        for token_id, entry, (start, end) in zip(ids, positions, spans, strict=False):
            value = entry[token_id].logprob if entry and token_id in entry else None
            if value is None or math.isnan(value):
                raise BackendError(f"vLLM gave no logprob for generated token {token_id}")
            tokens.append(TokenScore(completion.text[start:end], start, end, float(value)))
        return tokens, ids

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []
        return await gather_or_cancel([self._score_one(r) for r in requests])

    async def _score_one(self, req: ScoreRequest) -> ScoreResult:
        prefix = self.renderer.render(req.prompt, system=req.system, has_image=req.image is not None)
        cont_ids, spans = self.renderer.continuation_tokens(req.continuation, req.continuation_ids)
        if not cont_ids:
            return ScoreResult(tokens=[], prompt_tokens=0)
        prompt: dict[str, Any] = {"prompt_token_ids": self.renderer.encode_prefix(prefix) + cont_ids}
        if req.image is not None:
            prompt["multi_modal_data"] = {"image": req.image}
        params = self._vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, output_kind=self._final_only
        )
        out = await self._final(prompt, params)
        ids = list(out.prompt_token_ids or ())
        entries = list(out.prompt_logprobs or ())
        n = len(cont_ids)
        # The image pad expands inside the engine, so align from the end.
        if len(ids) < n + 1 or len(entries) != len(ids) or ids[-n:] != cont_ids:
            raise BackendError("vLLM prompt logprobs do not line up with the continuation tokens")
        tokens: list[TokenScore] = []
        for token_id, entry, (start, end) in zip(cont_ids, entries[-n:], spans, strict=True):
            logprob = entry[token_id].logprob if entry and token_id in entry else None
            if logprob is None or math.isnan(logprob):
                raise BackendError(f"vLLM gave no prompt logprob for token {token_id}")
            tokens.append(TokenScore(req.continuation[start:end], start, end, float(logprob)))
        return ScoreResult(tokens=tokens, prompt_tokens=len(ids) - n)

    async def reset_caches(self) -> None:
        """Forget cached prefixes, image encodings and processed images (for fair benchmarks)."""
        if self.engine is not None:
            await compat.reset_caches(self.engine)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
            # Tracebacks of failed requests can keep the engine alive until interpreter exit,
            # where its __del__ calls shutdown() again on a half-torn-down interpreter and
            # prints a spurious TypeError. It is shut down: make the second call a no-op.
            engine.shutdown = _already_shut_down


def _already_shut_down(timeout: float | None = None) -> None:
    return None


def _by_text(position: Any, renderer: ChatRenderer) -> dict[str, float]:
    """{decoded token: logprob} of one position; tokens decoding to the same text keep the max."""
    alternatives: dict[str, float] = {}
    for token_id, lp in (position or {}).items():
        text = lp.decoded_token if lp.decoded_token is not None else renderer.decode_token(token_id)
        if text not in alternatives or lp.logprob > alternatives[text]:
            alternatives[text] = float(lp.logprob)
    return alternatives
