"""Stage 6: summarise object details, then position details, then write the final caption.

The two summaries do not depend on each other and run concurrently; the final caption follows the
golden sentences as its backbone.
"""

from __future__ import annotations

import asyncio

from scalecap import prompts
from scalecap.stages.context import ImageContext

NAME = "fusion"


async def _summarise(ctx: ImageContext, template: str, pairs: list[tuple[str, str]], limit: int) -> str:
    if not pairs:
        return ""
    (r,) = await ctx.generate(
        ctx.llm, [ctx.vlm_request(template.format(pairs=prompts.format_pairs(pairs)), limit, image=False)]
    )
    return r.text.strip()


async def run(ctx: ImageContext) -> None:
    with ctx.timed(NAME):
        cfg = ctx.config
        n = len(ctx.object_questions)
        kept = ctx.answer_kept
        obj_pairs = [
            (q, a)
            for i, (q, a) in enumerate(zip(ctx.object_questions, ctx.object_answers, strict=True))
            if kept[i]
        ]
        pos_pairs = [
            (q, a)
            for i, (q, a) in enumerate(zip(ctx.position_questions, ctx.position_answers, strict=True))
            if kept[n + i]
        ]
        ctx.object_summary, ctx.position_summary = await asyncio.gather(
            _summarise(ctx, prompts.SUMMARISE_OBJECTS, obj_pairs, cfg.max_object_summary_tokens),
            _summarise(ctx, prompts.SUMMARISE_POSITIONS, pos_pairs, cfg.max_position_summary_tokens),
        )
        prompt = prompts.FINAL_CAPTION.format(
            golden=" ".join(ctx.golden_sentences) or "(none)",
            objects=ctx.object_summary or "(none)",
            positions=ctx.position_summary or "(none)",
        )
        (r,) = await ctx.generate(ctx.llm, [ctx.vlm_request(prompt, cfg.max_final_tokens, image=False)])
        ctx.final_caption = r.text.strip()
