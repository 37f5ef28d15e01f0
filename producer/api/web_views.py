"""What the viewer's pages show, computed from FleetClient data: pure functions, no I/O.

Records come from workers of any version, so every field is read defensively: a missing score,
an older record without `sentences`, or a config without a threshold shows as "not recorded"
rather than breaking the page.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from scalecap.fleet.outcomes import FINAL_BATCH_STATES

FINAL_STATES = FINAL_BATCH_STATES
SEGMENTS = ("done", "failed", "cancelled", "running", "queued")
"""Progress bar segments, left to right."""


# -- batches -----------------------------------------------------------------------------------


def progress(status: dict[str, Any]) -> dict[str, Any]:
    """Counts and bar widths (percent of total) of one batch; the JSON the pages poll."""
    total = int(status.get("total") or 0)
    counts = {k: int(status.get(k) or 0) for k in (*SEGMENTS, "dead_lettered")}
    finished = counts["done"] + counts["failed"] + counts["cancelled"]
    widths = {k: (100.0 * counts[k] / total if total else 0.0) for k in SEGMENTS}
    return {
        "batch_id": status.get("batch_id"),
        "state": status.get("state"),
        "total": total,
        **counts,
        "finished": finished,
        "percent": round(100.0 * finished / total, 1) if total else (100.0 if _final(status) else 0.0),
        "widths": {k: round(v, 3) for k, v in widths.items()},
        "live": not _final(status),
        "throughput": throughput(status),
        "elapsed": elapsed(status),
    }


def _final(status: dict[str, Any]) -> bool:
    return status.get("state") in FINAL_STATES or bool(status.get("finished_at"))


def elapsed(status: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds from the first job starting to the batch finishing (or now, while it runs)."""
    start = status.get("started_at")
    if not start:
        return None
    end = status.get("finished_at") or (now if now is not None else time.time())
    return max(0.0, float(end) - float(start))


def throughput(status: dict[str, Any], now: float | None = None) -> float | None:
    """Images finished (done or failed) per second since the first job started."""
    secs = elapsed(status, now)
    n = int(status.get("done") or 0) + int(status.get("failed") or 0)
    if secs is None or n == 0:
        return None
    return n / secs if secs > 0 else None


def error_types(failed: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """(stage, type, count) of a batch's failed jobs, most common first."""
    c: Counter[tuple[str, str]] = Counter()
    for f in failed:
        err = f.get("error") or {}
        c[(str(err.get("stage") or "?"), str(err.get("type") or "Unknown"))] += 1
    return [(s, t, n) for (s, t), n in c.most_common()]


# -- one record --------------------------------------------------------------------------------

NO_CONTENT_BELOW = -1000.0
"""Scores at or below this are the chain's "no content word" marker, not measurements."""

STAGE_ORDER = ("load", "caption", "golden", "questions", "answers", "second_filter", "fusion")
"""The chain's stages in the order they run (others, from newer chains, follow)."""

MODE_TEXT = {
    "yesno": "P(yes) − P(no) when the model is asked whether the text is true of the image",
    "log_ratio": "the largest log p(word | image) − log p(word | no image) over its content words (nats)",
    "logit_diff": "the largest logit(word | image) − logit(word | no image) over its content words",
    "prob_diff": "the largest p(word | image) − p(word | no image) over its content words",
}


@dataclass
class Scored:
    text: str
    score: float | None
    kept: bool
    gauge: float = 50.0
    """Position of the score on the record's symmetric scale, in percent (50 = zero)."""
    pruned: str = ""
    """In clause mode: what survived of a kept sentence when some of its clauses failed."""
    unit_scores: list[float | None] = field(default_factory=list)
    note: str = ""


@dataclass
class QA:
    kind: str
    """"object" or "position"."""
    question: str
    answer: str
    kept: bool
    score: float | None
    kept_text: str = ""
    fallback: bool = False
    """Kept whole although nothing in it passed (answer_fallback keep_all)."""


@dataclass
class RecordView:
    """Everything the caption viewer shows about one record."""

    final_caption: str = ""
    init_caption: str = ""
    golden: list[Scored] = field(default_factory=list)
    dropped: list[Scored] = field(default_factory=list)
    sentence_mode: str = "contrastive"
    score_mode: str = ""
    score_text: str = ""
    filter_unit: str = ""
    sentence_threshold: float | None = None
    answer_threshold: float | None = None
    scale: float = 1.0
    """Half-width of the score gauges: 1 for probabilities, else the record's largest |score|."""
    threshold_gauge: float = 50.0
    second_filter: bool = False
    fallback: str = ""
    answer_fallback: str = ""
    qa: list[QA] = field(default_factory=list)
    object_summary: str = ""
    position_summary: str = ""
    stages: list[tuple[str, float, float]] = field(default_factory=list)
    """(stage, seconds, percent of the slowest stage)."""
    total_seconds: float = 0.0
    tokens: dict[str, int] = field(default_factory=dict)
    config_hash: str = ""
    model: str = ""
    extra_meta: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    mode_details: dict[str, Any] = field(default_factory=dict)
    """Other rating settings the record or config carries (scoring passes, ...)."""


def gauge(score: float | None, scale: float = 1.0) -> float:
    """Where `score` sits on a [-scale, scale] gauge, in percent (50 = zero)."""
    if score is None or not math.isfinite(score) or scale <= 0:
        return 50.0
    return round(50.0 + 50.0 * max(-1.0, min(1.0, float(score) / scale)), 2)


def _num(v: Any) -> float | None:
    if isinstance(v, dict):
        v = v.get("score")
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > NO_CONTENT_BELOW else None


def _implied(mode: str, config: dict[str, Any], meta: dict[str, Any]) -> tuple[float, float] | None:
    """(sentence, answer) thresholds the chain's own rule (config.thresholds) gives for what the
    batch config and record say; None when they say too little (a contrastive config with
    neither tau_sentence nor a score mode: not recorded)."""
    known = {k: config[k] for k in ("score_mode", "tau_sentence", "tau_answer") if config.get(k) is not None}
    if meta.get("score_mode"):
        known["score_mode"] = meta["score_mode"]
    if mode != "yesno" and not ({"score_mode", "tau_sentence"} & set(known)):
        return None
    try:
        from scalecap.config import ImageScaleCaptionGenerateConfig

        return ImageScaleCaptionGenerateConfig.from_dict({**known, "sentence_filter": mode}).thresholds()
    except Exception:  # a config this core does not know (an older or newer record)
        return None


def thresholds(record: dict[str, Any], config: dict[str, Any]) -> tuple[str, float | None, float | None]:
    """(sentence filter, sentence threshold, answer threshold) as the chain applied them.

    Thresholds written in the record win; else what the config implies by the chain's rule.
    An answer threshold nobody set is the sentence threshold applied.
    """
    meta = record.get("meta") or {}
    mode = str(meta.get("sentence_filter") or config.get("sentence_filter") or "contrastive")
    fb = meta.get("golden_fallback") if isinstance(meta.get("golden_fallback"), dict) else {}
    implied = _implied(mode, config, meta)
    sentence = next((t for t in (_num(meta.get("threshold")), _num(meta.get("sentence_threshold")),
                                 _num(fb.get("threshold"))) if t is not None), None)
    if sentence is None and implied is not None:
        sentence = implied[0]
    answer = _num(meta.get("answer_threshold"))
    if answer is None and implied is not None and (mode == "yesno" or config.get("tau_answer") is not None):
        answer = implied[1]
    return mode, sentence, sentence if answer is None else answer


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower())}


