"""The chain's prompt templates by name, and replacing any of them from a TOML file.

A prompts file lets a user run any wording (the authors' own, for one) without the project
shipping it. Each template is checked when the file is loaded: a placeholder it needs but lacks,
or one the chain does not fill, is one clear error line naming the template, not a KeyError in
the middle of a batch. The templates travel inside the config (so a worker never reads a path)
and are part of its hash.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from scalecap import prompts as ours
from scalecap.errors import ConfigError


@dataclass(frozen=True)
class Templates:
    """Every text the chain sends, with the placeholders each one is formatted with."""

    system: str = ours.DEFAULT_SYSTEM
    """System prompt of every call with the image, and of both scoring passes."""
    text_system: str = ours.TEXT_SYSTEM
    """System prompt of the text-only calls (instructions, fusion)."""
    caption: str = ours.INIT_CAPTION
    yesno: str = ours.YESNO
    questions: str = ours.SENTENCE_TO_INSTRUCTIONS
    object_question: str = ours.OBJECT_QUESTION
    position_question: str = ours.POSITION_QUESTION
    collect_objects: str = ours.COLLECT_OBJECTS
    extract_positions: str = ours.EXTRACT_POSITIONS
    final_caption: str = ours.FINAL_CAPTION
    object_section: str = ours.OBJECT_SECTION
    position_section: str = ours.POSITION_SECTION


PLACEHOLDERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # name: (required, also allowed)
    "system": (frozenset(), frozenset()),
    "text_system": (frozenset(), frozenset()),
    "caption": (frozenset(), frozenset()),
    "yesno": (frozenset({"sentence"}), frozenset()),
    "questions": (frozenset({"sentence"}), frozenset()),
    "object_question": (frozenset({"object"}), frozenset()),
    "position_question": (frozenset({"object"}), frozenset()),
    "collect_objects": (frozenset({"details"}), frozenset()),
    "extract_positions": (frozenset({"details"}), frozenset()),
    "final_caption": (frozenset({"golden"}), frozenset({"sections", "objects", "positions"})),
    "object_section": (frozenset({"text"}), frozenset()),
    "position_section": (frozenset({"text"}), frozenset()),
}
"""final_caption also needs {sections} (the two sections below, each left out when empty) or
{objects} and {positions} (the collected texts, possibly empty) to carry the details."""

NAMES = tuple(f.name for f in fields(Templates))
assert set(NAMES) == set(PLACEHOLDERS)


_BRACES = "write a literal brace as {{ or }}"


def _fields_of(name: str, template: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"prompts: template {name!r}: {exc} ({_BRACES})") from None
    found = set()
    for _, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if not field_name.isidentifier() or spec or conversion:
            raise ConfigError(
                f"prompts: template {name!r}: placeholder {{{field_name}}} must be a plain name "
                f"({_BRACES})"
            )
        found.add(field_name)
    return found


def validate_prompts(data: Any) -> dict[str, str]:
    """Check a name -> template table; returns it as a plain dict of strings."""
    if not isinstance(data, dict):
        raise ConfigError("prompts must be a table of template name = text")
    unknown = sorted(set(data) - set(NAMES))
    if unknown:
        raise ConfigError(f"prompts: unknown template(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
    out: dict[str, str] = {}
    for name, text in data.items():
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"prompts: template {name!r} must be non-empty text")
        required, optional = PLACEHOLDERS[name]
        found = _fields_of(name, text)
        missing = sorted(required - found)
        if missing:
            need = ", ".join("{" + m + "}" for m in missing)
            raise ConfigError(f"prompts: template {name!r} lacks the placeholder(s) {need}")
        extra = sorted(found - required - optional)
        if extra:
            allowed = ", ".join("{" + m + "}" for m in sorted(required | optional)) or "none"
            bad = ", ".join("{" + m + "}" for m in extra)
            raise ConfigError(
                f"prompts: template {name!r} has unknown placeholder(s) {bad}; it takes {allowed}"
            )
        if name == "final_caption" and "sections" not in found and not {"objects", "positions"} <= found:
            raise ConfigError(
                "prompts: template 'final_caption' needs {sections}, or both {objects} and {positions}"
            )
        out[name] = text
    return out


def load_prompts(path: str | Path) -> dict[str, str]:
    """Templates from a TOML file (top level, or a [prompts] table), validated."""
    import tomllib

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read prompts file {p}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prompts file {p}: invalid TOML: {exc}") from None
    data = data.get("prompts", data) if isinstance(data.get("prompts"), dict) else data
    try:
        return validate_prompts(data)
    except ConfigError as exc:
        raise ConfigError(f"prompts file {p}: {str(exc).removeprefix('prompts: ')}") from None


def templates_for(config: Any) -> Templates:
    """The templates of a config: ours, replaced by its `prompts`, and its system prompt fields last."""
    chosen: dict[str, str] = dict(config.prompts or {})
    if config.system_prompt:
        chosen["system"] = config.system_prompt
    if config.text_system_prompt:
        chosen["text_system"] = config.text_system_prompt
    return Templates(**chosen)
