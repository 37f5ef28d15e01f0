"""The export bench runs end to end and prints its table (tiny size; the numbers are not judged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.services
@pytest.mark.slow
def test_export_throughput_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    r = subprocess.run([sys.executable, "-m", "bench.export_throughput", "--records", "30", "--repeats", "1",
                        "--concurrency", "2", "--output-json", str(out)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Ratio JSONL now / before (x)" in r.stdout
    res = json.loads(out.read_text())
    assert res["records"] == 30 and res["before_records_per_s"] > 0
    assert res["export_jsonl_records_per_s"] > 0 and res["export_parquet_records_per_s"] > 0
