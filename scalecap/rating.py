"""Sentence rating: is a sentence supported by the image, or by language habit alone?

Contrastive (dual-modality debiasing): teacher-force the text twice under the same prompt, with
and without the image. For each content token, delta = p(token | image) - p(token | no image).
A sentence's score is its largest delta: one token that only the image explains is evidence that
the image, not habit, made the model say it.

Yes/no: ask the VLM whether the sentence is correct for the image; score = P(yes) - P(no) read
from the first generated token's top logprobs (or 1/-1/0 from the text when no logprobs exist).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scalecap.backends.base import GenerateResult, ScoreResult, TokenScore
from scalecap.sentences import is_content_token

NO_CONTENT = -1.0
"""Score of a span without any content token: never golden on its own."""


def token_deltas(with_image: ScoreResult, without_image: ScoreResult) -> list[tuple[TokenScore, float]]:
    """Pair the two teacher-forced passes token by token and return p_img - p_txt per token.

    Both passes score the same continuation text, so their token lists match; if an engine
    tokenised the boundary differently, they are aligned from the end (the continuation's last
    tokens are the same in both).
    """
    a, b = with_image.tokens, without_image.tokens
    n = min(len(a), len(b))
    a, b = a[len(a) - n :], b[len(b) - n :]
    return [(ta, math.exp(ta.logprob) - math.exp(tb.logprob)) for ta, tb in zip(a, b, strict=True)]


def span_scores(
    text: str,
    spans: Sequence[tuple[int, int]],
    deltas: Sequence[tuple[TokenScore, float]],
) -> list[float]:
    """Largest content-token delta inside each character span of `text`."""
    scores = [NO_CONTENT] * len(spans)
    for tok, delta in deltas:
        if not is_content_token(text, tok.start, tok.end):
            continue
        mid = (tok.start + tok.end) / 2
        for i, (s, e) in enumerate(spans):
            if s <= mid < e:
                scores[i] = max(scores[i], delta)
                break
    return scores


def contrastive_scores(
    text: str,
    spans: Sequence[tuple[int, int]],
    with_image: ScoreResult,
    without_image: ScoreResult,
) -> list[float]:
    return span_scores(text, spans, token_deltas(with_image, without_image))


_YES = {"yes", "y", "true", "correct"}
_NO = {"no", "n", "false", "incorrect"}


def yesno_score(result: GenerateResult) -> float:
    """P(yes) - P(no) from the first generated token's alternatives, else from the text."""
    if result.top_logprobs:
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
