"""A deterministic scripted VLM for tests of the chain's logic (and the zero-cost queue bench).

It is not a model: it recognises the chain's prompts and answers from a script. What it "sees"
in an image is the image's dominant colour, so a red picture supports the words "red" and
"square"; every other word is only as likely with the image as without it. That makes the
contrastive rating's decisions predictable: a sentence about a unicorn is not supported.
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


def dominant_colour(image: Any) -> str:
    r, g, b = image.convert("RGB").resize((1, 1)).getpixel((0, 0))
    return min(COLOURS, key=lambda c: sum((x - y) ** 2 for x, y in zip(COLOURS[c], (r, g, b), strict=True)))


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
    calls: list[tuple[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

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
            text = "yes" if yes else "no"
        elif p.startswith("The sentences below describe one image."):
            if self.objects_reply is not None:
                text = self.objects_reply
            else:
                known = ("square", "unicorn", "rainbow", "corners")
                nouns = [w for w in re.findall(r"\w+", p.lower()) if w in known]
                lines = [f"Describe more details about the {n}." for n in nouns]
                text = "\n".join(lines)
        elif p.startswith("Describe more details about the position of the "):
            obj = p[len("Describe more details about the position of the ") :].rstrip(".")
            text = "It sits in the centre of the frame."
        elif p.startswith("Describe more details about the "):
            obj = p[len("Describe more details about the ") :].rstrip(".")
            colour = dominant_colour(req.image) if req.image is not None else "grey"
            text = f"The {obj} is {colour}."
        elif p.startswith("Below are answers about individual objects"):
            text = "OBJECTS: " + " | ".join(re.findall(r"A: (.*)", p))
        elif p.startswith("Below are answers about where objects are"):
            text = "POSITIONS: " + " | ".join(re.findall(r"A: (.*)", p))
        elif p.startswith("Write one detailed, fluent description"):
            golden = p.split("Basic description (follow it as the backbone):\n", 1)[1].split("\n\n")[0]
            text = f"FINAL[{golden}]"
        else:
            text = "unscripted prompt"
        words = text.split()[: req.max_tokens] if req.max_tokens else []
        text = " ".join(words) if len(text.split()) > req.max_tokens else text
        return GenerateResult(
            text=text,
            prompt_tokens=len(p.split()) + (16 if req.image is not None else 0),
            completion_tokens=len(words),
            top_logprobs=top,
            finish_reason="stop",
        )

    # --- Backend contract ------------------------------------------------------------------

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        self.calls.append(("generate", list(requests)))
        await self._tick()
        return [self._answer(r) for r in requests]

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        self.calls.append(("score", list(requests)))
        await self._tick()
        out = []
        for r in requests:
            supported = self._supported(r.image)
            tokens = [
                TokenScore(
                    text=m.group(0),
                    start=m.start(),
                    end=m.end(),
                    logprob=math.log(supported.get(m.group(0).lower(), BASE_P)),
                )
                for m in _TOKEN.finditer(r.continuation)
            ]
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
