"""Stage 3: object questions from the golden sentences, each with a position twin."""

from __future__ import annotations

import re

from scalecap import prompts
from scalecap.sentences import normalise_object
from scalecap.stages.context import ImageContext

NAME = "questions"

_LINE = re.compile(r"describe\s+(?:more\s+)?details?\s+about\s+(?:the\s+)?(.+)", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|Q\d*[:.])\s*")


def parse_objects(text: str, limit: int) -> list[str]:
    """Object names from the language model's list, normalised, deduplicated, capped."""
    seen: dict[str, None] = {}
    for raw in text.splitlines():
        line = _BULLET.sub("", raw).strip()
        if not line:
            continue
        m = _LINE.search(line)
        name = m.group(1) if m else line
        if m is None and (len(name.split()) > 5 or name.endswith(":")):
            continue  # prose or a heading, not an object name
        if name.lower().startswith("position of "):
            name = name[len("position of ") :]
        obj = normalise_object(name)
        if obj and len(obj) <= 80 and obj not in seen:
            seen[obj] = None
        if len(seen) >= limit:
            break
    return list(seen)


async def run(ctx: ImageContext) -> None:
    with ctx.timed(NAME):
        if ctx.config.max_questions == 0 or not ctx.golden_sentences:
            return
        prompt = prompts.LIST_OBJECTS.format(sentences=prompts.format_sentences(ctx.golden_sentences))
        (result,) = await ctx.generate(
            ctx.llm,
            [
                ctx.vlm_request(prompt, ctx.config.max_question_tokens, image=False)
            ],
        )
        ctx.objects = parse_objects(result.text, ctx.config.max_questions)
        ctx.object_questions = [prompts.OBJECT_QUESTION.format(object=o) for o in ctx.objects]
        ctx.position_questions = [prompts.POSITION_QUESTION.format(object=o) for o in ctx.objects]
