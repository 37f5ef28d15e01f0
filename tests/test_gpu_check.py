"""scripts/gpu_check.sh --cpu end to end: the in-process chain bench on the real vLLM engine (tiny
model), then redis-server, a real `scalecap worker` with its engine and the I/O worker captioning
a batch through the queue, and the one table the GPU run prints. The figures are CPU figures of
a tiny model; what is checked is that every row is there, its number parses, and the fleet
captioned every image.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from bench.gpu_check import TABLE

pytestmark = [pytest.mark.engine, pytest.mark.services, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
NUMERIC_ROWS = [
    "Serial chain (img/s)",
    "Concurrent chain (img/s)",
    "Stage-batched, engine only (img/s)",
    "Fleet, 1 worker through the queue (img/s)",
    "Fleet vs in-process chain (x)",
    "Engine requests per image",
    "Scoring requests per image",
    "Check wall time (s)",
]


def table_rows(text: str) -> dict[str, str]:
    """label -> value of the printed table (bench/report.py's layout: 44 + 20 columns)."""
    start = text.index(f" {TABLE} ")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if line.startswith("="):
            break
        if line.startswith("-") or len(line) < 45:
            continue
        rows[line[:44].strip()] = line[44:].strip()
    return rows


def test_gpu_check_cpu_prints_the_table_and_the_fleet_captions_every_image(tmp_path) -> None:
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--output-json", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = table_rows(run.stdout)
    for label in NUMERIC_ROWS:
        assert label in rows, (label, rows)
        assert float(rows[label]) >= 0, (label, rows[label])
    for label in NUMERIC_ROWS[:4]:
        assert float(rows[label]) > 0, (label, rows[label])
    assert rows["Mode"].startswith("cpu")
    assert re.fullmatch(r"vllm(-cpu)? \d+\.\d+\.\d+\S*", rows["vLLM"]), rows["vLLM"]
    assert rows["GPU memory used, peak (MiB)"] == "n/a"  # no nvidia-smi here
    chain_n, serial_n, fleet_n = (int(x) for x in rows["Images: chain / serial / fleet"].split(" / "))
    assert rows["Fleet images captioned"] == f"{fleet_n}/{fleet_n}"

    result = json.loads(out.read_text())
    fleet = result["fleet"]
    assert fleet["done"] == fleet["records"] == fleet["records_without_error"] == fleet_n
    assert fleet["failed"] == 0
    assert result["chain"]["failed_records"] == 0 and chain_n >= serial_n > 0
    ratio = fleet["images_per_s"] / result["chain"]["concurrent_images_per_s"]
    assert float(rows["Fleet vs in-process chain (x)"]) == pytest.approx(ratio, rel=0.01, abs=0.001)
