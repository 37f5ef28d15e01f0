"""Any OpenAI-compatible chat server (vLLM's server, SGLang, a hosted API) over plain HTTP.

`generate` works with every such server. `score` (teacher forcing, the contrastive filter) needs
two vLLM extensions: `prompt_logprobs` on /v1/chat/completions and the /tokenize endpoint at the
server root. Against another server `score` raises BackendError and `supports_scoring` turns
False; use `sentence_filter='yesno'` there, which only needs `logprobs`/`top_logprobs`.

On vLLM's server (its /v1/models says `owned_by: vllm`) scoring takes one pass: a generation
returns its tokens' logprobs and ids (`return_token_ids`), which are the with-image side, and
the ids are teacher-forced without the image in one /v1/completions request after the chat
prefix (tokenised once per prompt). Fusion budgets (`fit_context`) are clamped to the
`max_model_len` that /v1/models reports.

Every request of a call goes out at once (the server batches what is in flight), bounded by one
semaphore shared by all calls on this backend. What scalecap.retry calls temporary (429, 5xx,
timeouts, dropped connections) is retried with its backoff, honouring Retry-After; other 4xx
fail at once with the server's own message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx

from scalecap.backends import openai_wire as wire
from scalecap.backends.base import (
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    gather_or_cancel,
)
from scalecap.errors import BackendError, ConfigError, RetryableBackendError
from scalecap.retry import backoff, is_temporary_error, is_temporary_status, retry_after

log = logging.getLogger(__name__)
_server_root = wire.server_root

PREFIX_CACHE = 1024
"""Chat prefixes (system + prompt) whose token ids are kept for one-pass scoring."""
MAX_RETRY_AFTER = 60.0
"""Seconds: a Retry-After longer than this is capped (a server asking for an hour is broken)."""
_sleep = asyncio.sleep
"""Indirection so tests can record the backoff waits instead of sleeping them."""


class ScoringUnsupported(BackendError):
    """The server cannot return prompt logprobs or token counts (not vLLM)."""


class OpenAIBackend:
    """Chat completions against `base_url` (for example http://host:8000/v1)."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        client: httpx.AsyncClient,
        max_concurrency: int,
        max_retries: int,
        image_format: str,
        backoff_base: float,
        backoff_max: float,
    ) -> None:
        self.model_name = model
        self.base_url = base_url.rstrip("/")
        self.server_root = wire.server_root(self.base_url)
        self.supports_scoring = True
        """Optimistic until the first `score` call finds the server lacks vLLM's extensions."""
        self.supports_generation_logprobs = False
        """True on vLLM's server (found by `create`): one-pass scoring, see the module docstring."""
        self.max_model_len: int | None = None
        """The server's context, from /v1/models (vLLM reports it): fusion budgets fit in it."""
        self._prefixes: dict[tuple[str | None, str], asyncio.Future[list[int]]] = {}
        self.max_retries = max_retries
        self.image_format = image_format
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._client = client
        self._sem = asyncio.Semaphore(max_concurrency)
        self._closed = False
        self._warned_alignment = False

    @classmethod
    async def create(
        cls,
        model: str,
        *,
        base_url: str,
        api_key: str | None = None,
        max_concurrency: int = 64,
        timeout: float = 120.0,
        max_retries: int = 4,
        image_format: str = "JPEG",
        backoff_base: float = 0.5,
        backoff_max: float = 20.0,
        probe_scoring: bool = False,
        server_info: bool = True,
        **unknown: Any,
    ) -> OpenAIBackend:
        """Open a client. An empty `model` takes the first model the server lists.

        server_info reads /v1/models once: the context (`max_model_len`) and whether vLLM serves
        the model (then scoring takes one pass).

        timeout is seconds per HTTP request; backoff_base/backoff_max are seconds (the n-th retry
        waits up to backoff_base * 2**(n-1), full jitter, at most backoff_max; a Retry-After
        wins, up to MAX_RETRY_AFTER).
        probe_scoring sends one tiny teacher-forcing request now, so a server without vLLM's
        extensions is known up front (`supports_scoring` False) instead of at the first image.
        """
        if unknown:
            raise ConfigError(f"openai backend: unknown options {sorted(unknown)}")
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"openai backend: base_url must be an http(s) URL, got {base_url!r}")
        fmt = image_format.upper()
        if fmt not in wire.IMAGE_FORMATS:
            raise ConfigError(f"openai backend: image_format must be JPEG or PNG, got {image_format!r}")
        if int(max_concurrency) < 1 or int(max_retries) < 0 or float(timeout) <= 0:
            raise ConfigError("openai backend: max_concurrency >= 1, max_retries >= 0, timeout > 0")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Scoring sends a tokenize request beside each chat request: room for both.
        limits = httpx.Limits(
            max_connections=2 * int(max_concurrency), max_keepalive_connections=int(max_concurrency)
        )
        client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(float(timeout), connect=min(10.0, float(timeout))),
            limits=limits,
        )
        backend = cls(
            model,
            base_url=base_url,
            client=client,
            max_concurrency=int(max_concurrency),
            max_retries=int(max_retries),
            image_format=fmt,
            backoff_base=float(backoff_base),
            backoff_max=float(backoff_max),
        )
        if not model or server_info:
            try:
                await backend._read_server_info(required=not model)
            except BaseException:
                await backend.aclose()
                raise
        if probe_scoring:
            try:
                await backend.score([ScoreRequest(prompt="Say ok.", continuation="ok")])
            except ScoringUnsupported:
                pass  # supports_scoring is now False
            except BackendError as exc:  # server busy or down: find out at the first image instead
                log.warning("openai backend: scoring probe failed (%s); assuming it can score", exc)
        return backend

    # --- the contract ----------------------------------------------------------------------

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        images = wire.ImageCache(self.image_format)
        return await gather_or_cancel([self._generate_one(r, images) for r in requests])

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        if not self.supports_scoring:
            raise self._unsupported("an earlier request found it lacking")
        images = wire.ImageCache(self.image_format)
        return await gather_or_cancel([self._score_one(r, images) for r in requests])

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._client.aclose()

    # --- one request ---------------------------------------------------------------------------

    async def _generate_one(self, req: GenerateRequest, images: wire.ImageCache) -> GenerateResult:
        messages = wire.messages(req.system, await images.part(req.image), req.prompt)
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": await self._budget(req, messages),
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.repetition_penalty != 1.0:  # a vLLM extension: sent only when asked for
            body["repetition_penalty"] = req.repetition_penalty
        own_scores = req.token_scores and self.supports_generation_logprobs
        if req.top_logprobs > 0 or own_scores:
            body["logprobs"] = True
            body["top_logprobs"] = req.top_logprobs
        if own_scores:
            body["return_token_ids"] = True
        data = await self._post(f"{self.base_url}/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BackendError(f"malformed chat completion from {self.base_url}: {data!r:.300}") from exc
        usage = data.get("usage") or {}
        top = None
        if req.top_logprobs > 0:
            content = (choice.get("logprobs") or {}).get("content") or []
            top = [wire.top_dict(entry) for entry in content]
        scored = wire.generated_scores(choice, text) if own_scores else None
        return GenerateResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            top_logprobs=top,
            finish_reason=choice.get("finish_reason"),
            tokens=scored[0] if scored else None,
            token_ids=scored[1] if scored else None,
        )

    async def _budget(self, req: GenerateRequest, messages: list[dict[str, Any]]) -> int:
        """max_tokens, lowered for `fit_context` to what the server's context leaves after the
        prompt (counted by /tokenize only when a prompt could come near the limit)."""
        limit = self.max_model_len
        if not (req.fit_context and limit and req.image is None):
            return req.max_tokens
        chars = len(req.prompt) + len(req.system or "")
        if chars + 64 + req.max_tokens <= limit:  # a text token is at least one character
            return req.max_tokens
        body = {"model": self.model_name, "messages": messages, "add_generation_prompt": True}
        count = (await self._post(f"{self.server_root}/tokenize", body)).get("count")
        if not isinstance(count, int):
            return req.max_tokens
        if count >= limit:
            raise BackendError(f"prompt of {count} tokens fills the context ({limit})")
        return min(req.max_tokens, limit - count)

    async def _score_one(self, req: ScoreRequest, images: wire.ImageCache) -> ScoreResult:
        if not req.continuation:
            return ScoreResult(tokens=[], prompt_tokens=0)
        if req.continuation_ids is not None and req.image is None and self.supports_generation_logprobs:
            return await self._score_ids(req, req.continuation_ids)
        messages = wire.messages(req.system, await images.part(req.image), req.prompt)
        messages.append({"role": "assistant", "content": req.continuation})
        body = {
            "model": self.model_name,
            "messages": messages,
            "add_generation_prompt": False,
            "continue_final_message": True,
            "prompt_logprobs": 0,
            "return_token_ids": True,
            "max_tokens": 1,
            "temperature": 0.0,
        }
        (n_tokens, token_ids), data = await asyncio.gather(
            self._count_tokens(req.continuation),
            self._post(f"{self.base_url}/chat/completions", body, scoring=True),
        )
        entries = data.get("prompt_logprobs")
        if not isinstance(entries, list):
            raise self._unsupported("its chat completions carry no prompt_logprobs")
        if n_tokens > len(entries) - 1:
            raise BackendError(f"continuation has {n_tokens} tokens but the prompt only {len(entries)}")
        ids = data.get("prompt_token_ids") or []
        tail_ids = ids[-n_tokens:] if len(ids) == len(entries) else [None] * n_tokens
        if token_ids and ids and tail_ids != token_ids and not self._warned_alignment:
            # The template merged a token across the assistant header and the continuation.
            self._warned_alignment = True
            log.warning(
                "%s: continuation tokenised alone differs from the teacher-forced prompt's tail; "
                "token scores near its start may be shifted",
                self.model_name,
            )
        tokens = wire.scored_tail(entries, ids, n_tokens, req.continuation)
        usage = data.get("usage") or {}
        return ScoreResult(tokens=tokens, prompt_tokens=int(usage.get("prompt_tokens") or len(entries)))

    async def _score_ids(self, req: ScoreRequest, cont_ids: list[int]) -> ScoreResult:
        """Teacher-force generated ids after the text-only chat prefix: one /v1/completions
        request, so the tokens are exactly the generated ones (no re-tokenising of the text)."""
        if not cont_ids:
            return ScoreResult(tokens=[], prompt_tokens=0)
        prefix = await self._prefix_ids(req.system, req.prompt)
        body = {
            "model": self.model_name,
            "prompt": prefix + list(cont_ids),
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
        }
        data = await self._post(f"{self.base_url}/completions", body, scoring=True)
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"malformed completion from {self.base_url}: {data!r:.300}") from exc
        entries = choice.get("prompt_logprobs") or data.get("prompt_logprobs")
        n = len(cont_ids)
        if not isinstance(entries, list) or len(entries) != len(prefix) + n:
            raise self._unsupported("its completions carry no prompt_logprobs for the prompt ids")
        tokens = wire.scored_tail(entries, body["prompt"], n, req.continuation)
        return ScoreResult(tokens=tokens, prompt_tokens=len(prefix))

    async def _prefix_ids(self, system: str | None, prompt: str) -> list[int]:
        """Token ids of the chat up to the assistant's turn (as generation saw it); tokenised once
        per (system, prompt), however many texts under it are scored at once."""
        key = (system, prompt)
        task = self._prefixes.get(key)
        if task is None:
            if len(self._prefixes) >= PREFIX_CACHE:
                self._prefixes.pop(next(iter(self._prefixes)))
            task = self._prefixes[key] = asyncio.ensure_future(self._tokenize_chat(system, prompt))
        try:
            return await asyncio.shield(task)
        except BaseException:
            if task.done() and self._prefixes.get(key) is task:
                del self._prefixes[key]  # a failure is not cached
            raise

    async def _tokenize_chat(self, system: str | None, prompt: str) -> list[int]:
        body = {"model": self.model_name, "messages": wire.messages(system, None, prompt),
                "add_generation_prompt": True}
        ids = (await self._post(f"{self.server_root}/tokenize", body, scoring=True)).get("tokens")
        if not isinstance(ids, list) or not ids:
            raise self._unsupported("/tokenize returned no tokens for a chat")
        return ids

    async def _count_tokens(self, text: str) -> tuple[int, list[int]]:
        """Token count and ids of `text` alone, from vLLM's /tokenize (at the server root)."""
        body = {"model": self.model_name, "prompt": text, "add_special_tokens": False}
        data = await self._post(f"{self.server_root}/tokenize", body, scoring=True)
        tokens = data.get("tokens")
        tokens = tokens if isinstance(tokens, list) else []
        count = data.get("count")
        if not isinstance(count, int):
            if not tokens:
                raise self._unsupported("/tokenize returned no token count")
            count = len(tokens)
        return count, tokens

    async def _read_server_info(self, *, required: bool) -> None:
        """The served name (when none was given), the context and vLLM or not, from /v1/models.

        Only `required` (no model name given) makes a failure fatal: other servers may lack it."""
        try:
            data = await self._request("GET", f"{self.base_url}/models", None)
        except (BackendError, _Rejected) as exc:
            if required:
                raise BackendError(f"{self.base_url}/models: {exc}") from exc
            return
        info = wire.server_info(data, self.model_name)
        if required:
            if not info.model:
                raise BackendError(f"{self.base_url}/models lists no model: {data!r:.300}")
            self.model_name = info.model
        self.max_model_len = info.max_model_len
        self.supports_generation_logprobs = info.vllm

    def _unsupported(self, why: str) -> ScoringUnsupported:
        self.supports_scoring = False
        return ScoringUnsupported(
            f"server at {self.base_url} cannot score tokens ({why}): contrastive rating needs a "
            "vLLM server (prompt_logprobs and /tokenize); use sentence_filter='yesno' instead"
        )

    # --- HTTP with retries -------------------------------------------------------------------

    async def _post(self, url: str, body: dict[str, Any], *, scoring: bool = False) -> dict[str, Any]:
        try:
            return await self._request("POST", url, body)
        except _Rejected as exc:
            if scoring and wire.looks_unsupported(exc.status, exc.message, url.endswith("/tokenize")):
                raise self._unsupported(f"HTTP {exc.status}: {exc.message}") from exc
            raise BackendError(f"HTTP {exc.status} from {url}: {exc.message}") from None

    async def _request(self, method: str, url: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """One JSON request, retried on overload and dropped connections."""
        if self._closed:
            raise BackendError("openai backend is closed")
        attempt = 0
        while True:
            wait: float | None = None
            try:
                async with self._sem:
                    resp = await self._client.request(method, url, json=body)
                    content = resp.content
            except httpx.TransportError as exc:
                if not is_temporary_error(exc):  # a bad URL or protocol: no retry mends it
                    raise BackendError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from exc
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError as exc:
                        raise BackendError(f"non-JSON answer from {url}: {content[:200]!r}") from exc
                message = _error_message(resp)
                if not is_temporary_status(resp.status_code):
                    raise _Rejected(resp.status_code, message)
                failure = f"HTTP {resp.status_code}: {message}"
                wait = retry_after(resp.headers.get("retry-after"), cap=MAX_RETRY_AFTER)
            if attempt >= self.max_retries:
                raise RetryableBackendError(f"{method} {url} failed after {attempt + 1} attempts: {failure}")
            attempt += 1
            if wait is None:
                wait = backoff(attempt, self.backoff_base, self.backoff_max)
            log.debug("retrying %s %s in %.2fs (%s)", method, url, wait, failure)
            await _sleep(wait)


class _Rejected(Exception):
    """A 4xx the server will answer the same way again."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def _error_message(resp: httpx.Response) -> str:
    """The server's message from an OpenAI-style {"error": {"message"}} or {"message"} body."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
        if data.get("detail"):
            return str(data["detail"])[:500]
    return str(data)[:500]
