"""Our own prompt wording for every call of the chain, in one place so it can be read together.

The chain follows the ScaleCap authors' intent (docs/chain.md): each golden sentence becomes
object instructions; the answers are kept grouped under the sentence they came from; fusion first
collects every object detail, then extracts the positions, then organises everything into one
very comprehensive description that follows the golden sentences.
"""

from __future__ import annotations

DEFAULT_SYSTEM = (
    "You are a careful visual assistant. You describe only what can actually be seen in the image, "
    "precisely and without speculation."
)
"""System prompt of every call that carries the image, and of both scoring passes."""

TEXT_SYSTEM = (
    "You are a careful writing assistant. You work only with the text you are given and add "
    "nothing that it does not say."
)
"""System prompt of the text-only calls (instructions from sentences, fusion)."""

INIT_CAPTION = (
    "Describe this image in fine detail. Cover the overall scene, every object you can see with its "
    "colour, shape, size and material, how the objects relate to each other, where each one is in "
    "the picture, and any visible text. Write plain, complete sentences."
)

YESNO = (
    'Is the following statement about this image correct?\nStatement: "{sentence}"\n'
    "Answer with a single word: yes or no."
)

INSTRUCTION_LINE = "Describe more details about the {object}."

# Text-only: one golden sentence in, one instruction per object out (few-shot, our own examples).
SENTENCE_TO_INSTRUCTIONS = (
    "Turn every concrete object that the sentence mentions into one instruction, written exactly "
    'as "Describe more details about the <object>." Use the object\'s shortest clear name. Leave '
    "out actions, colours, moods, the image itself, and objects that the sentence only guesses at "
    '("it might be", "probably"). Write the instructions only, one per line.\n\n'
    "Sentence:\nA woman in a yellow raincoat walks a small dog along a wet street.\n"
    "Instructions:\nDescribe more details about the woman.\nDescribe more details about the raincoat.\n"
    "Describe more details about the dog.\nDescribe more details about the street.\n\n"
    "Sentence:\nOn the desk stand a laptop, two mugs and a lamp, suggesting someone works late.\n"
    "Instructions:\nDescribe more details about the desk.\nDescribe more details about the laptop.\n"
    "Describe more details about the mugs.\nDescribe more details about the lamp.\n\n"
    'Sentence:\nA banner above the door reads "Grand Opening".\n'
    "Instructions:\nDescribe more details about the banner.\nDescribe more details about the door.\n\n"
    "Sentence:\n{sentence}\nInstructions:\n"
)

OBJECT_QUESTION = INSTRUCTION_LINE
POSITION_QUESTION = "Describe more details about the position of the {object}."

COLLECT_OBJECTS = (
    "Descriptions:\n{details}\n\n"
    "From the descriptions above, gather every detail about each object: its appearance, shape and "
    "structure, material, colour, and any markings, text or logos. Keep all of the details rather "
    "than shortening them. Add no analysis and no opinions."
)

EXTRACT_POSITIONS = (
    "Descriptions:\n{details}\n\n"
    "From the descriptions above, take only what they say about where each object is and how the "
    "objects are placed relative to one another, and state it plainly. Add no analysis and no "
    "opinions."
)

FINAL_CAPTION = (
    "Basic context:\n{golden}\n\n"
    "{sections}"
    "Keeping to the order and logic of the basic context, bring together every detail given above "
    "into one very comprehensive description of the image. Describe only what is stated above; add "
    "no analysis and no opinions. Output the description only."
)
OBJECT_SECTION = "Object details:\n{text}\n\n"
POSITION_SECTION = "Position details:\n{text}\n\n"


def format_grouped(groups: list[tuple[str, list[tuple[str, str]]]], label: str) -> str:
    """Answers grouped under the golden sentence their questions came from.

    `groups` is [(golden sentence, [(object, answer), ...]), ...]; sentences without answers are
    left out. `label` starts each answer line ("Details about", "Position of").
    """
    blocks = []
    for sentence, pairs in groups:
        if not pairs:
            continue
        lines = [f"Sentence: {sentence}"] + [f"{label} the {obj}: {answer}" for obj, answer in pairs]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_sentences(sentences: list[str]) -> str:
    return "\n".join(sentences)
