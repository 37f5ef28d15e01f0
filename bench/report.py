"""The printed form of every benchmark: a fixed-width table between banners, units in labels.

Other scripts parse it, so the layout is kept stable; `--output-json` writes the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

WIDTH = 64


def print_table(title: str, rows: Iterable[tuple[str, Any]], *, extra: Iterable[str] = ()) -> None:
    """Print `title` in a banner, then `label value` rows, then any extra lines, then a rule."""
    print("=" * WIDTH)
    print(f" {title} ".center(WIDTH, "="))
    print("=" * WIDTH)
    for label, value in rows:
        print(f"{label:<44}{value!s:>20}")
    extra = list(extra)
    if extra:
        print("-" * WIDTH)
        for line in extra:
            print(line)
    print("=" * WIDTH)


def write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
