"""Stage 1: the initial, detailed caption.

With one-pass scoring the generation also returns its tokens' ids and scores, which are the
with-image half of the contrastive rating (stage 2). An empty caption, or one without a single
word, fails the image: nothing later may be built on it.
"""

from __future__ import annotations

from scalecap.stages.context import ImageContext, UnusableText

NAME = "caption"


async def run(ctx: ImageContext) -> None:
    with ctx.timed(NAME):
        limit = ctx.config.max_init_tokens
        request = ctx.vlm_request(ctx.templates.caption, limit, token_scores=ctx.one_pass)
        (result,) = await ctx.generate(ctx.vlm, [request])
        ctx.caption_result = result
        ctx.init_caption = result.text.strip()
        if not any(ch.isalnum() for ch in ctx.init_caption):
            raise UnusableText(f"the initial caption has no words: {ctx.init_caption[:80]!r}")
