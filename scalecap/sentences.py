"""Splitting captions into sentences and clauses, and deciding which tokens carry content.

Everything here works on character spans of the original text, because token scores come with
character offsets: a unit's score is read from the tokens inside its span. Contrastive rating
looks only at content tokens: function words and punctuation are predicted by language habit
whether or not the model sees the image, so they would only add noise.
"""

from __future__ import annotations

import re

Span = tuple[int, int]

# Abbreviations whose period does not end a sentence.
_ABBREV = {"mr", "mrs", "ms", "dr", "vs", "e.g", "i.e", "approx", "jr", "sr", "prof", "cf"}
_AMBIGUOUS = {"no", "etc", "st", "mt", "ft"}
"""Words that end sentences as often as they abbreviate ("The sign says no." / "No. 5"): like a
single letter ("Plan B." / "J. Smith") or an initialism ("U.S."), their period ends the sentence
only when the next word starts one (see `_starts_sentence`)."""
_CLOSERS = "\"'\u201d\u2019)]\u00bb*_"
"""What may follow a sentence's final punctuation and still belong to it: quotes, brackets and
markdown emphasis (`The sign reads "OPEN."`)."""
_END = re.compile(r"(?:[.!?]+|\u2026)[" + re.escape(_CLOSERS) + r"]*(?=\s|$)")
_TERMINAL = re.compile(r"(?:[.!?]+|\u2026)[" + re.escape(_CLOSERS) + r"]*$")
_LINE = re.compile(r"[^\n]+")
_BULLET = re.compile(r"[ \t]*(?:[-*+\u2022]|\d{1,3}[.)])[ \t]+")
_HEADING = re.compile(
    r"[ \t]*(?:#{1,6}(?:[ \t].*)?|[-*_=]{3,}[ \t]*|\*\*[^*\n]+\*\*:?[ \t]*|__[^_\n]+__:?[ \t]*)"
)
"""Markdown headings (`## Objects`), rules (`---`) and lines that are only bold (`**Scene:**`)."""
_CLAUSE_BREAK = re.compile(r"[,;](?=\s)")
_PREV_WORD = re.compile(r"([\w.]+)$")
_NEXT_WORD = re.compile(r"\s+[\"'\u201c(*_]*([\w']+)")

_FUNCTION_WORDS_TEXT = """
    a an the this that these those there here it its it's they them their theirs he him his she
    her hers we us our you your i me my mine is are was were be been being am has have had
    having do does did doing will would shall should can could may might must of in on at to
    from by with without for about above below under over into onto out up down off through
    between among across along around behind beside besides near next and or but nor so yet if
    then than as while when where which who whom whose what why how also too very quite rather
    just some any all each every both either neither not no there's image picture photo
    photograph shows showing shown appears appear seems seem visible can see seen depicts
    depicting features featuring includes including
"""
FUNCTION_WORDS = frozenset(_FUNCTION_WORDS_TEXT.split())

_WORD = re.compile(r"[\w'-]+", re.UNICODE)


def split_spans(text: str) -> list[Span]:
    """Character spans of the sentences of `text`, in order.

    A sentence ends at . ! ? or an ellipsis followed by whitespace (closing quotes, brackets and
    emphasis markers stay with it), and at every line break (list-style captions). Markdown
    headings, rules and bold-only lines are not sentences; a bullet or number marker at the
    start of a line is not part of its sentence. Abbreviations such as "e.g." and "Dr.", decimals
    such as "3.5", and a period followed by a lowercase word stay inside their sentence. After a
    single letter, "no" or "etc" the period ends the sentence only when a capitalised function
    word follows ("labeled B. A man waits"), not a name or number ("J. Smith", "No. 5"). Spans
    without a letter or digit are left out.
    """
    spans: list[Span] = []
    for line in _LINE.finditer(text):
        lo, hi = line.span()
        if _HEADING.fullmatch(text, lo, hi):
            continue
        bullet = _BULLET.match(text, lo, hi)
        start = bullet.end() if bullet else lo
        for m in _END.finditer(text, start, hi):
            if m.group(0).startswith(".") and not m.group(0).startswith(".."):
                prev = _PREV_WORD.search(text, start, m.start())
                word = prev.group(1).lower() if prev else ""
                nxt = _NEXT_WORD.match(text, m.end(), hi)
                following = nxt.group(1) if nxt else ""
                if word in _ABBREV or following[:1].islower():
                    continue  # "e.g.", "Dr.", "3 ft. tall": the sentence goes on
                if _ambiguous(word) and not _starts_sentence(following):
                    continue  # "No. 5", "J. Smith", "U.S. Capitol": an initial or a number sign
            _add(text, spans, start, m.end())
            start = m.end()
        _add(text, spans, start, hi)
    return spans


_INITIALISM = re.compile(r"(?:[a-z]\.)+[a-z]")


def _ambiguous(word: str) -> bool:
    return word in _AMBIGUOUS or (len(word) == 1 and word.isalpha()) or bool(_INITIALISM.fullmatch(word))


def _starts_sentence(word: str) -> bool:
    """A capitalised function word ("A", "The", "It", "There") starts a sentence; a name after
    an initial ("Smith") or a number after "No." does not."""
    return word[:1].isupper() and word.lower() in FUNCTION_WORDS


def _add(text: str, spans: list[Span], start: int, end: int) -> None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if any(ch.isalnum() for ch in text[start:end]):
        spans.append((start, end))


def clean(fragment: str) -> str:
    """A span's text for people: markdown emphasis markers removed, whitespace collapsed."""
    fragment = fragment.replace("**", "").replace("__", "")
    return re.sub(r"\s+", " ", fragment).strip()


def split_sentences(text: str) -> list[str]:
    """Sentences of a caption, in order, cleaned (see `split_spans`)."""
    return [clean(text[s:e]) for s, e in split_spans(text)]


def clause_spans(text: str, span: Span) -> list[Span]:
    """Comma (and semicolon) clauses of one sentence span. "1,000" does not split."""
    start, end = span
    out: list[Span] = []
    for m in _CLAUSE_BREAK.finditer(text, start, end):
        _add(text, out, start, m.start())
        start = m.end()
    _add(text, out, start, end)
    return out or [span]


def is_terminated(text: str, span: Span) -> bool:
    """True when the span ends with sentence-final punctuation (possibly closed by quotes)."""
    return _TERMINAL.search(text, span[0], span[1]) is not None


def terminal(text: str, span: Span) -> str:
    """The sentence-final punctuation of a span ('' when it has none)."""
    m = _TERMINAL.search(text, span[0], span[1])
    return m.group(0).replace("*", "").replace("_", "") if m else ""


def drop_unterminated_tail(text: str, spans: list[Span]) -> list[Span]:
    """Spans without the last one when it was cut off mid-sentence (the text hit a token limit).

    Only the final span can be cut: earlier ones ended at punctuation or at a line break.
    """
    if spans and spans[-1][1] >= len(text.rstrip()) and not is_terminated(text, spans[-1]):
        return spans[:-1]
    return spans


def sentence_spans(text: str, sentences: list[str]) -> list[Span]:
    """Character spans of `sentences` (as split from `text`) inside `text`, in order."""
    spans = []
    pos = 0
    for s in sentences:
        idx = text.find(s, pos)
        if idx == -1:  # cleaned text (emphasis removed): fall back to the first word's position
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
