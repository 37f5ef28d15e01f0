"""Stage 3: object instructions from each golden sentence, each with a position twin.

Each golden sentence goes to the language model on its own (all of an image's sentences in one
engine call), so every object remembers the sentence it came from and fusion can group the
answers under it. Only real list items count: instruction lines, or bulleted names; chatty lines
("Sure, here is the list.", "Note: skip the sky") are refused. Names stay as written ("Eiffel
Tower"); "Cat", "cat" and "cats" are one object (scalecap/objects.py); a list cut off by the
token limit is not parsed past the cut.
"""

from __future__ import annotations

import re

from scalecap.objects import ObjectNames, normalise_object
from scalecap.stages.context import ImageContext

NAME = "questions"

_INSTRUCTION = re.compile(
    r"describe\s+(?:more\s+|the\s+)?details?\s+(?:about|of)\s+(?:the\s+position\s+of\s+)?(.+)", re.IGNORECASE
)
_MARKER = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,3}[.)]|Q\d*[:.])\s*")
_CHAT = re.compile(
    r"^(?:sure|ok(?:ay)?|here|note|certainly|of course|the following|there (?:is|are)|i |i'|let|please|"
    r"instructions?\b|objects?:|sentence:)",
    re.IGNORECASE,
)
"""A bulleted line that is talk, not a name ("Sure, here is the list", "Note: skip the sky")."""
_VAGUE = re.compile(
    r"^(?:(?:following|each|every|all|any|other)\b.*|it|them|they|objects?|items?|things?)$", re.IGNORECASE
)
"""An instruction about no object in particular ("the following objects:", "each item")."""
MAX_NAME_WORDS = 12


def _name(candidate: str, *, bulleted: bool = False) -> str | None:
    """The object name in a candidate, as written, or None when it does not look like one."""
    name = re.split(r"(?<=[a-z0-9\"')])[.!?](?:\s|$)", candidate.strip(), maxsplit=1)[0]
    name = re.split(r"[,;(]|\s[-\u2013\u2014]\s", name, maxsplit=1)[0]  # "the shirt, which is blue"
    name = name.strip().strip("*_`\"'").strip()
    if name.lower().startswith("position of "):
        name = name[len("position of ") :]
    obj = normalise_object(name)
    words = obj.split()
    if not words or len(words) > MAX_NAME_WORDS or len(obj) > 120:
        return None
    if ":" in obj or "?" in obj or not any(ch.isalpha() for ch in obj) or _VAGUE.match(obj):
        return None
    if bulleted and len(words) > 1 and words[0].istitle() and words[0].isalpha() and all(
        w.islower() for w in words[1:]
    ):
        obj = obj[0].lower() + obj[1:]  # "- Red car": a list item's capital ("- Coca-Cola can" keeps it)
    return obj


def parse_objects(text: str, limit: int | None = None, *, truncated: bool = False) -> list[str]:
    """Object names from the model's list: as written, each object once, capped.

    With `truncated` the last line is dropped unless it ends like a finished item: the token
    limit may have cut it mid-name.
    """
    lines = text.splitlines()
    if truncated and lines and not lines[-1].rstrip().endswith((".", "!")):
        lines = lines[:-1]
    seen = ObjectNames()
    for raw in lines:
        marker = _MARKER.match(raw)
        line = raw[marker.end() :] if marker else raw
        line = line.strip().strip("*_`").strip()
        if not line:
            continue
        m = _INSTRUCTION.match(line)
        if m:
            obj = _name(m.group(1))
        elif marker and not re.search(r"[.!?:]\s*\S", line) and not _CHAT.match(line):
            obj = _name(line, bulleted=True)  # a bare bulleted name: "- red car"
        else:
            obj = None  # prose, headings, chat
        if obj is not None:
            seen.add(obj)
        if limit is not None and len(seen) >= limit:
            break
    return list(seen.names)


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
        names = ObjectNames()
        for owner, result in enumerate(results):
            for obj in parse_objects(result.text, truncated=result.finish_reason == "length"):
                if cap is not None and len(names) >= cap:
                    break
                if names.add(obj):
                    ctx.objects.append(obj)
                    ctx.object_owner.append(owner)
        ctx.object_questions = [ctx.templates.object_question.format(object=o) for o in ctx.objects]
        ctx.position_questions = [ctx.templates.position_question.format(object=o) for o in ctx.objects]
