"""Stage 2: keep the golden sentences, the ones the image itself supports."""

from __future__ import annotations

from scalecap import prompts
from scalecap.backends.base import ScoreRequest
from scalecap.rating import contrastive_scores, yesno_score
from scalecap.sentences import sentence_spans, split_sentences
from scalecap.stages.context import ImageContext

NAME = "golden"


async def rate(ctx: ImageContext, prompt: str, text: str, spans: list[tuple[int, int]]) -> list[float]:
    """Contrastive scores of the spans of `text`, the model's reply to `prompt` about the image."""
    with_img, without_img = await ctx.score(
        [
            ScoreRequest(prompt=prompt, continuation=text, image=ctx.image, system=ctx.system),
            ScoreRequest(prompt=prompt, continuation=text, image=None, system=ctx.system),
        ]
    )
    return contrastive_scores(text, spans, with_img, without_img)


async def rate_yesno(ctx: ImageContext, statements: list[str]) -> list[float]:
    requests = [
        ctx.vlm_request(prompts.YESNO.format(sentence=s), 1, top_logprobs=10) for s in statements
    ]
    # yes/no is a judgement: always greedy whatever the caption sampling is.
    for r in requests:
        r.temperature = 0.0
    return [yesno_score(r) for r in await ctx.generate(ctx.vlm, requests)]


async def run(ctx: ImageContext) -> None:
    with ctx.timed(NAME):
        cfg = ctx.config
        ctx.sentences = split_sentences(ctx.init_caption)
        if not ctx.sentences:
            ctx.notes["empty_caption"] = True
            return
        if cfg.sentence_filter == "yesno":
            scores = await rate_yesno(ctx, ctx.sentences)
            threshold = 0.0
        else:
            spans = sentence_spans(ctx.init_caption, ctx.sentences)
            scores = await rate(ctx, prompts.INIT_CAPTION, ctx.init_caption, spans)
            threshold = cfg.tau_sentence
        ctx.sentence_scores = [round(s, 6) for s in scores]
        ctx.golden_sentences = [s for s, sc in zip(ctx.sentences, scores, strict=True) if sc > threshold]
        if not ctx.golden_sentences:
            best = max(range(len(scores)), key=scores.__getitem__)
            ctx.golden_sentences = [ctx.sentences[best]]
            ctx.notes["golden_fallback"] = {
                "reason": "no sentence passed the threshold; kept the highest-scoring one",
                "threshold": threshold,
                "kept_index": best,
            }
