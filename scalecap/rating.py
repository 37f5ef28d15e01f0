"""Rating text: is each unit supported by the image, or by language habit alone?

Contrastive (dual-modality debiasing): score the same tokens twice under the same prompt, with
and without the image, and compare per token (`score_mode`):

- `log_ratio`: log p(token | image) - log p(token | no image);
- `logit_diff`: raw logit with the image - raw logit without it (the ScaleCap authors' rule; the
  engine must return raw logits instead of logprobs);
- `prob_diff`: p(token | image) - p(token | no image).

A unit's score is its largest difference over its content tokens (`token_filter = "content"`) or
over all its tokens but clause and sentence punctuation (`"all"`, the authors' code as it runs):
one token that only the image explains is evidence that the image, not habit, made the model say
it. Units are sentences or
comma clauses (`filter_unit`). In clause mode a sentence is kept when any clause passes, with its
failing clauses pruned.

Yes/no: ask the VLM whether the sentence is correct for the image; score = P(yes) - P(no) read
from the first generated token's top logprobs (or 1/-1/0 from the text when no logprobs exist).
On an engine that returns raw logits the two are compared at that one position, where the
normaliser cancels: tanh((logit yes - logit no) / 2), the same sign as P(yes) - P(no).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from scalecap.backends.base import GenerateResult, ScoreResult, TokenScore
from scalecap.sentences import (
    Span,
    clause_spans,
    clean,
    drop_unterminated_tail,
    is_content_token,
    split_spans,
    terminal,
)

ScoreMode = Literal["log_ratio", "logit_diff", "prob_diff"]
FilterUnit = Literal["sentence", "clause"]
TokenFilter = Literal["content", "all"]
SCORE_MODES: tuple[str, ...] = ("log_ratio", "logit_diff", "prob_diff")
FILTER_UNITS: tuple[str, ...] = ("sentence", "clause")
TOKEN_FILTERS: tuple[str, ...] = ("content", "all")

DEFAULT_THRESHOLD: dict[str, float] = {"log_ratio": 0.0, "logit_diff": 0.0, "prob_diff": 0.15}
"""Threshold of each mode when the config leaves it unset. 0 in the log modes is the authors'
rule (any token more likely with the image); 0.15 is the earlier probability rule's value."""

NO_CONTENT = -10000.0
"""Score of a unit without any content token (below any real score): never kept on its own."""


def token_deltas(
    with_image: ScoreResult | Sequence[TokenScore],
    without_image: ScoreResult | Sequence[TokenScore],
    mode: ScoreMode,
) -> list[tuple[TokenScore, float]]:
    """Pair the two passes token by token and return each token's difference under `mode`.

    Both passes score the same continuation, so their token lists match; if an engine tokenised
    the boundary differently, they are aligned from the end (the continuation's last tokens are
    the same in both). The first pass's tokens carry the character offsets.
    """
    a = with_image.tokens if isinstance(with_image, ScoreResult) else list(with_image)
    b = without_image.tokens if isinstance(without_image, ScoreResult) else list(without_image)
    n = min(len(a), len(b))
    a, b = a[len(a) - n :], b[len(b) - n :]
    if mode == "prob_diff":
        return [(ta, math.exp(ta.logprob) - math.exp(tb.logprob)) for ta, tb in zip(a, b, strict=True)]
    return [(ta, ta.logprob - tb.logprob) for ta, tb in zip(a, b, strict=True)]


_BREAK_PUNCTUATION = frozenset(",.?!;\n\u2026")


def counts(text: str, start: int, end: int, token_filter: TokenFilter) -> bool:
    """Whether a token may decide its unit's score under `token_filter`.

    "all" keeps every token but the punctuation that separates clauses and sentences (the
    authors' code cuts units there and scores the rest, "the" and "on" included)."""
    if token_filter == "all":
        piece = text[start:end].strip()
        return bool(piece) and not set(piece) <= _BREAK_PUNCTUATION
    return is_content_token(text, start, end)


def span_scores(
    text: str,
    spans: Sequence[Span],
    deltas: Sequence[tuple[TokenScore, float]],
    token_filter: TokenFilter = "content",
) -> list[float]:
    """Largest counted token delta inside each character span of `text` (NO_CONTENT if none)."""
    scores = [NO_CONTENT] * len(spans)
    for tok, delta in deltas:
        if not counts(text, tok.start, tok.end, token_filter):
            continue
        mid = (tok.start + tok.end) / 2
        for i, (s, e) in enumerate(spans):
            if s <= mid < e:
                scores[i] = max(scores[i], delta)
                break
    return scores


