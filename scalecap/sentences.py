"""Splitting captions into sentences and deciding which tokens carry content.

Contrastive rating looks only at content tokens: function words and punctuation are predicted by
language habit whether or not the model sees the image, so they would only add noise.
"""

from __future__ import annotations

import re

# Abbreviations whose period does not end a sentence.
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "approx", "no", "jr", "sr"}
_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")

_FUNCTION_WORDS_TEXT = """
    a an the this that these those there here it its it's they them their theirs he him his she
    her hers we us our you your i me my mine is are was were be been being am has have had
    having do does did doing will would shall should can could may might must of in on at to
    from by with without for about above below under over into onto out up down off through
    between among across along around behind beside besides near next and or but nor so yet if
    then than as while when where which who whom whose what why how also too very quite rather
    just some any all each every both either neither one not no there's image picture photo
    photograph shows showing shown appears appear seems seem visible can see seen depicts
    depicting features featuring includes including
"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS_TEXT.split())

_WORD = re.compile(r"[\w'-]+", re.UNICODE)


def split_sentences(text: str) -> list[str]:
    """Sentences of a caption, in order, stripped, empty ones dropped.

    Splits after . ! ? followed by whitespace and at line breaks (list-style captions), keeps
    abbreviations such as "e.g." and "Dr." and decimals such as "3.5" inside their sentence.
    """
    text = text.strip()
    if not text:
        return []
    pieces: list[str] = []
    buf = ""
    for part in _SPLIT.split(text):
        if part is None:
            continue
        buf = f"{buf} {part}".strip() if buf else part.strip()
        if not buf:
            continue
        last_word = buf.rsplit(None, 1)[-1].rstrip(".").lower() if buf.endswith(".") else ""
        if last_word in _ABBREV or (len(last_word) == 1 and last_word.isalpha()):
            continue  # "e.g." or an initial: the sentence goes on
        pieces.append(buf)
        buf = ""
    if buf:
        pieces.append(buf)
    out = []
    for p in pieces:
        p = _BULLET.sub("", p).strip()
        if any(ch.isalnum() for ch in p):
            out.append(p)
    return out


def sentence_spans(text: str, sentences: list[str]) -> list[tuple[int, int]]:
    """Character spans of `sentences` (as split from `text`) inside `text`, in order."""
    spans = []
    pos = 0
    for s in sentences:
        idx = text.find(s, pos)
        if idx == -1:  # the splitter joined lines; fall back to the first word's position
            head = s.split()[0] if s.split() else s
            idx = text.find(head, pos)
            if idx == -1:
                idx = pos
        end = min(len(text), idx + len(s))
        spans.append((idx, end))
        pos = end
    return spans


def is_content_token(text: str, start: int, end: int) -> bool:
    """True for tokens that belong to a content word (not punctuation, not a function word).

    A token is judged by the whole words it touches, so the subword pieces of "skateboard" all
    count and a token such as "is." does not.
    """
    if not any(ch.isalnum() for ch in text[start:end]):
        return False
    for m in _WORD.finditer(text, max(0, start - 64), min(len(text), end + 64)):
        if m.end() <= start or m.start() >= end:
            continue
        word = m.group(0).strip("'-").lower()
        # numbers count as content: counts are visual facts
        if word and word not in FUNCTION_WORDS:
            return True
    return False


def normalise_object(name: str) -> str:
    """Canonical form of an object name for deduplication: lowercase, no article, no plural noise."""
    name = name.strip().strip(".:;,!?\"'`*").strip()
    name = re.sub(r"\s+", " ", name).lower()
    for article in ("the ", "a ", "an ", "some "):
        if name.startswith(article):
            name = name[len(article) :]
    return name.strip()