def _kept_flags(sentences: list[str], scores: list[float | None], golden: list[str],
                threshold: float | None, raw: list[Any]) -> tuple[list[bool], list[str]]:
    """Which sentences the filter kept, and what each kept one became (pruned in clause mode).

    Records do not store a per-sentence flag: it is the score against the threshold, checked
    against the golden list (same count, same order); otherwise golden texts are matched to
    sentences in order by their words."""
    n = len(sentences)
    if all(isinstance(r, dict) and "kept" in r for r in raw[:n]) and len(raw) >= n:
        flags = [bool(r["kept"]) for r in raw[:n]]
    elif threshold is not None and all(s is not None for s in scores[:n]) and len(scores) >= n and \
            sum(1 for s in scores[:n] if s is not None and s > threshold) == len(golden):
        flags = [s is not None and s > threshold for s in scores[:n]]
    else:
        flags, g = [], 0
        for s in sentences:
            words = _words(golden[g]) if g < len(golden) else set()
            hit = g < len(golden) and (golden[g] == s or bool(words and words <= _words(s)))
            flags.append(bool(hit))
            g += bool(hit)
    kept_texts, g = [], 0
    for s, f in zip(sentences, flags, strict=True):
        text = golden[g] if f and g < len(golden) else ""
        g += f
        kept_texts.append(text if text and text != s else "")
    return flags, kept_texts


