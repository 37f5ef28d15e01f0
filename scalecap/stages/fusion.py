"""Stage 6: collect the object details, extract the positions, then write the final caption.

The answers reach the language model grouped under the golden sentence their questions came
from. Collecting and extracting do not depend on each other and run concurrently; the final
caption organises everything along the golden sentences. Budgets are large and each is lowered to
what the model's context leaves. Nothing is ever fused from nothing: with no answer to add, the
golden sentences are the caption, and an empty final text fails the image.
"""

from __future__ import annotations

from scalecap import prompts
from scalecap.stages.context import ImageContext, UnusableText

NAME = "fusion"


def grouped(ctx: ImageContext, offset: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(golden sentence, [(object, kept answer text)])] for object (offset 0) or position answers."""
    groups: list[tuple[str, list[tuple[str, str]]]] = [(s, []) for s in ctx.golden_sentences]
    for j, (obj, owner) in enumerate(zip(ctx.objects, ctx.object_owner, strict=True)):
        i = offset + j
        if i < len(ctx.answer_kept) and ctx.answer_kept[i] and ctx.answer_texts[i].strip():
            groups[owner][1].append((obj, " ".join(ctx.answer_texts[i].split())))
    return groups


async def _write(ctx: ImageContext, template: str, details: str, limit: int) -> str:
    if not details:
        return ""
    request = ctx.vlm_request(template.format(details=details), limit, image=False, fit_context=True)
    (r,) = await ctx.generate(ctx.llm, [request])
    return r.text.strip()


async def run(ctx: ImageContext) -> None:
    with ctx.timed(NAME):
        cfg = ctx.config
        objects = prompts.format_grouped(grouped(ctx, 0), "Details about")
        positions = prompts.format_grouped(grouped(ctx, len(ctx.objects)), "Position of")
        if objects or positions:
            ctx.object_summary, ctx.position_summary = await ctx.together(
                _write(ctx, ctx.templates.collect_objects, objects, cfg.max_object_summary_tokens),
                _write(ctx, ctx.templates.extract_positions, positions, cfg.max_position_summary_tokens),
            )
        sections = ""
        if ctx.object_summary:
            sections += ctx.templates.object_section.format(text=ctx.object_summary)
        if ctx.position_summary:
            sections += ctx.templates.position_section.format(text=ctx.position_summary)
        if not sections:
            ctx.final_caption = " ".join(ctx.golden_sentences)
            ctx.notes["fusion"] = "skipped: no answer details to add to the golden sentences"
            return
        prompt = ctx.templates.final_caption.format(
            golden=prompts.format_sentences(ctx.golden_sentences),
            sections=sections,
            objects=ctx.object_summary,
            positions=ctx.position_summary,
        )
        request = ctx.vlm_request(prompt, cfg.max_final_tokens, image=False, fit_context=True)
        (r,) = await ctx.generate(ctx.llm, [request])
        ctx.final_caption = r.text.strip()
        if not any(ch.isalnum() for ch in ctx.final_caption):
            raise UnusableText("the final caption came back empty")
