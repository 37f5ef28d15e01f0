"""Object names from the model's lists: kept as written, compared without regard to case or number.

"Eiffel Tower", "McDonald's" and "iPhone" are names: lowercasing them loses what the caption
said, so a name keeps its spelling and only its leading article or demonstrative goes ("the",
"this"). Two names are one object when they match ignoring case, or when one is a plural form of
the other and both forms were listed ("bus" and "buses"): a plural is never guessed back to a
singular that nobody wrote, so "glasses" alone stays "glasses".
"""

from __future__ import annotations

import re

_LEADING = re.compile(r"^(?:the|a|an|some|this|that|these|those)\s+", re.IGNORECASE)

_IRREGULAR = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "foot": "feet",
    "tooth": "teeth", "mouse": "mice", "goose": "geese", "leaf": "leaves", "knife": "knives",
    "shelf": "shelves", "wolf": "wolves", "loaf": "loaves", "half": "halves", "life": "lives",
    "wife": "wives", "calf": "calves", "scarf": "scarves", "sheep": "sheep", "fish": "fish",
    "deer": "deer", "cactus": "cacti", "die": "dice", "ox": "oxen",
}


def normalise_object(name: str) -> str:
    """A name as written, without surrounding punctuation, extra spaces or a leading article."""
    name = name.strip().strip(".:;,!?\"'`*_").strip()
    name = re.sub(r"\s+", " ", name)
    while True:
        shorter = _LEADING.sub("", name, count=1)
        if shorter == name:
            return name.strip()
        name = shorter


def plural_forms(word: str) -> set[str]:
    """Plural spellings of an English noun (lowercase), regular and irregular."""
    w = word.lower()
    forms = {w + "s", w + "es"}
    if w in _IRREGULAR:
        forms.add(_IRREGULAR[w])
    if len(w) > 1 and w.endswith("y") and w[-2] not in "aeiou":
        forms.add(w[:-1] + "ies")
    if w.endswith("f"):
        forms.add(w[:-1] + "ves")
    if w.endswith("fe"):
        forms.add(w[:-2] + "ves")
    return forms


def same_object(a: str, b: str) -> bool:
    """Whether two normalised names are one object: equal ignoring case, or singular and plural."""
    x, y = a.lower().split(), b.lower().split()
    if not x or len(x) != len(y) or x[:-1] != y[:-1]:
        return False
    return x[-1] == y[-1] or y[-1] in plural_forms(x[-1]) or x[-1] in plural_forms(y[-1])


class ObjectNames:
    """Names in the order first seen, each object once (its first spelling kept)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __contains__(self, name: str) -> bool:
        return any(same_object(name, n) for n in self.names)

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str) -> bool:
        """Add a name unless its object is already there; True when added."""
        if not name or name in self:
            return False
        self.names.append(name)
        return True
