"""Stage 2: keep the golden sentences, the ones the image itself supports.

The caption's units (comma clauses or sentences, `filter_unit`) are rated; a sentence is golden
when any of its units passes, and in clause mode its failing clauses are pruned. A caption cut off
by its token limit loses its unterminated last sentence first, unless that is its only sentence.
When nothing passes, `golden_fallback` decides: the whole caption, the best sentence, or an error.
"""

from __future__ import annotations

from scalecap.backends.base import GenerateResult, score_values
from scalecap.rating import RatedSentence, select, units_of, yesno_score
from scalecap.sentences import Span, clean, split_spans
from scalecap.stages.context import ImageContext, UnusableText

NAME = "golden"


async def rate_yesno(ctx: ImageContext, statements: list[str]) -> list[float]:
    requests = [
        ctx.vlm_request(ctx.templates.yesno.format(sentence=s), 1, top_logprobs=10) for s in statements
    ]
    # yes/no is a judgement: always greedy whatever the caption sampling is.
    for r in requests:
        r.temperature = 0.0
    values = score_values(ctx.vlm)
    return [yesno_score(r, values) for r in await ctx.generate(ctx.vlm, requests, one_token=True)]


def rated_spans(text: str, truncated: bool) -> tuple[list[Span], bool]:
    """Sentence spans to rate, and whether an unterminated tail had to be kept (it was all)."""
    spans = units_of(text, truncated=truncated)
    if spans or not truncated:
        return spans, False
    return split_spans(text), True


async def rate_texts(
    ctx: ImageContext,
    items: list[tuple[str, str, GenerateResult | None]],
    truncated: list[bool],
    threshold: float,
) -> list[list[RatedSentence]]:
    """Rate several (prompt, text, generation or None) replies; one engine call for all."""
    cfg = ctx.config
    spans = [rated_spans(text, cut)[0] for (_, text, _), cut in zip(items, truncated, strict=True)]
    if cfg.sentence_filter == "yesno":
        statements = [clean(text[s:e]) for (_, text, _), sp in zip(items, spans, strict=True) for s, e in sp]
        scores = iter(await rate_yesno(ctx, statements))
        out = []
        for (_, text, _), sp in zip(items, spans, strict=True):
            rated = []
            for s, e in sp:
                score = next(scores)
                sentence = clean(text[s:e])
                rated.append(RatedSentence(sentence, score, sentence if score > threshold else None, [score]))
            out.append(rated)
        return out
    deltas = await ctx.deltas(items, cfg.score_mode)
    return [
        select(text, sp, d, unit=cfg.filter_unit, threshold=threshold, token_filter=cfg.token_filter)
        for (_, text, _), sp, d in zip(items, spans, deltas, strict=True)
    ]


async def run(ctx: ImageContext) -> None:
    with ctx.timed(NAME):
        cfg = ctx.config
        gen = ctx.caption_result
        # Rate the text as generated (offsets of its token scores refer to it), not the stripped copy.
        text = gen.text if gen is not None and gen.text.strip() == ctx.init_caption else ctx.init_caption
        cut = gen is not None and gen.finish_reason == "length"
        spans, kept_tail = rated_spans(text, cut)
        if not spans:
            raise UnusableText("the initial caption has no sentence to rate")
        if kept_tail:
            ctx.notes["unterminated_caption_rated"] = True
        threshold = cfg.thresholds()[0]
        (rated,) = await rate_texts(ctx, [(ctx.templates.caption, text, gen)], [cut], threshold)
        ctx.sentences = [r.text for r in rated]
        ctx.sentence_scores = [round(r.score, 6) for r in rated]
        if cfg.sentence_filter == "contrastive" and cfg.filter_unit == "clause":
            ctx.unit_scores = [[round(s, 6) for s in r.unit_scores] for r in rated]
        ctx.golden_sentences = [r.kept for r in rated if r.kept]
        if ctx.golden_sentences:
            return
        reason = "no sentence passed the threshold"
        if cfg.golden_fallback == "error":
            raise UnusableText(f"{reason} (threshold {threshold}) and golden_fallback is 'error'")
        note = {"reason": reason, "threshold": threshold, "kept": cfg.golden_fallback}
        if cfg.golden_fallback == "best":
            best = max(range(len(rated)), key=lambda i: rated[i].score)
            ctx.golden_sentences = [ctx.sentences[best]]
            note["kept_index"] = best
        else:
            ctx.golden_sentences = [" ".join(ctx.sentences)]
        ctx.notes["golden_fallback"] = note
