"""Prompt layout shared by the in-process engines: one place decides how a request becomes text.

Every request is rendered with the model's own chat template as [system], user(image first, then
text), so all calls about one image share a prefix (the engine's prefix and multimodal caches).
Scoring appends the continuation after the assistant header and tokenises it separately, so the
continuation's token boundaries are the ones the model would have produced when generating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scalecap.backends.base import char_offsets
from scalecap.errors import ConfigError


def build_messages(prompt: str, *, system: str | None, has_image: bool) -> list[dict[str, Any]]:
    """Chat messages in the order every backend uses: [system], user(image?, text)."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    if has_image:
        content: Any = [{"type": "image"}, {"type": "text", "text": prompt}]
    else:
        # Plain string content: text-only chat templates do not all understand content parts.
        content = prompt
    messages.append({"role": "user", "content": content})
    return messages


@dataclass
class ChatRenderer:
    """Renders requests with a model's chat template and tokenises continuations with offsets.

    `template_owner` is the processor when the model folder has one (multimodal templates often
    live there), else the tokenizer.
    """

    tokenizer: Any
    template_owner: Any

    @classmethod
    def load(cls, model: str, *, trust_remote_code: bool = False) -> ChatRenderer:
        """Load the processor (or tokenizer) from a model folder or hub name. Blocking."""
        from transformers import AutoProcessor, AutoTokenizer

        try:
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, ImportError, KeyError):
            processor = None
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load a tokenizer for {model!r}: {exc}") from exc
        owner = processor if getattr(processor, "chat_template", None) else tokenizer
        if not getattr(owner, "chat_template", None):
            raise ConfigError(f"model {model!r} has no chat template")
        return cls(tokenizer=tokenizer, template_owner=owner)

    def render(
        self, prompt: str, *, system: str | None, has_image: bool, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text up to and including the assistant header."""
        messages = build_messages(prompt, system=system, has_image=has_image)
        return self.template_owner.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def encode_prefix(self, text: str) -> list[int]:
        """Token ids of rendered chat text (the template already wrote any special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_continuation(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a continuation and each token's character span in it."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]

    def continuation_tokens(
        self, text: str, ids: list[int] | None = None
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids to teacher-force for a continuation and each one's character span in `text`:
        the given `ids` (tokens the engine generated: one-pass scoring) or `text` tokenized."""
        if ids is not None:
            ids = list(ids)
            return ids, self.spans_of_ids(ids, text)
        ids, offsets = self.encode_continuation(text)
        return ids, token_spans(offsets, len(text))

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def special_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", None) or ())

    def strip_special_tail(self, ids: list[int]) -> int:
        """How many of `ids` remain once trailing special tokens (end of turn) are left out."""
        special = self.special_ids()
        n = len(ids)
        while n and ids[n - 1] in special:
            n -= 1
        return n

    def spans_of_ids(self, ids: list[int], text: str) -> list[tuple[int, int]]:
        """Character span in `text` (the decoding of `ids`) of each token, in order.

        Each token's piece is its decoding in a short window of the tokens before it, so pieces of
        SentencePiece and byte-level tokenizers both come out right; a token that only completes
        a multi-byte character elsewhere, or a special token, gets a zero-width span.
        """
        pieces: list[str] = []
        decode = self.tokenizer.decode
        for k in range(len(ids)):
            lo = max(0, k - 6)
            prev = decode(ids[lo:k], skip_special_tokens=True).rstrip("\ufffd") if k > lo else ""
            cur = decode(ids[lo : k + 1], skip_special_tokens=True)
            piece = cur[len(prev) :] if cur.startswith(prev) else decode([ids[k]], skip_special_tokens=True)
            pieces.append(piece.rstrip("\ufffd"))
        return char_offsets(pieces, text)


def token_spans(offsets: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Make offset-mapping spans tile the text: contiguous, in order, ending at `length`.

    Byte-level tokenizers give several tokens the same span when one character spans several
    tokens (UTF-8 bytes of an emoji); the first keeps the span and the rest become zero-width,
    which the rating treats as non-content.
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    for start, end in offsets:
        start = max(start, pos)
        end = max(end, start)
        if start > pos and spans:
            # Whitespace the tokenizer left out of every span joins the previous token.
            prev_start, _ = spans[-1]
            spans[-1] = (prev_start, start)
        elif start > pos:
            start = pos
        spans.append((start, end))
        pos = end
    if spans and pos < length:
        spans[-1] = (spans[-1][0], length)
    return spans
