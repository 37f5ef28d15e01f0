"""The Lua loader: each transition is `scalecap/fleet/lua/NAME.lua`, run after `lib.lua`.

Every script opens with a header (`--[[ ... ]]`) naming the KEYS it uses, its ARGV and its
replies (the names in scalecap/fleet/outcomes.py). `check_header` holds a script to it: a
`KEYS[i]` its body uses must be declared; tests/test_fleet_scripts.py runs it for every file.
"""

from __future__ import annotations

import re
from importlib import resources

SCRIPTS = ("create_batch", "register_jobs", "claim_chunk", "finish_chunk", "close_batch",
           "cancel_jobs", "expire_lease", "renew_lease", "open_session",
           "touch_session", "close_session")

_KEY_USE = re.compile(r"KEYS\[(\d+)\]")


def _read(name: str) -> str:
    return resources.files("scalecap.fleet.lua").joinpath(f"{name}.lua").read_text()


def header(name: str) -> str:
    """The script's opening `--[[ ... ]]` comment ('' when it has none)."""
    text = _read(name)
    if not text.startswith("--[["):
        return ""
    return text[: text.index("]]") + 2]


def check_header(name: str) -> None:
    """Raise ValueError unless `name`.lua declares, in its header, every KEYS[i] it uses,
    and names its ARGV and its replies."""
    head = header(name)
    if not head:
        raise ValueError(f"{name}.lua has no --[[ header ]]")
    for section in ("KEYS", "ARGV", "Replies"):
        if f"\n  {section}" not in head:
            raise ValueError(f"{name}.lua's header names no {section}")
    declared = {int(i) for i in _KEY_USE.findall(head)}
    used = {int(i) for i in _KEY_USE.findall(_read(name)[len(head):])}
    if used - declared:
        raise ValueError(f"{name}.lua uses KEYS{sorted(used - declared)} its header does not name")


def script_source(name: str) -> str:
    """One transition's Lua: lib.lua (the shared helpers) followed by `name`.lua."""
    return _read("lib") + "\n" + _read(name)


_SOURCES: dict[str, str] = {}


def source(name: str) -> str:
    """`script_source`, read once per process."""
    if name not in _SOURCES:
        _SOURCES[name] = script_source(name)
    return _SOURCES[name]
