"""A step storage with DataFlow's `FileStorage` contract, tolerant of bad input lines.

Same contract as DataFlow's (open-dataflow 1.0.13): `step()` advances the operator step and returns
a copy pinned to it (so a pipeline's steps each keep their own); `read()` reads the current step's
file, step 0 being `first_entry_file_name`; `write()` writes step N+1 as
`{cache_path}/{file_name_prefix}_step{N+1}.{cache_type}`; reading or writing before `step()` is an
error. When DataFlow is installed the class is a `DataFlowStorage`, so a DataFlow pipeline accepts it.

What differs, on purpose: a malformed JSONL line does not fail the whole read but becomes a row
with `_raw`/`_error`, so the operator gives that row an error record; writes are atomic (a temp
file renamed into place); in CSV, dict and list cells are written as JSON text.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from scalecap.dataflow.compat import StorageBase

CacheType = Literal["json", "jsonl", "csv", "parquet"]
CACHE_TYPES = ("json", "jsonl", "csv", "parquet")
NOT_STEPPED = (
    "You must call storage.step() before reading or writing data. "
    "Please call storage.step() first for each operator step."
)


class FileStorage(StorageBase):  # type: ignore[misc, valid-type]
    def __init__(
        self,
        first_entry_file_name: str,
        cache_path: str = "./cache",
        file_name_prefix: str = "dataflow_cache_step",
        cache_type: CacheType = "jsonl",
    ) -> None:
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"cache_type must be one of {CACHE_TYPES}, not {cache_type!r}")
        self.first_entry_file_name = first_entry_file_name
        self.cache_path = cache_path
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self.operator_step = -1
        self.writes = 0
        self.last_written: str | None = None
        """Path of the last file this copy wrote."""

    def step(self) -> FileStorage:
        """Advance to the next operator step; returns a copy that stays on that step."""
        self.operator_step += 1
        return copy.copy(self)

    def reset(self) -> FileStorage:
        self.operator_step = -1
        return self

    def file_for_step(self, step: int) -> Path:
        if step < 0:
            raise ValueError(NOT_STEPPED)
        if step == 0:
            return Path(self.first_entry_file_name)
        return Path(self.cache_path) / f"{self.file_name_prefix}_step{step}.{self.cache_type}"

    def get_keys_from_dataframe(self) -> list[str]:
        """Column names of the current step (DataFlow's pipeline checks keys with this)."""
        return list(self.read("dataframe").columns)

    def read(self, output_type: Literal["dataframe", "dict"] = "dataframe") -> Any:
        if self.operator_step < 0:
            raise ValueError(NOT_STEPPED)
        if output_type not in ("dataframe", "dict"):
            raise ValueError(f"unsupported output_type {output_type!r}")
        path = self.file_for_step(self.operator_step)
        if self.operator_step == 0 and self.first_entry_file_name == "":
            rows: list[dict[str, Any]] = []
        else:
            rows = read_rows(path)
        if output_type == "dict":
            return rows
        import pandas as pd

        return pd.DataFrame(rows)

    def write(self, data: Any) -> str:
        """Write the next step's file; accepts a DataFrame or a list of dicts. Returns its path."""
        if self.operator_step < 0:
            raise ValueError(NOT_STEPPED)
        if hasattr(data, "to_dict"):
            rows = data.to_dict(orient="records")
        elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
            rows = data
        else:
            raise ValueError(f"unsupported data type {type(data).__name__}")
        rows = [_clean(r) for r in rows]
        path = self.file_for_step(self.operator_step + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        _write(tmp, rows, self.cache_type)
        os.replace(tmp, path)
        self.writes += 1
        self.last_written = str(path)
        return str(path)


def _write(path: Path, rows: list[dict[str, Any]], cache_type: str) -> None:
    if cache_type == "jsonl":
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    elif cache_type == "json":
        with path.open("w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=2, default=_json_default)
    else:
        import pandas as pd

        if cache_type == "csv":
            text_rows = [{k: _csv_cell(v) for k, v in r.items()} for r in rows]
            pd.DataFrame(text_rows).to_csv(path, index=False)
        else:
            pd.DataFrame(rows).to_parquet(path, index=False)


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a .json (array), .jsonl, .csv or .parquet file. A malformed JSONL line becomes a row
    holding the raw text under `_raw` and the parse error under `_error`, so the operator can
    report it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        df = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        return json.loads(df.to_json(orient="records", force_ascii=False))
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
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
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _csv_cell(value: Any) -> Any:
    """A dict or list cell as JSON text (pandas would write Python's repr)."""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    return value


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays (from pandas frames) as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
