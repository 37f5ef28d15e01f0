"""Stage 1: the initial, detailed caption."""

from __future__ import annotations

from scalecap import prompts
from scalecap.stages.context import ImageContext

NAME = "caption"


async def run(ctx: ImageContext) -> None:
    with ctx.timed(NAME):
        (result,) = await ctx.generate(
            ctx.vlm, [ctx.vlm_request(prompts.INIT_CAPTION, ctx.config.max_init_tokens)]
        )
        ctx.init_caption = result.text.strip()
