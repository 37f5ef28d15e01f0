"""A deterministic scripted VLM for tests of the chain's logic (and the zero-cost queue bench).

It is not a model: it recognises the chain's prompts and answers from a script. What it "sees"
in an image is the image's dominant colour, so a red picture supports the words "red" and
"square"; every other word is only as likely with the image as without it. That makes the
contrastive rating's decisions predictable: a sentence about a unicorn is not supported.

Its "tokens" are words and punctuation marks. Without the image a word has probability
`prior.get(word, BASE_P)`; with it `support` (and the colour words) override that. With
`score_values="logits"` it returns logits = log p + an offset that differs between the two
passes (`logit_shift`, added without the image), as a real model's normaliser does, so raw logit
differences and log ratios disagree by exactly that shift.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scalecap import prompts
from scalecap.backends.base import (
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    TokenScore,
)

BASE_P = 0.2
"""p(word) without the image, and for words the image does not support."""

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 50, 220),
    "yellow": (230, 220, 40),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}

_TOKEN = re.compile(r"\w+|[^\w\s]")
INSTRUCTIONS_PREFIX = prompts.SENTENCE_TO_INSTRUCTIONS.split("\n")[0][:40]
COLLECT_MARK = "gather every detail about each object"
EXTRACT_MARK = "take only what they say about where each object is"
assert COLLECT_MARK in prompts.COLLECT_OBJECTS and EXTRACT_MARK in prompts.EXTRACT_POSITIONS


def dominant_colour(image: Any) -> str:
    """The palette colour nearest the image's mean; computed once per image object.

    The scripted model asks this for every token it scores; caching it on the image keeps the
    "model" nearly free, so the queue benchmarks measure the fleet rather than this test double."""
    cached = getattr(image, "_scripted_colour", None)
    if cached is not None:
        return cached
    r, g, b = image.convert("RGB").resize((1, 1)).getpixel((0, 0))
    colour = min(COLOURS, key=lambda c: sum((x - y) ** 2 for x, y in zip(COLOURS[c], (r, g, b), strict=True)))
    try:
        image._scripted_colour = colour
    except AttributeError:
        pass
    return colour


@dataclass
class ScriptedVLM:
    """Answers the chain's prompts from a script; records every call.

    support: word -> p(word | image) for words the image supports (others get BASE_P).
    caption: the initial caption; "{colour}" is replaced by the image's dominant colour.
    objects_reply: the object list the "language model" returns; default: one line per supported
        noun found in the golden sentences, plus a duplicate, to exercise deduplication.
    delay: seconds each generate/score call waits (an engine's cost), for concurrency tests.
    fail_colour: images of this colour make the caption call raise (per-image failure).
    """

    support: dict[str, float] = field(default_factory=dict)
    caption: str = (
        "A {colour} square fills the picture. A unicorn flies over a rainbow. "
        "The {colour} square has sharp corners."
    )
    objects_reply: str | None = None
    delay: float = 0.0
    fail_colour: str | None = None
    model_name: str = "scripted-vlm"
    supports_scoring: bool = True
    supports_generation_logprobs: bool = False
    score_values: str = "logprobs"
    logit_shift: float = 0.0
    logit_shifts: dict[str, float] = field(default_factory=dict)
    """Per word: the offset of its position without the image (else logit_shift), as a real
    normaliser differs from one position to the next."""
    prior: dict[str, float] = field(default_factory=dict)
    answers: dict[str, str] = field(default_factory=dict)
    """object -> answer text ("{colour}" is the image's colour); default "The <object> is <colour>."."""
    fail_prompt: str | None = None
    """Generate calls with a prompt containing this raise (a stage failure)."""
    slow_prompt: str | None = None
    slow_seconds: float = 0.0
    """Generate calls with a prompt containing slow_prompt take slow_seconds (to be cancelled)."""
    max_model_len: int | None = None
    calls: list[tuple[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    cancelled: int = 0
    vocab: dict[str, int] = field(default_factory=dict)

    @classmethod
    async def create(cls, model: str = "scripted-vlm", **options: Any) -> ScriptedVLM:
        delay = float(options.pop("delay", 0.0))
        return cls(model_name=model, delay=delay)

    # --- helpers -------------------------------------------------------------------------

    def _supported(self, image: Any) -> dict[str, float]:
        if image is None:
            return {}
        colour = dominant_colour(image)
        return {colour: 0.9, "square": 0.8, "corners": 0.5, **self.support}

    def _value(self, word: str, image: Any) -> float:
        """The score of one token: its logprob, or a logit (log p + a per-pass offset)."""
        w = word.lower()
        p = self._supported(image).get(w, self.prior.get(w, BASE_P))
        value = math.log(p)
        if self.score_values == "logits" and image is None:
            value += self.logit_shifts.get(w, self.logit_shift)
        return value

    def _token_id(self, token: str) -> int:
        return self.vocab.setdefault(token, len(self.vocab) + 1)

    def _tokens(self, text: str, image: Any) -> tuple[list[TokenScore], list[int]]:
        toks = [
            TokenScore(text=m.group(0), start=m.start(), end=m.end(), logprob=self._value(m.group(0), image))
            for m in _TOKEN.finditer(text)
        ]
        return toks, [self._token_id(t.text) for t in toks]

    async def _tick(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1

    def _answer(self, req: GenerateRequest) -> GenerateResult:
        p = req.prompt
        supported = self._supported(req.image)
        top = None
        if p == prompts.INIT_CAPTION:
            colour = dominant_colour(req.image)
            if colour == self.fail_colour:
                raise RuntimeError(f"scripted failure for {colour} images")
            text = self.caption.replace("{colour}", colour)
        elif p.startswith("Is the following statement"):
            sentence = p.split('"')[1]
            yes = any(w.lower() in supported for w in re.findall(r"\w+", sentence))
            top = [{"yes": math.log(0.8 if yes else 0.1), "no": math.log(0.1 if yes else 0.8)}]
            text = "Yes, it is." if yes else "No, it is not."  # cut to one token by the request
        elif p.startswith(INSTRUCTIONS_PREFIX):
            if self.objects_reply is not None:
                text = self.objects_reply
            else:
                sentence = p.rsplit("Sentence:\n", 1)[1].split("\nInstructions:")[0]
                known = ("square", "unicorn", "rainbow", "corners")
                nouns = [w for w in re.findall(r"\w+", sentence.lower()) if w in known]
                lines = [f"Describe more details about the {n}." for n in nouns]
                text = "\n".join(lines)
        elif p.startswith("Describe more details about the position of the "):
            obj = p[len("Describe more details about the position of the ") :].rstrip(".")
            text = "It sits in the centre of the frame."
        elif p.startswith("Describe more details about the "):
            obj = p[len("Describe more details about the ") :].rstrip(".")
            colour = dominant_colour(req.image) if req.image is not None else "grey"
            text = self.answers.get(obj, "The {obj} is {colour}.").format(obj=obj, colour=colour)
        elif p.startswith("Descriptions:\n") and COLLECT_MARK in p:
            text = "OBJECTS: " + " | ".join(re.findall(r"^Details about the [^:]+: (.*)$", p, re.MULTILINE))
        elif p.startswith("Descriptions:\n") and EXTRACT_MARK in p:
            text = "POSITIONS: " + " | ".join(re.findall(r"^Position of the [^:]+: (.*)$", p, re.MULTILINE))
        elif p.startswith("Basic context:\n"):
            golden = p[len("Basic context:\n") :].split("\n\n")[0]
            text = "FINAL[" + " ".join(golden.splitlines()) + "]"
        else:
            text = "unscripted prompt"
        words = list(re.finditer(r"\S+", text))
        cut = len(words) > req.max_tokens
        if cut:  # a token limit cuts after the max_tokens-th word, line breaks kept
            text = text[: words[req.max_tokens - 1].end()] if req.max_tokens else ""
        tokens = ids = None
        if req.token_scores and self.supports_generation_logprobs:
            tokens, ids = self._tokens(text, req.image)
        return GenerateResult(
            text=text,
            prompt_tokens=len(p.split()) + (16 if req.image is not None else 0),
            completion_tokens=min(len(words), req.max_tokens),
            top_logprobs=top,
            finish_reason="length" if cut else "stop",
            tokens=tokens,
            token_ids=ids,
        )

    # --- Backend contract ------------------------------------------------------------------

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        self.calls.append(("generate", list(requests)))
        await self._tick()
        if self.fail_prompt and any(self.fail_prompt in r.prompt for r in requests):
            raise RuntimeError("scripted stage failure")
        if self.slow_prompt and any(self.slow_prompt in r.prompt for r in requests):
            try:
                await asyncio.sleep(self.slow_seconds)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return [self._answer(r) for r in requests]

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        self.calls.append(("score", list(requests)))
        await self._tick()
        out = []
        for r in requests:
            tokens, ids = self._tokens(r.continuation, r.image)
            if r.continuation_ids is not None and r.continuation_ids != ids:
                raise RuntimeError("continuation_ids are not the continuation's tokens")
            out.append(ScoreResult(tokens=tokens, prompt_tokens=len(r.prompt.split())))
        return out

    async def aclose(self) -> None:
        return None

    # --- assertions helpers ----------------------------------------------------------------

    def prompts_of(self, kind: str = "generate") -> list[str]:
        return [req.prompt for k, reqs in self.calls if k == kind for req in reqs]


def solid_image(colour: str, size: tuple[int, int] = (64, 48)):
    from PIL import Image

    return Image.new("RGB", size, COLOURS[colour])
