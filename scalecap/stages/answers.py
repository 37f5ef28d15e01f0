"""Stage 4: the VLM answers every object and position question about the image.

All questions of one image go to the engine in one call, each starting with the same system
prompt and image, so the engine reuses the prefix and the image's encoding. When the second filter
will rate the answers in one pass, each generation also returns its tokens' ids and scores.
"""

from __future__ import annotations

from scalecap.stages.context import ImageContext

NAME = "answers"


async def run(ctx: ImageContext) -> None:
    with ctx.timed(NAME):
        questions = ctx.object_questions + ctx.position_questions
        if not questions:
            return
        cfg = ctx.config
        scores = ctx.one_pass and cfg.second_filter
        results = await ctx.generate(
            ctx.vlm, [ctx.vlm_request(q, cfg.max_answer_tokens, token_scores=scores) for q in questions]
        )
        ctx.answer_results = list(results)
        answers = [r.text.strip() for r in results]
        n = len(ctx.object_questions)
        ctx.object_answers, ctx.position_answers = answers[:n], answers[n:]
        ctx.answer_texts = list(answers)
        ctx.answer_scores = [None] * len(answers)
        ctx.answer_kept = [bool(a) for a in answers]