def record_view(record: dict[str, Any], config: dict[str, Any] | None = None) -> RecordView:
    config = config or {}
    meta = dict(record.get("meta") or {})
    v = RecordView()
    v.error = record.get("error") if isinstance(record.get("error"), dict) else None
    v.final_caption = str(record.get("final_caption") or "")
    v.init_caption = str(record.get("init_caption") or "")
    v.sentence_mode, v.sentence_threshold, v.answer_threshold = thresholds(record, config)
    if v.sentence_mode == "yesno":
        v.score_mode = "yesno"
    else:
        v.score_mode = str(meta.get("score_mode") or config.get("score_mode") or "prob_diff")
        v.filter_unit = str(meta.get("filter_unit") or config.get("filter_unit") or "sentence")
    v.score_text = MODE_TEXT.get(v.score_mode, "the rating of the chain's score mode")
    if "scoring_passes" in meta:
        v.mode_details["scoring passes"] = meta["scoring_passes"]
    v.second_filter = bool(config.get("second_filter")) or any(
        isinstance(p, dict) and "score" in p for p in record.get("qa_pairs") or [])

    sentences = [str(s) for s in record.get("sentences") or []]
    raw_scores = list(record.get("sentence_scores") or [])
    scores = [_num(x) for x in raw_scores]
    golden = [str(g) for g in record.get("golden_sentences") or []]
    units = record.get("clause_scores") or []
    fb = meta.get("golden_fallback") if isinstance(meta.get("golden_fallback"), dict) else None
    qa_scores = [_num(p.get("score")) for p in record.get("qa_pairs") or [] if isinstance(p, dict)]
    known = [abs(x) for x in [*scores, *qa_scores, v.sentence_threshold, v.answer_threshold] if x is not None]
    v.scale = 1.0 if v.score_mode in ("prob_diff", "yesno") else max([1.0, *known])
    v.threshold_gauge = gauge(v.sentence_threshold, v.scale)

    if fb:
        kept = fb.get("kept")
        v.fallback = str(fb.get("reason") or "no sentence passed the threshold") + (
            ": the whole caption was kept as the golden text" if kept == "caption" else
            ": the best-scoring sentence was kept" if kept == "best" or "kept_index" in fb else "")
        flags = [i == fb.get("kept_index") for i in range(len(sentences))]
        pruned = [""] * len(sentences)
    else:
        flags, pruned = _kept_flags(sentences, scores, golden, v.sentence_threshold, raw_scores)
    for i, s in enumerate(sentences):
        score = scores[i] if i < len(scores) else None
        unit = units[i] if i < len(units) and isinstance(units[i], list) else []
        item = Scored(s, score, flags[i], gauge(score, v.scale), pruned[i],
                      [_num(u) for u in unit] if len(unit) > 1 else [])
        if fb and flags[i]:
            item.note = "kept as the best of none"
        (v.golden if item.kept else v.dropped).append(item)
    if not sentences:  # an older record: golden sentences only
        v.golden = [Scored(g, None, True) for g in golden]

    n_obj = len(record.get("object_questions") or [])
    for i, p in enumerate(record.get("qa_pairs") or []):
        if not isinstance(p, dict):
            continue
        answer = str(p.get("answer") or "")
        kept_text = str(p.get("kept_text") or "")
        qa = QA("object" if i < n_obj else "position", str(p.get("question") or ""), answer,
                bool(p.get("kept", True)), _num(p.get("score")),
                kept_text if kept_text and kept_text != answer else "")
        qa.fallback = bool(qa.kept and v.second_filter and not qa.kept_text and v.answer_threshold is not None
                           and (qa.score is None or qa.score <= v.answer_threshold))
        v.qa.append(qa)
    afb = meta.get("answer_fallback")
    if isinstance(afb, dict) and afb.get("kept_whole"):
        n = int(afb["kept_whole"])
        were = "was" if n == 1 else "were"
        v.answer_fallback = (f"{n} answer{'s' if n != 1 else ''} had no sentence above the threshold "
                             f"and {were} kept whole (answer_fallback keep_all)")
    v.object_summary = str(record.get("object_summary") or "")
    v.position_summary = str(record.get("position_summary") or "")

    stage_seconds = {str(k): float(s) for k, s in (meta.pop("stage_seconds", None) or {}).items()
                     if _num(s) is not None}
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    stage_seconds = dict(sorted(stage_seconds.items(), key=lambda kv: order.get(kv[0], len(order))))
    slowest = max(stage_seconds.values(), default=0.0)
    v.stages = [(k, s, round(100.0 * s / slowest, 1) if slowest > 0 else 0.0)
                for k, s in stage_seconds.items()]
    v.total_seconds = sum(stage_seconds.values())
    tokens = meta.pop("tokens", None) or {}
    v.tokens = {str(k): int(n) for k, n in sorted(tokens.items(), key=lambda kv: kv[0] != "prompt")
                if _num(n) is not None}
    v.config_hash = str(meta.pop("config_hash", "") or "")
    v.model = str(meta.pop("model", "") or "")
    for k in ("job_id", "sentence_filter", "golden_fallback", "answer_fallback", "score_mode", "filter_unit",
              "threshold", "sentence_threshold", "answer_threshold", "scoring_passes"):
        meta.pop(k, None)
    v.extra_meta = meta
    return v



# -- formatting filters of the templates -------------------------------------------------------


def _fmt_time(ts: float | None) -> str:
    if not ts:
        return "—"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt_secs(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _fmt_rate(r: float | None) -> str:
    if r is None:
        return "—"
    return f"{r:.2f} images/s" if r < 10 else f"{r:.0f} images/s"


def _fmt_score(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def _basename(ref: str | None) -> str:
    if not ref:
        return "?"
    if ref.startswith("data:"):
        return ref.split(",", 1)[0] + ",…"
    tail = ref.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    return tail or ref


FILTERS = {"time": _fmt_time, "secs": _fmt_secs, "rate": _fmt_rate, "score": _fmt_score,
           "basename": _basename, "gauge": gauge}
"""Jinja filters the viewer's templates use."""


__all__ = ["FILTERS", "QA", "RecordView", "Scored", "error_types", "gauge", "progress", "record_view",
           "thresholds", "throughput"]
