"""The JSON an OpenAI-compatible server speaks, read and written for scalecap.backends.openai.

Messages with the image first, image parts encoded once per call, top-logprob dictionaries, the
generated tokens' own scores (with vLLM's `return_token_ids`), the actual token of a
`prompt_logprobs` entry, and what `/v1/models` says about the server.
"""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scalecap.backends.base import TokenScore, char_offsets
from scalecap.errors import BackendError

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png"}


@dataclass
class ServerInfo:
    """What /v1/models says: the served name, the context, and whether vLLM serves it."""

    model: str | None = None
    max_model_len: int | None = None
    vllm: bool = False


def server_info(data: Any, model: str) -> ServerInfo:
    """The entry of `model` (or the first one when `model` is empty) in a /v1/models answer."""
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        return ServerInfo()
    entry = next((e for e in entries if isinstance(e, dict) and e.get("id") == model), None)
    if entry is None and not model:
        entry = entries[0] if isinstance(entries[0], dict) else None
    if entry is None:
        return ServerInfo()
    length = entry.get("max_model_len")
    return ServerInfo(
        model=str(entry.get("id")) if entry.get("id") is not None else None,
        max_model_len=int(length) if isinstance(length, int) and length > 0 else None,
        vllm=entry.get("owned_by") == "vllm",
    )


class ImageCache:
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


def messages(system: str | None, image_part: dict[str, Any] | None, prompt: str) -> list[dict[str, Any]]:
    """[system?, user: (image first,) text]: the image leads so its calls share one prefix.

    A text-only turn is a plain string, as in the in-process engines (scalecap.backends.chat):
    servers of text-only models do not all accept content parts.
    """
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    content: Any = prompt
    if image_part:
        content = [image_part, {"type": "text", "text": prompt}]
    out.append({"role": "user", "content": content})
    return out


def top_dict(entry: dict[str, Any]) -> dict[str, float]:
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


def generated_scores(choice: dict[str, Any], text: str) -> tuple[list[TokenScore], list[int]] | None:
    """Each generated token's own logprob and id, spans over `text`; None when the server did not
    return both (then the chain scores the text in two passes).

    Tokens past the text's end that show nothing in it (the end-of-turn token) are left out, as
    the in-process engines leave them out: they are not part of the text to rate."""
    content = (choice.get("logprobs") or {}).get("content")
    ids = choice.get("token_ids")
    if not isinstance(content, list) or not isinstance(ids, list) or len(ids) != len(content):
        return None
    pieces = [str(entry.get("token") or "") for entry in content]
    spans = char_offsets(pieces, text)
    n = len(spans)
    while n and spans[n - 1] == (len(text), len(text)) and not text.endswith(pieces[n - 1] or "\0"):
        n -= 1
    tokens = []
    for entry, (start, end) in zip(content[:n], spans[:n], strict=True):
        value = entry.get("logprob")
        if value is None:
            raise BackendError("the server returned a generated token without its logprob")
        tokens.append(TokenScore(text[start:end], start, end, float(value)))
    return tokens, [int(i) for i in ids[:n]]


def actual_token(entry: dict[str, Any] | None, token_id: int | None) -> tuple[str, float]:
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


def scored_tail(
    entries: list[Any], ids: list[int] | None, n: int, continuation: str
) -> list[TokenScore]:
    """TokenScores of the last `n` prompt_logprobs entries, spans over `continuation`."""
    tail_ids: list[int | None] = list(ids[-n:]) if ids and len(ids) == len(entries) else [None] * n
    pieces: list[str] = []
    logprobs: list[float] = []
    for entry, tid in zip(entries[len(entries) - n :], tail_ids, strict=True):
        piece, lp = actual_token(entry, tid)
        pieces.append(piece)
        logprobs.append(lp)
    spans = char_offsets(pieces, continuation)
    # The text is the span's own slice: a piece that does not line up (half of a split UTF-8
    # character) gets an empty text at a zero-width span.
    return [
        TokenScore(text=continuation[s:e], start=s, end=e, logprob=lp)
        for (s, e), lp in zip(spans, logprobs, strict=True)
    ]


def server_root(base_url: str) -> str:
    """http://h:8000/v1 -> http://h:8000 (vLLM serves /tokenize at the root)."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def looks_unsupported(status: int, message: str, endpoint_probe: bool) -> bool:
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
