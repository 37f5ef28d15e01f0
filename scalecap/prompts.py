"""Our own prompt wording for every call of the chain, in one place so it can be read together."""

from __future__ import annotations

DEFAULT_SYSTEM = (
    "You are a careful visual assistant. You describe only what can actually be seen in the image, "
    "precisely and without speculation."
)

INIT_CAPTION = (
    "Describe this image in fine detail. Cover the overall scene, every object you can see with its "
    "colour, shape, size and material, how the objects relate to each other, where each one is in "
    "the picture, and any visible text. Write plain, complete sentences."
)

YESNO = (
    'Is the following statement about this image correct?\nStatement: "{sentence}"\n'
    "Answer with a single word: yes or no."
)

# Text-only: the language model reads golden sentences and names their objects.
LIST_OBJECTS = (
    "The sentences below describe one image.\n\n{sentences}\n\n"
    "List each concrete, visible object that these sentences mention, one per line, every line "
    "written exactly as:\nDescribe more details about the <object>.\n"
    "Use the object's shortest clear name. Skip actions, colours, moods and the image itself. "
    "Write nothing else."
)

OBJECT_QUESTION = "Describe more details about the {object}."
POSITION_QUESTION = "Describe more details about the position of the {object}."

SUMMARISE_OBJECTS = (
    "Below are answers about individual objects in one image.\n\n{pairs}\n\n"
    "Summarise the details of every object in a few factual sentences. Keep colours, materials, "
    "counts and text exactly as given. No analysis, no opinions, nothing that is not stated above."
)

SUMMARISE_POSITIONS = (
    "Below are answers about where objects are in one image.\n\n{pairs}\n\n"
    "Summarise the position of every object and how the objects are arranged relative to one "
    "another, in a few factual sentences. No analysis, no opinions, nothing that is not stated above."
)

FINAL_CAPTION = (
    "Write one detailed, fluent description of an image.\n"
    "Basic description (follow it as the backbone):\n{golden}\n\n"
    "Object details:\n{objects}\n\n"
    "Position details:\n{positions}\n\n"
    "Merge the details into the basic description where they fit. Describe only what is stated "
    "above; add no analysis, opinions or guesses. Output the description only."
)


def format_pairs(pairs: list[tuple[str, str]]) -> str:
    return "\n".join(f"Q: {q}\nA: {a}" for q, a in pairs) if pairs else "(none)"


def format_sentences(sentences: list[str]) -> str:
    return "\n".join(f"- {s}" for s in sentences)
