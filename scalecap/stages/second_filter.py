"""Stage 5 (optional): rate each answer's sentences, conditioned on its question.

An answer's units are rated like the caption's, with the question as the prompt, and its passing
sentences (clauses pruned in clause mode) are what fusion reads. When none passes,
`answer_fallback` keeps the whole answer (the authors' rule) or drops it.
"""

from __future__ import annotations

from scalecap.stages.context import ImageContext
from scalecap.stages.golden import rate_texts

NAME = "second_filter"


async def run(ctx: ImageContext) -> None:
    if not ctx.config.second_filter:
        return
    with ctx.timed(NAME):
        cfg = ctx.config
        questions = ctx.object_questions + ctx.position_questions
        todo = [i for i, r in enumerate(ctx.answer_results) if r.text.strip()]
        if not todo:
            return
        threshold = cfg.thresholds()[1]
        results = ctx.answer_results
        rated = await rate_texts(
            ctx,
            [(questions[i], results[i].text, results[i]) for i in todo],
            [results[i].finish_reason == "length" for i in todo],
            threshold,
        )
        fallbacks = 0
        for i, sentences in zip(todo, rated, strict=True):
            kept = [s.kept for s in sentences if s.kept]
            ctx.answer_scores[i] = round(max((s.score for s in sentences), default=-10000.0), 6)
            if kept:
                ctx.answer_texts[i] = " ".join(kept)
            elif cfg.answer_fallback == "keep_all":
                fallbacks += 1
            else:
                ctx.answer_kept[i] = False
        if fallbacks:
            ctx.notes["answer_fallback"] = {"kept_whole": fallbacks, "threshold": threshold}
