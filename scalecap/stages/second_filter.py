"""Stage 5 (optional): rate each answer like the sentences and drop unsupported ones."""

from __future__ import annotations

import asyncio

from scalecap.stages.context import ImageContext
from scalecap.stages.golden import rate, rate_yesno

NAME = "second_filter"


async def run(ctx: ImageContext) -> None:
    if not ctx.config.second_filter:
        return
    with ctx.timed(NAME):
        questions = ctx.object_questions + ctx.position_questions
        answers = ctx.object_answers + ctx.position_answers
        todo = [i for i, a in enumerate(answers) if a]
        if not todo:
            return
        if ctx.config.sentence_filter == "yesno":
            scores = await rate_yesno(ctx, [answers[i] for i in todo])
            threshold = 0.0
        else:
            scores = await asyncio.gather(
                *(rate(ctx, questions[i], answers[i], [(0, len(answers[i]))]) for i in todo)
            )
            scores = [s[0] for s in scores]
            threshold = ctx.config.answer_threshold
        for i, score in zip(todo, scores, strict=True):
            ctx.answer_scores[i] = round(score, 6)
            ctx.answer_kept[i] = score > threshold
