"""Sentence splitting, content tokens and the two rating rules."""

from __future__ import annotations

import math

import pytest

from scalecap.backends.base import GenerateResult, ScoreResult, TokenScore, char_offsets
from scalecap.rating import NO_CONTENT, contrastive_scores, yesno_score
from scalecap.sentences import is_content_token, normalise_object, sentence_spans, split_sentences


def test_split_sentences_keeps_abbreviations_and_decimals():
    text = "A man, e.g. a runner, is 3.5 m tall. Dr. Smith waves!  Is it raining? Yes.\n- A bullet item"
    assert split_sentences(text) == [
        "A man, e.g. a runner, is 3.5 m tall.",
        "Dr. Smith waves!",
        "Is it raining?",
        "Yes.",
        "A bullet item",
    ]
    assert split_sentences("   ") == []
    assert split_sentences("...") == []


def test_sentence_spans_locate_each_sentence():
    text = "One cat. Two dogs!\nThree birds."
    sents = split_sentences(text)
    spans = sentence_spans(text, sents)
    assert [text[s:e] for s, e in spans] == sents


@pytest.mark.parametrize(
    ("text", "span", "content"),
    [("the red car", (0, 3), False), ("the red car", (4, 7), True), ("a car.", (5, 6), False),
     ("two cars", (0, 3), True), ("the car is.", (8, 11), False), ("3 cars", (0, 1), True),
     ("skateboard", (4, 10), True)],
)
def test_content_tokens(text, span, content):
    assert is_content_token(text, *span) is content


def tokens(text, probs):
    out, pos = [], 0
    for word, p in zip(text.split(" "), probs, strict=True):
        out.append(TokenScore(word, pos, pos + len(word), math.log(p)))
        pos += len(word) + 1
    return ScoreResult(tokens=out)


def test_contrastive_score_is_the_largest_content_delta_per_sentence():
    text = "The cat sleeps. The dog barks."
    spans = sentence_spans(text, split_sentences(text))
    with_img = tokens(text, [0.9, 0.8, 0.5, 0.9, 0.3, 0.2])
    without = tokens(text, [0.1, 0.2, 0.4, 0.1, 0.3, 0.25])
    scores = contrastive_scores(text, spans, with_img, without)
    # "The" is a function word (its delta 0.8 does not count); cat 0.6 is the best of sentence 1
    assert scores[0] == pytest.approx(0.6)
    assert scores[1] == pytest.approx(0.0)


def test_span_without_content_tokens_scores_no_content():
    text = "It is."
    res = tokens(text, [0.9, 0.9])
    assert contrastive_scores(text, [(0, len(text))], res, res) == [NO_CONTENT]


def test_contrastive_aligns_from_the_end_when_lengths_differ():
    text = "red car"
    a = tokens(text, [0.9, 0.9])
    b = ScoreResult(tokens=[TokenScore("x", 0, 0, math.log(0.5)), *tokens(text, [0.1, 0.5]).tokens])
    assert contrastive_scores(text, [(0, 7)], a, b) == [pytest.approx(0.8)]


def test_yesno_score_from_logprobs_and_text():
    r = GenerateResult(text="Yes", top_logprobs=[{"Yes": math.log(0.7), " no": math.log(0.2), "x": -5}])
    assert yesno_score(r) == pytest.approx(0.5)
    assert yesno_score(GenerateResult(text="No, it is not.")) == -1.0
    assert yesno_score(GenerateResult(text="yes.")) == 1.0
    assert yesno_score(GenerateResult(text="maybe")) == 0.0


def test_normalise_object():
    assert normalise_object(" The  Red Car. ") == "red car"
    assert normalise_object("an apple") == "apple"


def test_char_offsets_of_decoded_pieces():
    assert char_offsets(["A", " red", " car", "."], "A red car.") == [(0, 1), (1, 5), (5, 9), (9, 10)]
    assert char_offsets(["\ufffd", "b"], "éb")[1] == (1, 2)
