"""A DataFlow-compatible step storage: JSONL/JSON in, one file out per operator step.

Mirrors DataFlow's `FileStorage`: `step()` advances the operator step; `read()` reads the current
step's file (step 0 is `first_entry_file_name`); `write()` writes the next step's file under
`cache_path` as `{file_name_prefix}_{N}.{cache_type}`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

CacheType = Literal["json", "jsonl"]


class FileStorage:
    def __init__(
        self,
        first_entry_file_name: str,
        cache_path: str = "./cache",
        file_name_prefix: str = "dataflow_cache",
        cache_type: CacheType = "jsonl",
    ) -> None:
        if cache_type not in ("json", "jsonl"):
            raise ValueError(f"cache_type must be 'json' or 'jsonl', not {cache_type!r}")
        self.first_entry_file_name = first_entry_file_name
        self.cache_path = cache_path
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self.operator_step = -1
        self.writes = 0

    def step(self) -> FileStorage:
        self.operator_step += 1
        return self

    def reset(self) -> FileStorage:
        self.operator_step = -1
        return self

    def file_for_step(self, step: int) -> Path:
        if step == 0:
            return Path(self.first_entry_file_name)
        return Path(self.cache_path) / f"{self.file_name_prefix}_{step}.{self.cache_type}"

    def read(self, output_type: Literal["dataframe", "dict"] = "dataframe") -> Any:
        step = max(self.operator_step, 0)
        rows = read_rows(self.file_for_step(step))
        if output_type == "dict":
            return rows
        if output_type == "dataframe":
            import pandas as pd

            return pd.DataFrame(rows)
        raise ValueError(f"unsupported output_type {output_type!r}")

    def write(self, data: Any) -> str:
        """Write the next step's file; accepts a DataFrame or a list of dicts."""
        if hasattr(data, "to_dict"):
            rows = data.to_dict(orient="records")
        elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
            rows = data
        else:
            raise ValueError(f"unsupported data type {type(data).__name__}")
        path = self.file_for_step(max(self.operator_step, 0) + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            if self.cache_type == "jsonl":
                for row in rows:
                    f.write(json.dumps(_clean(row), ensure_ascii=False) + "\n")
            else:
                json.dump([_clean(r) for r in rows], f, ensure_ascii=False, indent=2)
        os.replace(tmp, path)
        self.writes += 1
        return str(path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .json (array) or .jsonl file. A malformed JSONL line becomes a row holding the
    raw text under `_raw` and the parse error under `_error`, so the operator can report it."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json input must hold an array of objects")
        bad = {"_error": "not an object"}
        return [r if isinstance(r, dict) else {"_raw": json.dumps(r), **bad} for r in data]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rows.append(parse_jsonl_line(line, n))
    return rows


def parse_jsonl_line(line: str, lineno: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"_raw": line, "_error": f"line {lineno}: invalid JSON: {exc.msg}"}
    if not isinstance(row, dict):
        return {"_raw": line, "_error": f"line {lineno}: expected a JSON object"}
    return row


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (pandas' missing value) -> None so the JSON stays valid."""
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and v != v:
            v = None
        out[k] = v
    return out
