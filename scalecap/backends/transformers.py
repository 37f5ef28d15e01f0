"""Hugging Face transformers on CPU or one GPU: small models, no vLLM needed.

There is no continuous batching here: each `generate` call is split into padded batches of
requests with the same sampling settings, run in a worker thread (the event loop stays free), one
call at a time (an asyncio.Lock), because one model instance cannot run two forward passes at once.
torch and transformers are imported inside `create`.

Greedy generation can return each generated token's id and logprob (`token_scores`), and `score`
teacher-forces given ids, so the chain's one-pass rating works here too. With `raw_logits=True`
both return raw logits instead of logprobs (`score_values`), for score_mode 'logit_diff'.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

from scalecap.backends.base import (
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    TokenScore,
)
from scalecap.backends.chat import ChatRenderer
from scalecap.errors import BackendError, ConfigError


class TransformersBackend:
    supports_scoring = True
    supports_generation_logprobs = True

    def __init__(
        self,
        model: Any,
        processor: Any,
        renderer: ChatRenderer,
        *,
        model_name: str,
        device: str,
        max_batch_size: int,
        max_model_len: int,
        raw_logits: bool = False,
    ) -> None:
        self.model = model
        self.processor = processor
        self.renderer = renderer
        self.model_name = model_name
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.raw_logits = raw_logits
        self.score_values = "logits" if raw_logits else "logprobs"
        self._lock = asyncio.Lock()
        self._closed = False
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos = gen_eos if gen_eos is not None else renderer.tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._pad = renderer.tokenizer.pad_token_id
        if self._pad is None:
            self._pad = next(iter(self._eos), 0)

    @classmethod
    async def create(
        cls,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        raw_logits: bool = False,
        **unknown: Any,
    ) -> TransformersBackend:
        """Load the model and processor in a worker thread.

        device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N".
        dtype: "auto" (the checkpoint's dtype on CUDA, float32 on CPU), or a torch dtype name.
        max_model_len: longest prompt + completion accepted (default: the model's positions).
        raw_logits: token scores are raw logits, not logprobs (score_mode 'logit_diff').
        """
        if unknown:
            raise ConfigError(f"unknown transformers backend option(s): {', '.join(sorted(unknown))}")
        if max_batch_size < 1:
            raise ConfigError("max_batch_size must be >= 1")
        try:
            import torch
        except ImportError as exc:
            raise ConfigError(
                f"torch is not installed: {exc} (pip install 'scalecap-fleet[transformers]')"
            ) from exc
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            torch_dtype: Any = "auto" if device.startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, dtype, None)
            if not isinstance(torch_dtype, torch.dtype):
                raise ConfigError(f"unknown dtype {dtype!r}")

        def load() -> TransformersBackend:
            renderer = ChatRenderer.load(model, trust_remote_code=trust_remote_code)
            net = _load_model(model, torch_dtype, trust_remote_code).to(device).eval()
            processor = renderer.template_owner
            tok = renderer.tokenizer
            tok.padding_side = "left"
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            limit = max_model_len or _max_positions(net.config)
            return cls(
                net,
                processor,
                renderer,
                model_name=model,
                device=device,
                max_batch_size=max_batch_size,
                max_model_len=limit,
                raw_logits=raw_logits,
            )

        try:
            return await asyncio.to_thread(load)
        except ConfigError:
            raise
        except Exception as exc:
            raise BackendError(f"transformers failed to load {model!r}: {exc}") from exc

    # --- contract ------------------------------------------------------------------------

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        if not requests:
            return []
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.max_tokens, r.temperature, r.top_p, r.seed, r.top_logprobs, r.token_scores,
                   r.fit_context and r.image is None, r.repetition_penalty)
            groups.setdefault(key, []).append(i)
        results: list[GenerateResult | None] = [None] * len(requests)
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch_size):
                chunk = indices[start : start + self.max_batch_size]
                batch = [requests[i] for i in chunk]
                for i, res in zip(chunk, await self._run(self._generate_batch, batch), strict=True):
                    results[i] = res
        return [r for r in results if r is not None]

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []
        return [await self._run(self._score_one, r) for r in requests]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            self.model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    # --- work done in the worker thread --------------------------------------------------

    async def _run(self, fn: Any, arg: Any) -> Any:
        async with self._lock:
            if self._closed or self.model is None:
                raise BackendError("the transformers backend is closed")
            try:
                return await asyncio.to_thread(fn, arg)
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"transformers {fn.__name__} failed: {type(exc).__name__}: {exc}") from exc

    def _inputs(self, texts: list[str], images: list[Any]) -> Any:
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, "add_special_tokens": False}
        if images:
            if self.processor is self.renderer.tokenizer:
                raise BackendError(f"{self.model_name} has no image processor")
            kwargs["images"] = images
        return self.processor(text=texts, **kwargs).to(self.device)

    def _check_length(self, prompt_len: int, extra: int) -> None:
        if prompt_len + extra > self.max_model_len:
            raise BackendError(
                f"prompt of {prompt_len} tokens + {extra} exceeds max_model_len {self.max_model_len}"
            )

    def _generate_batch(self, batch: list[GenerateRequest]) -> list[GenerateResult]:
        import torch

        first = batch[0]
        texts = [
            self.renderer.render(r.prompt, system=r.system, has_image=r.image is not None) for r in batch
        ]
        inputs = self._inputs(texts, [r.image for r in batch if r.image is not None])
        prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
        max_new = first.max_tokens
        if first.fit_context and not any(r.image is not None for r in batch):
            max_new = min(max_new, self.max_model_len - int(inputs["input_ids"].shape[1]))
        self._check_length(max(prompt_lens), max(max_new, 1))
        sample = first.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": sample,
            "pad_token_id": self._pad,
            "return_dict_in_generate": True,
            "output_logits": first.top_logprobs > 0 or first.token_scores,
        }
        if first.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = first.repetition_penalty
        if sample:
            kwargs.update(temperature=first.temperature, top_p=first.top_p, top_k=0)
            if first.seed is not None:
                torch.manual_seed(first.seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
        logprobs = steps = None
        if first.top_logprobs > 0 or first.token_scores:
            raw = torch.stack(out.logits, dim=1).float()
            steps = raw if self.raw_logits else raw.log_softmax(dim=-1)
        if first.top_logprobs > 0 and steps is not None:
            logprobs = steps.topk(first.top_logprobs, dim=-1)
        results = []
        for row, (ids, plen) in enumerate(zip(new, prompt_lens, strict=True)):
            stop = next((j for j, t in enumerate(ids) if t in self._eos), None)
            kept = ids if stop is None else ids[: stop + 1]
            text_ids = kept if stop is None else kept[:-1]
            top = None
            if logprobs is not None:
                values, indices = logprobs.values[row].tolist(), logprobs.indices[row].tolist()
                top = [self._alternatives(values[j], indices[j]) for j in range(len(kept))]
            text = self.renderer.tokenizer.decode(text_ids, skip_special_tokens=True)
            tokens = ids_out = None
            if first.token_scores and steps is not None:
                ids_out = text_ids[: self.renderer.strip_special_tail(text_ids)]
                index = torch.tensor(ids_out, dtype=torch.long, device=steps.device).view(-1, 1)
                values = steps[row, : len(ids_out)].gather(1, index).view(-1)
                spans = self.renderer.spans_of_ids(ids_out, text)
                tokens = [
                    TokenScore(text[s:e], s, e, float(v))
                    for (s, e), v in zip(spans, values.tolist(), strict=True)
                ]
            results.append(
                GenerateResult(
                    text=text,
                    prompt_tokens=int(plen),
                    completion_tokens=len(kept),
                    top_logprobs=top,
                    finish_reason="length" if stop is None else "stop",
                    tokens=tokens,
                    token_ids=ids_out,
                )
            )
        return results

    def _alternatives(self, values: list[float], indices: list[int]) -> dict[str, float]:
        out: dict[str, float] = {}
        for lp, token_id in zip(values, indices, strict=True):
            text = self.renderer.decode_token(token_id)
            if text not in out or lp > out[text]:
                out[text] = float(lp)
        return out

    def _score_one(self, req: ScoreRequest) -> ScoreResult:
        import torch

        prefix = self.renderer.render(req.prompt, system=req.system, has_image=req.image is not None)
        cont_ids, spans = self.renderer.continuation_tokens(req.continuation, req.continuation_ids)
        if not cont_ids:
            return ScoreResult(tokens=[], prompt_tokens=0)
        inputs = self._inputs([prefix], [req.image] if req.image is not None else [])
        prefix_len = inputs["input_ids"].shape[1]
        self._check_length(prefix_len, len(cont_ids))
        cont = torch.tensor([cont_ids], dtype=inputs["input_ids"].dtype, device=self.device)
        for key, value in list(inputs.items()):
            # Per-token side inputs (attention mask, mm_token_type_ids) grow with the ids; the
            # continuation is plain text (type 0), attended everywhere.
            if key != "input_ids" and hasattr(value, "shape") and value.shape == (1, prefix_len):
                fill = 1 if key == "attention_mask" else 0
                inputs[key] = torch.cat([value, torch.full_like(cont, fill).to(value.dtype)], dim=1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
        with torch.inference_mode():
            logits = self.model(**inputs).logits[0]
        # Position p predicts token p + 1: the continuation's tokens are predicted from
        # prefix_len - 1 up to the second-to-last position.
        n = len(cont_ids)
        logprobs = logits[prefix_len - 1 : prefix_len - 1 + n].float()
        if not self.raw_logits:
            logprobs = logprobs.log_softmax(dim=-1)
        picked = logprobs.gather(1, cont.view(-1, 1).to(logprobs.device)).view(-1).tolist()
        tokens = []
        for lp, (start, end) in zip(picked, spans, strict=True):
            if not math.isfinite(lp):
                raise BackendError("non-finite logprob from the model")
            tokens.append(TokenScore(req.continuation[start:end], start, end, float(lp)))
        return ScoreResult(tokens=tokens, prompt_tokens=prefix_len)


def _load_model(model: str, torch_dtype: Any, trust_remote_code: bool) -> Any:
    """A vision-language model when the checkpoint is one, else a causal LM (text only)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    try:
        return AutoModelForImageTextToText.from_pretrained(model, **kwargs)
    except ValueError:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)


def _max_positions(config: Any) -> int:
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "max_position_embeddings", None) or 4096)
