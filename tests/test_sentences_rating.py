"""Sentence splitting, content tokens and the two rating rules."""

from __future__ import annotations

import math

import pytest

from scalecap.backends.base import GenerateResult, ScoreResult, TokenScore, char_offsets
from scalecap.objects import normalise_object, same_object
from scalecap.rating import NO_CONTENT, contrastive_scores, select, token_deltas, units_of, yesno_score
from scalecap.sentences import (
    clause_spans,
    drop_unterminated_tail,
    is_content_token,
    sentence_spans,
    split_sentences,
    split_spans,
)


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
    scores = contrastive_scores(text, spans, with_img, without, mode="prob_diff")
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
    assert contrastive_scores(text, [(0, 7)], a, b, mode="prob_diff") == [pytest.approx(0.8)]
    assert contrastive_scores(text, [(0, 7)], a, b, mode="log_ratio") == [pytest.approx(math.log(9))]


def test_yesno_score_from_logprobs_and_text():
    r = GenerateResult(text="Yes", top_logprobs=[{"Yes": math.log(0.7), " no": math.log(0.2), "x": -5}])
    assert yesno_score(r) == pytest.approx(0.5)
    assert yesno_score(GenerateResult(text="No, it is not.")) == -1.0
    assert yesno_score(GenerateResult(text="yes.")) == 1.0
    assert yesno_score(GenerateResult(text="maybe")) == 0.0


def test_normalise_object_keeps_the_name_as_written():
    assert normalise_object(" The  Red Car. ") == "Red Car"
    assert normalise_object("an apple") == "apple"
    assert normalise_object("this painting") == "painting"
    assert normalise_object("the Eiffel Tower") == "Eiffel Tower"


def test_char_offsets_of_decoded_pieces():
    assert char_offsets(["A", " red", " car", "."], "A red car.") == [(0, 1), (1, 5), (5, 9), (9, 10)]
    assert char_offsets(["\ufffd", "b"], "éb")[1] == (1, 2)


def test_closing_quotes_stay_with_their_sentence():
    text = 'The sign reads "OPEN." The door is (half open.) She said \u201chello!\u201d Done.'
    assert split_sentences(text) == [
        'The sign reads "OPEN."', "The door is (half open.)", "She said \u201chello!\u201d", "Done."]


def test_markdown_headings_rules_and_bullets_are_not_sentences():
    text = ("# Overview\n## The scene\n**Objects:**\n---\n- A red car.\n* A **blue** bus.\n"
            "2) Three cats\n\u2022 A dog.")
    assert split_sentences(text) == ["A red car.", "A blue bus.", "Three cats", "A dog."]
    spans = split_spans(text)
    assert text[spans[0][0] : spans[0][1]] == "A red car."  # the marker is outside the span


def test_clauses_split_at_commas_but_not_inside_numbers():
    text = "A red car, a dog, and 1,000 bricks."
    clauses = [text[s:e] for s, e in clause_spans(text, (0, len(text)))]
    assert clauses == ["A red car", "a dog", "and 1,000 bricks."]


def test_cut_tail_is_dropped_only_when_unterminated():
    text = "A red car. A dog sits on the"
    assert [text[s:e] for s, e in drop_unterminated_tail(text, split_spans(text))] == ["A red car."]
    done = 'A red car. A dog says "woof."'
    assert len(drop_unterminated_tail(done, split_spans(done))) == 2
    listed = "- a red car\n- a dog."
    assert len(units_of(listed, truncated=True)) == 2
    assert units_of("A dog sits on the", truncated=True) == []


def test_singular_and_plural_are_one_object_only_when_both_are_written():
    assert same_object("Cats", "cat") and same_object("cat", "CAT")
    assert same_object("box", "boxes") and same_object("berry", "berries")
    assert same_object("bus", "buses") and same_object("man", "men") and same_object("leaves", "leaf")
    assert same_object("red car", "red cars") and not same_object("red car", "blue car")
    assert not same_object("glass", "grass") and not same_object("house", "horse")


def test_modes_differ_on_the_same_token_probabilities():
    text = "kite"
    a, b = tokens(text, [0.10]), tokens(text, [0.01])
    assert token_deltas(a, b, "prob_diff")[0][1] == pytest.approx(0.09)
    assert token_deltas(a, b, "log_ratio")[0][1] == pytest.approx(math.log(10))
    # logit_diff subtracts whatever the engine returned (raw logits there): the same arithmetic
    assert token_deltas(a, b, "logit_diff")[0][1] == pytest.approx(math.log(10))


def test_select_prunes_failing_clauses_and_keeps_the_full_stop():
    text = "A red car, a unicorn. A dragon, a castle."
    #          A    red  car,  a    unicorn.  A    dragon, a    castle.
    probs_img = [0.2, 0.9, 0.9, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    with_img = tokens(text, probs_img)
    without = tokens(text, [0.2] * 9)
    deltas = token_deltas(with_img, without, "log_ratio")
    spans = split_spans(text)
    clause = select(text, spans, deltas, unit="clause", threshold=0.0)
    assert [r.kept for r in clause] == ["A red car.", None]
    assert clause[0].unit_scores == [pytest.approx(math.log(4.5)), pytest.approx(0.0)]
    sentence = select(text, spans, deltas, unit="sentence", threshold=0.0)
    assert [r.kept for r in sentence] == ["A red car, a unicorn.", None]
    # a unit without content tokens is never kept, whatever the threshold
    habit = token_deltas(tokens("It is.", [0.9, 0.9]), tokens("It is.", [0.1, 0.1]), "log_ratio")
    (rated,) = select("It is.", [(0, 6)], habit, unit="sentence", threshold=-50)
    assert rated.kept is None and rated.score == NO_CONTENT
