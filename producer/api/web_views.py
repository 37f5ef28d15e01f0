"""What the viewer's pages show, computed from FleetClient data: pure functions, no I/O.

Records come from workers of any version, so every field is read defensively: a missing score,
an older record without `sentences`, or a config without a threshold shows as "not recorded"
rather than breaking the page.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

FINAL_STATES = ("finished", "cancelled")
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


@dataclass
class Scored:
    text: str
    score: float | None
    kept: bool
    note: str = ""

    @property
    def gauge(self) -> float:
        """Position of the score on a [-1, 1] gauge, in percent (50 = zero)."""
        return gauge(self.score)


@dataclass
class QA:
    kind: str
    """"object" or "position"."""
    question: str
    answer: str
    kept: bool
    score: float | None

    @property
    def gauge(self) -> float:
        return gauge(self.score)


@dataclass
class RecordView:
    """Everything the caption viewer shows about one record."""

    final_caption: str = ""
    init_caption: str = ""
    golden: list[Scored] = field(default_factory=list)
    dropped: list[Scored] = field(default_factory=list)
    sentence_mode: str = "contrastive"
    sentence_threshold: float | None = None
    answer_threshold: float | None = None
    second_filter: bool = False
    fallback: str = ""
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
    """Other rating settings the config or record carries (score_mode, filter_unit, ...)."""


def gauge(score: float | None) -> float:
    if score is None or not math.isfinite(score):
        return 50.0
    return round(50.0 + 50.0 * max(-1.0, min(1.0, float(score))), 2)


def _num(v: Any) -> float | None:
    if isinstance(v, dict):
        v = v.get("score")
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


_MODE_FIELDS = ("score_mode", "filter_unit", "score_aggregate", "answer_filter")


def thresholds(record: dict[str, Any], config: dict[str, Any]) -> tuple[str, float | None, float | None]:
    """(sentence mode, sentence threshold, answer threshold) as the chain applied them.

    A threshold written in the record wins; else the one the config implies (yes/no mode
    compares P(yes) - P(no) with 0; contrastive mode uses tau_sentence / tau_answer).
    """
    meta = record.get("meta") or {}
    mode = str(meta.get("sentence_filter") or config.get("sentence_filter") or "contrastive")
    fb = meta.get("golden_fallback") if isinstance(meta.get("golden_fallback"), dict) else {}
    sentence = _num(meta.get("sentence_threshold"))
    if sentence is None:
        sentence = _num(fb.get("threshold"))
    if sentence is None:
        sentence = 0.0 if mode == "yesno" else _num(config.get("tau_sentence"))
    answer = _num(meta.get("answer_threshold"))
    if answer is None:
        if mode == "yesno":
            answer = 0.0
        else:
            answer = _num(config.get("tau_answer"))
            if answer is None:
                answer = _num(config.get("tau_sentence"))
    return mode, sentence, answer


def record_view(record: dict[str, Any], config: dict[str, Any] | None = None) -> RecordView:
    config = config or {}
    meta = dict(record.get("meta") or {})
    v = RecordView()
    v.error = record.get("error") if isinstance(record.get("error"), dict) else None
    v.final_caption = str(record.get("final_caption") or "")
    v.init_caption = str(record.get("init_caption") or "")
    v.sentence_mode, v.sentence_threshold, v.answer_threshold = thresholds(record, config)
    v.second_filter = bool(config.get("second_filter")) or any(
        "score" in p for p in record.get("qa_pairs") or [] if isinstance(p, dict)
    )
    v.mode_details = {k: config.get(k, meta.get(k)) for k in _MODE_FIELDS if config.get(k, meta.get(k))}

    sentences = list(record.get("sentences") or [])
    scores = list(record.get("sentence_scores") or [])
    golden_left = Counter(record.get("golden_sentences") or [])
    fb = meta.get("golden_fallback") if isinstance(meta.get("golden_fallback"), dict) else None
    if fb:
        v.fallback = str(fb.get("reason") or "no sentence passed the threshold")
    for i, s in enumerate(sentences):
        raw = scores[i] if i < len(scores) else None
        score = _num(raw)
        kept = bool(raw["kept"]) if isinstance(raw, dict) and "kept" in raw else golden_left[s] > 0
        if kept and golden_left[s] > 0:
            golden_left[s] -= 1
        note = "kept as the best of none" if fb and fb.get("kept_index") == i else ""
        (v.golden if kept else v.dropped).append(Scored(s, score, kept, note))
    if not sentences:  # an older record: golden sentences only
        v.golden = [Scored(s, None, True) for s in record.get("golden_sentences") or []]

    n_obj = len(record.get("object_questions") or [])
    for i, p in enumerate(record.get("qa_pairs") or []):
        if not isinstance(p, dict):
            continue
        v.qa.append(QA("object" if i < n_obj else "position", str(p.get("question") or ""),
                       str(p.get("answer") or ""), bool(p.get("kept", True)), _num(p.get("score"))))
    v.object_summary = str(record.get("object_summary") or "")
    v.position_summary = str(record.get("position_summary") or "")

    stage_seconds = {k: float(s) for k, s in (meta.pop("stage_seconds", None) or {}).items()
                     if _num(s) is not None}
    slowest = max(stage_seconds.values(), default=0.0)
    v.stages = [(k, s, round(100.0 * s / slowest, 1) if slowest > 0 else 0.0)
                for k, s in stage_seconds.items()]
    v.total_seconds = sum(stage_seconds.values())
    tokens = meta.pop("tokens", None) or {}
    v.tokens = {str(k): int(n) for k, n in tokens.items() if _num(n) is not None}
    v.config_hash = str(meta.pop("config_hash", "") or "")
    v.model = str(meta.pop("model", "") or "")
    for k in ("job_id", "sentence_filter", "golden_fallback", *_MODE_FIELDS):
        meta.pop(k, None)
    v.extra_meta = meta
    return v


__all__ = ["QA", "RecordView", "Scored", "error_types", "gauge", "progress", "record_view", "throughput"]
