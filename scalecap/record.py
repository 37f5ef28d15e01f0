"""The record of one image (DESIGN.md "Record") and the ids that make jobs idempotent."""

from __future__ import annotations

import hashlib
from typing import Any

from scalecap.stages.context import ImageContext

# The seven fields of the DataFlow operator, with their names and types.
DATAFLOW_FIELDS = (
    "init_caption",
    "golden_sentences",
    "object_questions",
    "position_questions",
    "qa_answers_filtered",
    "final_caption",
    "sentence_scores",
)


def job_id(image_ref: str | bytes, config_hash: str) -> str:
    """Stable id of one image under one config: the same work always gets the same id."""
    h = hashlib.sha256()
    h.update(config_hash.encode())
    h.update(b"\0")
    h.update(image_ref if isinstance(image_ref, bytes) else image_ref.encode())
    return h.hexdigest()[:32]


def base_meta(*, job: str | None, model: str, llm_model: str | None, config_hash: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"job_id": job, "model": model, "config_hash": config_hash}
    if llm_model and llm_model != model:
        meta["llm_model"] = llm_model
    return meta


def success_record(ctx: ImageContext, meta: dict[str, Any]) -> dict[str, Any]:
    questions = ctx.object_questions + ctx.position_questions
    answers = ctx.object_answers + ctx.position_answers
    rated = ctx.config.second_filter
    qa_pairs = [
        {
            "question": q,
            "answer": a,
            "kept": ctx.answer_kept[i],
            **({"kept_text": ctx.answer_texts[i]} if rated and ctx.answer_kept[i] else {}),
            **({"score": ctx.answer_scores[i]} if ctx.answer_scores[i] is not None else {}),
        }
        for i, (q, a) in enumerate(zip(questions, answers, strict=True))
    ]
    record = {
        "init_caption": ctx.init_caption,
        "golden_sentences": list(ctx.golden_sentences),
        "object_questions": list(ctx.object_questions),
        "position_questions": list(ctx.position_questions),
        "qa_answers_filtered": [ctx.answer_texts[i] for i, p in enumerate(qa_pairs) if p["kept"]],
        "final_caption": ctx.final_caption,
        "sentence_scores": list(ctx.sentence_scores),
        "sentences": list(ctx.sentences),
        "qa_pairs": qa_pairs,
        "object_summary": ctx.object_summary,
        "position_summary": ctx.position_summary,
        "meta": {
            **meta,
            **_scoring_meta(ctx),
            "stage_seconds": dict(ctx.stage_seconds),
            "tokens": {"prompt": ctx.prompt_tokens, "completion": ctx.completion_tokens},
            "truncated": list(ctx.truncated),
            **ctx.notes,
        },
    }
    if ctx.unit_scores:
        record["clause_scores"] = [list(u) for u in ctx.unit_scores]
    return record


def _scoring_meta(ctx: ImageContext) -> dict[str, Any]:
    c = ctx.config
    sentence, answer = c.thresholds()
    both = {"threshold": sentence, "answer_threshold": answer}  # what the viewer shows
    if c.sentence_filter == "yesno":
        return {"sentence_filter": "yesno", **both}
    return {
        "sentence_filter": "contrastive",
        "score_mode": c.score_mode,
        "filter_unit": c.filter_unit,
        **both,
        "scoring_passes": 1 if ctx.one_pass else 2,
    }


def error_record(
    error: dict[str, str], meta: dict[str, Any], ctx: ImageContext | None = None
) -> dict[str, Any]:
    """A failed image: the error and the bookkeeping, never a fake caption."""
    m = dict(meta)
    if ctx is not None:
        m["stage_seconds"] = dict(ctx.stage_seconds)
        m["tokens"] = {"prompt": ctx.prompt_tokens, "completion": ctx.completion_tokens}
        m["truncated"] = list(ctx.truncated)
    return {"error": error, "meta": m}


def is_error(record: dict[str, Any] | None) -> bool:
    return isinstance(record, dict) and "error" in record
