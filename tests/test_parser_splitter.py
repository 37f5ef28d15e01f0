"""The sentence splitter and the object-list parser on text written the way VLMs and LLMs write.

Every caption and list here was written for these tests, in the style of a 7B VLM's detailed
captions (markdown lists and headings, LaTeX, signs, units, abbreviations); no model output
from anyone's evaluation is used.
"""

from __future__ import annotations

import pytest

from scalecap.sentences import FUNCTION_WORDS, is_content_token, split_sentences
from scalecap.stages.questions import parse_objects

# --- splitter -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        # a single letter or "no" ends a sentence when the next word starts one ...
        ("The sign says no. A dog sits nearby.", ["The sign says no.", "A dog sits nearby."]),
        ("The bus is labeled B. A man waits.", ["The bus is labeled B.", "A man waits."]),
        ("The display reads 36 u. This is a scale.", ["The display reads 36 u.", "This is a scale."]),
        ("Cups, plates, etc. The table is set.", ["Cups, plates, etc.", "The table is set."]),
        ("The flag is from the U.S. It flies high.", ["The flag is from the U.S.", "It flies high."]),
        # ... but not before a name, a number or a lowercase word
        ("A portrait of J. Smith hangs here.", ["A portrait of J. Smith hangs here."]),
        ("The jersey shows No. 23 in white.", ["The jersey shows No. 23 in white."]),
        ("It faces the U.S. Capitol building.", ["It faces the U.S. Capitol building."]),
        ("The pole is about 10 ft. tall and grey.", ["The pole is about 10 ft. tall and grey."]),
        ("A street sign reads St. Mark's Place.", ["A street sign reads St. Mark's Place."]),
        ("A clock shows 3 p.m. and the sky is bright.", ["A clock shows 3 p.m. and the sky is bright."]),
        ("Dr. Lee stands by a sign, e.g. a board.", ["Dr. Lee stands by a sign, e.g. a board."]),
    ],
)
def test_splitter_cases(text, sentences):
    assert split_sentences(text) == sentences


MARKDOWN_CAPTION = """\
The image shows a small corner shop at dusk.

### Key Elements
1. **Storefront**: A green awning reads "FRESH FRUIT & VEG." Below it, crates hold apples.
2. **Signage**:
   - A chalkboard lists prices: apples $1.50/lb, pears $2.00/lb.
   - A red sign says "NO PARKING 8 a.m. - 6 p.m." It is mounted on a pole.
3. **People**: A woman in a 3/4-length coat pays at the counter.

---
**Overall**, the scene feels calm... The light is warm.
"""


def test_a_markdown_caption_splits_into_its_sentences():
    assert split_sentences(MARKDOWN_CAPTION) == [
        "The image shows a small corner shop at dusk.",
        'Storefront: A green awning reads "FRESH FRUIT & VEG."',
        "Below it, crates hold apples.",
        "Signage:",
        "A chalkboard lists prices: apples $1.50/lb, pears $2.00/lb.",
        'A red sign says "NO PARKING 8 a.m. - 6 p.m."',
        "It is mounted on a pole.",
        "People: A woman in a 3/4-length coat pays at the counter.",
        "Overall, the scene feels calm...",
        "The light is warm.",
    ]


LATEX_CAPTION = (
    "A whiteboard shows the formula $E = mc^2$ in blue marker. Below it, the expression "
    "\\(a^2 + b^2 = c^2\\) is underlined. The constant \\(\\pi \\approx 3.14\\) is circled. "
    "A note reads: \"approx. 9.81 m/s\u00b2.\" The room temperature display shows 21.5 \u00b0C."
)


def test_a_caption_with_latex_units_and_decimals():
    assert split_sentences(LATEX_CAPTION) == [
        "A whiteboard shows the formula $E = mc^2$ in blue marker.",
        "Below it, the expression \\(a^2 + b^2 = c^2\\) is underlined.",
        "The constant \\(\\pi \\approx 3.14\\) is circled.",
        'A note reads: "approx. 9.81 m/s\u00b2."',
        "The room temperature display shows 21.5 \u00b0C.",
    ]


def test_one_counts_as_content():
    assert "one" not in FUNCTION_WORDS
    text = "Only one cup is on the table."
    start = text.index("one")
    assert is_content_token(text, start, start + 3)


# --- object list parser -----------------------------------------------------------------------------


def test_real_objects_are_kept_as_written():
    reply = "\n".join([
        "Describe more details about the objects on the table.",
        "Describe more details about the sentence written on the chalkboard.",
        "Describe more details about this painting.",
        "Describe more details about the small wooden sign hanging above the bakery door.",
        "Describe more details about the Eiffel Tower.",
        "Describe more details about the McDonald's logo.",
        "Describe more details about the iPhone.",
        "Describe more details about the eiffel tower.",
    ])
    assert parse_objects(reply) == [
        "objects on the table",
        "sentence written on the chalkboard",
        "painting",
        "small wooden sign hanging above the bakery door",  # nine words
        "Eiffel Tower",
        "McDonald's logo",
        "iPhone",
    ]


def test_plurals_merge_only_when_both_forms_are_listed():
    reply = "\n".join(f"Describe more details about the {x}." for x in (
        "bus", "glasses", "buses", "Cats", "cat", "leaves", "leaf", "boxes"))
    assert parse_objects(reply) == ["bus", "glasses", "Cats", "leaves", "boxes"]
    assert parse_objects("- glasses\n- wine glass") == ["glasses", "wine glass"]


def test_chat_and_vague_lines_are_still_refused():
    reply = "\n".join([
        "Sure, here are the instructions:",
        "Describe more details about the following objects:",
        "Describe more details about each item.",
        "Note: the sky is not an object.",
        "- Red car",
        "- Big Ben",
        "- Coca-Cola can",
        "- Wooden chair by the Door",
        "- Objects: none",
        "Describe more details about it.",
        "Describe more details about the dog, which is brown.",
    ])
    assert parse_objects(reply) == ["red car", "Big Ben", "Coca-Cola can", "Wooden chair by the Door", "dog"]