def contrastive_scores(
    text: str,
    spans: Sequence[Span],
    with_image: ScoreResult,
    without_image: ScoreResult,
    *,
    mode: ScoreMode = "log_ratio",
    token_filter: TokenFilter = "content",
) -> list[float]:
    return span_scores(text, spans, token_deltas(with_image, without_image, mode), token_filter)


@dataclass
class RatedSentence:
    """One sentence of a rated text and what the filter made of it."""

    text: str
    """The whole sentence, cleaned of markdown emphasis."""
    score: float
    """Its best unit score: the sentence's score in sentence mode, its best clause's in clause mode."""
    kept: str | None
    """What survives: the sentence, or in clause mode the sentence with failing clauses pruned;
    None when no unit passed."""
    unit_scores: list[float] = field(default_factory=list)
    """One score per unit (one entry in sentence mode, one per clause in clause mode)."""


def units_of(text: str, *, truncated: bool = False) -> list[Span]:
    """The sentence spans a filter rates; a cut-off last sentence of a truncated text is left out."""
    spans = split_spans(text)
    return drop_unterminated_tail(text, spans) if truncated else spans


def select(
    text: str,
    sentence_spans: Sequence[Span],
    deltas: Sequence[tuple[TokenScore, float]],
    *,
    unit: FilterUnit,
    threshold: float,
    token_filter: TokenFilter = "content",
) -> list[RatedSentence]:
    """Score every unit of every sentence and keep those above `threshold` (strictly)."""
    per_sentence = [
        clause_spans(text, span) if unit == "clause" else [span] for span in sentence_spans
    ]
    flat = [u for units in per_sentence for u in units]
    flat_scores = iter(span_scores(text, flat, deltas, token_filter))
    rated = []
    for span, units in zip(sentence_spans, per_sentence, strict=True):
        scores = [next(flat_scores) for _ in units]
        passing = [u for u, s in zip(units, scores, strict=True) if s != NO_CONTENT and s > threshold]
        kept = None
        if passing:
            if len(passing) == len(units):
                kept = clean(text[span[0] : span[1]])
            else:
                kept = _pruned(text, span, passing)
        rated.append(RatedSentence(clean(text[span[0] : span[1]]), max(scores), kept, scores))
    return rated


def _pruned(text: str, span: Span, passing: Sequence[Span]) -> str:
    """The passing clauses of a sentence joined again, ending with the sentence's punctuation."""
    body = ", ".join(clean(text[s:e]).rstrip(",;") for s, e in passing)
    end = terminal(text, span)
    if end and not body.endswith(end):
        body = body.rstrip(".!?\u2026 ") + end
    return body


_YES = {"yes", "y", "true", "correct"}
_NO = {"no", "n", "false", "incorrect"}


def yesno_score(result: GenerateResult, values: str = "logprobs") -> float:
    """P(yes) - P(no) from the first generated token's alternatives, else from the text.

    With `values="logits"` the alternatives are raw logits: the best yes and no are compared
    (tanh of half their difference: P(yes) - P(no) renormalised over the two)."""
    if result.top_logprobs and values == "logits":
        first = result.top_logprobs[0]
        yes = [v for tok, v in first.items() if tok.strip().lower() in _YES]
        no = [v for tok, v in first.items() if tok.strip().lower() in _NO]
        if yes and no:
            return math.tanh((max(yes) - max(no)) / 2)
        if yes or no:
            return 1.0 if yes else -1.0
    elif result.top_logprobs:
        first = result.top_logprobs[0]
        p_yes = sum(math.exp(lp) for tok, lp in first.items() if tok.strip().lower() in _YES)
        p_no = sum(math.exp(lp) for tok, lp in first.items() if tok.strip().lower() in _NO)
        if p_yes or p_no:
            return p_yes - p_no
    word = result.text.strip().split()[0].strip(".,!").lower() if result.text.strip() else ""
    if word in _YES:
        return 1.0
    if word in _NO:
        return -1.0
    return 0.0
