"""Stage 3: object instructions from each golden sentence, each with a position twin.

Each golden sentence goes to the language model on its own (all of an image's sentences in one
engine call), so every object remembers the sentence it came from and fusion can group the
answers under it. Only real list items count: instruction lines, or short bulleted names; chatty
lines ("Sure, here is the list.", "Note: skip the sky") are refused, "cat" and "cats" are one
object, and a list cut off by the token limit is not parsed past the cut.
"""

from __future__ import annotations

import re

from scalecap.sentences import normalise_object, object_key
from scalecap.stages.context import ImageContext

NAME = "questions"

_INSTRUCTION = re.compile(
    r"describe\s+(?:more\s+|the\s+)?details?\s+(?:about|of)\s+(?:the\s+position\s+of\s+)?(.+)", re.IGNORECASE
)
_MARKER = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)]|Q\d*[:.])\s*")
_CHATTY = re.compile(
    r"^(?:sure|ok(?:ay)?|here|note|certainly|of course|these|this|the following|there|i |i'|"
    r"let|please|instructions?|objects?|sentence)\b",
    re.IGNORECASE,
)
MAX_NAME_WORDS = 6


def _name(candidate: str) -> str | None:
    """The object name in a candidate, or None when it does not look like one."""
    name = re.split(r"(?<=[a-z0-9\"')])[.!?](?:\s|$)", candidate.strip(), maxsplit=1)[0]
    name = re.split(r"[,;(]|\s[-\u2013\u2014]\s", name, maxsplit=1)[0]  # "the shirt, which is blue"
    name = name.strip().strip("*_`\"'").strip()
    if name.lower().startswith("position of "):
        name = name[len("position of ") :]
    obj = normalise_object(name)
    words = obj.split()
    if not words or len(words) > MAX_NAME_WORDS or len(obj) > 80:
        return None
    if ":" in obj or "?" in obj or not any(ch.isalpha() for ch in obj) or _CHATTY.match(obj):
        return None
    return obj


def parse_objects(text: str, limit: int | None = None, *, truncated: bool = False) -> list[str]:
    """Object names from the model's list: normalised, singular/plural merged, capped.

    With `truncated` the last line is dropped unless it ends like a finished item: the token
    limit may have cut it mid-name.
    """
    lines = text.splitlines()
    if truncated and lines and not lines[-1].rstrip().endswith((".", "!")):
        lines = lines[:-1]
    seen: dict[str, str] = {}
    for raw in lines:
        marker = _MARKER.match(raw)
        line = raw[marker.end() :] if marker else raw
        line = line.strip().strip("*_`").strip()
        if not line:
            continue
        m = _INSTRUCTION.match(line)
        if m:
            obj = _name(m.group(1))
        elif marker and not re.search(r"[.!?:]\s*\S", line):
            obj = _name(line)  # a bare bulleted name: "- red car"
        else:
            obj = None  # prose, headings, chat
        if obj is None:
            continue
        key = object_key(obj)
        if key and key not in seen:
            seen[key] = obj
        if limit is not None and len(seen) >= limit:
            break
    return list(seen.values())


async def run(ctx: ImageContext) -> None:
    with ctx.timed(NAME):
        cfg = ctx.config
        cap = cfg.max_questions
        if cap == 0 or not ctx.golden_sentences:
            return
        template, limit = ctx.templates.questions, cfg.max_question_tokens
        requests = [
            ctx.vlm_request(template.format(sentence=s), limit, image=False) for s in ctx.golden_sentences
        ]
        results = await ctx.generate(ctx.llm, requests)
        keys: set[str] = set()
        for owner, result in enumerate(results):
            for obj in parse_objects(result.text, truncated=result.finish_reason == "length"):
                key = object_key(obj)
                if key in keys or (cap is not None and len(ctx.objects) >= cap):
                    continue
                keys.add(key)
                ctx.objects.append(obj)
                ctx.object_owner.append(owner)
        ctx.object_questions = [ctx.templates.object_question.format(object=o) for o in ctx.objects]
        ctx.position_questions = [ctx.templates.position_question.format(object=o) for o in ctx.objects]
