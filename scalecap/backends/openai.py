"""Any OpenAI-compatible chat server (vLLM's server, SGLang, a hosted API) over plain HTTP.

`generate` works with every such server. `score` (teacher forcing, the contrastive filter) needs
two vLLM extensions: `prompt_logprobs` on /v1/chat/completions and the /tokenize endpoint at the
server root. Against another server `score` raises BackendError and `supports_scoring` turns
False; use `sentence_filter='yesno'` there, which only needs `logprobs`/`top_logprobs`.

Every request of a call goes out at once (the server batches what is in flight), bounded by one
semaphore shared by all calls on this backend. What scalecap.retry calls temporary (429, 5xx,
timeouts, dropped connections) is retried with its backoff, honouring Retry-After; other 4xx
fail at once with the server's own message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import httpx

from scalecap.backends.base import (
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    TokenScore,
    char_offsets,
    gather_or_cancel,
)
from scalecap.errors import BackendError, ConfigError, RetryableBackendError
from scalecap.retry import backoff, is_temporary_error, is_temporary_status, retry_after

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png"}
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
        self.server_root = _server_root(self.base_url)
        self.supports_scoring = True
        """Optimistic until the first `score` call finds the server lacks vLLM's extensions."""
        self.supports_generation_logprobs = False
        """Chat messages are text, so generated ids cannot be teacher-forced: scoring takes two passes."""
        self.max_model_len: int | None = None
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
        **unknown: Any,
    ) -> OpenAIBackend:
        """Open a client. An empty `model` takes the first model the server lists.

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
        if fmt not in IMAGE_FORMATS:
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
        if not model:
            try:
                backend.model_name = await backend._first_model()
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
        images = _ImageCache(self.image_format)
        return await gather_or_cancel([self._generate_one(r, images) for r in requests])

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        if not self.supports_scoring:
            raise self._unsupported("an earlier request found it lacking")
        images = _ImageCache(self.image_format)
        return await gather_or_cancel([self._score_one(r, images) for r in requests])

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._client.aclose()

    # --- one request ---------------------------------------------------------------------------

    async def _generate_one(self, req: GenerateRequest, images: _ImageCache) -> GenerateResult:
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": _messages(req.system, await images.part(req.image), req.prompt),
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.top_logprobs > 0:
            body["logprobs"] = True
            body["top_logprobs"] = req.top_logprobs
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
            top = [_top_dict(entry) for entry in content]
        return GenerateResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            top_logprobs=top,
            finish_reason=choice.get("finish_reason"),
        )

    async def _score_one(self, req: ScoreRequest, images: _ImageCache) -> ScoreResult:
        if not req.continuation:
            return ScoreResult(tokens=[], prompt_tokens=0)
        messages = _messages(req.system, await images.part(req.image), req.prompt)
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
        pieces: list[str] = []
        logprobs: list[float] = []
        for entry, tid in zip(entries[len(entries) - n_tokens :], tail_ids, strict=True):
            piece, lp = _actual_token(entry, tid)
            pieces.append(piece)
            logprobs.append(lp)
        spans = char_offsets(pieces, req.continuation)
        # The text is the span's own slice: a piece that does not line up (half of a split UTF-8
        # character) gets an empty text at a zero-width span.
        tokens = [
            TokenScore(text=req.continuation[s:e], start=s, end=e, logprob=lp)
            for (s, e), lp in zip(spans, logprobs, strict=True)
        ]
        usage = data.get("usage") or {}
        return ScoreResult(tokens=tokens, prompt_tokens=int(usage.get("prompt_tokens") or len(entries)))

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

    async def _first_model(self) -> str:
        data = await self._request("GET", f"{self.base_url}/models", None)
        try:
            return str(data["data"][0]["id"])
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"{self.base_url}/models lists no model: {data!r:.300}") from exc

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
            if scoring and _looks_unsupported(exc.status, exc.message, url.endswith("/tokenize")):
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


class _ImageCache:
    """Encodes each distinct image of one call once (an image's stages share prompts)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._urls: dict[int, asyncio.Future[str]] = {}

    async def part(self, image: Image | str | None) -> dict[str, Any] | None:
        if image is None:
            return None
        if isinstance(image, str):
            return {"type": "image_url", "image_url": {"url": image}}
        key = id(image)
        fut = self._urls.get(key)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(data_url, image, self.fmt))
            self._urls[key] = fut
        return {"type": "image_url", "image_url": {"url": await fut}}


def data_url(image: Image, fmt: str = "JPEG") -> str:
    """A base64 data URL of a PIL image (JPEG needs RGB; PNG keeps alpha)."""
    if fmt == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return f"data:{IMAGE_FORMATS[fmt]};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _messages(system: str | None, image_part: dict[str, Any] | None, prompt: str) -> list[dict[str, Any]]:
    """[system?, user: (image first,) text]: the image leads so its calls share one prefix.

    A text-only turn is a plain string, as in the in-process engines (scalecap.backends.chat):
    servers of text-only models do not all accept content parts.
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    content: Any = prompt
    if image_part:
        content = [image_part, {"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    return messages


def _top_dict(entry: dict[str, Any]) -> dict[str, float]:
    """{token text: logprob} of one generated token's alternatives (best logprob per text)."""
    out: dict[str, float] = {}
    for alt in entry.get("top_logprobs") or []:
        tok, lp = alt.get("token"), alt.get("logprob")
        if tok is None or lp is None:
            continue
        lp = float(lp)
        if tok not in out or lp > out[tok]:
            out[tok] = lp
    return out


def _actual_token(entry: dict[str, Any] | None, token_id: int | None) -> tuple[str, float]:
    """(decoded text, logprob) of the prompt token itself from one prompt_logprobs entry."""
    if not entry:
        raise BackendError("prompt_logprobs entry missing for a continuation token")
    info = entry.get(str(token_id)) if token_id is not None else None
    if info is None:
        # prompt_logprobs=0 returns only the actual token; otherwise it is the one with no rank 1+
        info = next(iter(entry.values())) if len(entry) == 1 else None
    if info is None:
        raise BackendError(f"cannot tell the actual token in prompt_logprobs entry {entry!r:.200}")
    return str(info.get("decoded_token") or ""), float(info["logprob"])


def _server_root(base_url: str) -> str:
    """http://h:8000/v1 -> http://h:8000 (vLLM serves /tokenize at the root)."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


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


def _looks_unsupported(status: int, message: str, endpoint_probe: bool) -> bool:
    """A 4xx that means 'this server has no such endpoint or field', not 'bad input'.

    A missing /tokenize answers 404/405/501; vLLM also answers 404 for an unknown model name,
    which is a configuration error, not a missing feature.
    """
    text = message.lower()
    if endpoint_probe and status in (404, 405, 501) and "model" not in text:
        return True
    return any(
        word in text
        for word in ("prompt_logprobs", "continue_final_message", "extra fields", "extra_forbidden")
    )
