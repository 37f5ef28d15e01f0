"""The benchmarks still run end to end and print their tables (tiny sizes; numbers not judged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_bench(*args: str, timeout: int = 400) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.mark.engine
def test_chain_throughput_bench_runs(tmp_path):
    out = tmp_path / "r.json"
    r = run_bench("bench.chain_throughput", "--num-images", "4", "--repeats", "1", "--warmup-images", "1",
                  "--output-json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Speedup vs serial (x, larger is better)" in r.stdout
    res = json.loads(out.read_text())
    assert res["num_images"] == 4 and res["failed_records"] == 0
    assert res["speedup_vs_serial"] > 0 and res["fraction_of_lower_bound"] > 0


@pytest.mark.services
def test_queue_overhead_bench_runs(tmp_path):
    out = tmp_path / "q.json"
    r = run_bench("bench.queue_overhead", "--jobs", "40", "--repeats", "1", "--warmup-jobs", "5",
                  "--concurrency", "2", "--output-json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Fleet K=16 / bare throughput (ratio)" in r.stdout and "Fleet K=1, scripted VLM" in r.stdout
    res = json.loads(out.read_text())
    assert res["bare"]["images_per_s"] > 0 and res["fleet"]["16"]["images_per_s"] > 0
    k1, k16 = res["fleet"]["1"], res["fleet"]["16"]
    assert k1["redis_commands_per_image"] > k16["redis_commands_per_image"] > 0  # chunks save commands
    assert k1["redis_commands_per_image"] > res["bare"]["redis_commands_per_image"] > 0
    assert k16["redis_commandstats_usec_per_image"] > 0 and set(res["targets_met"]) == {
        "commands_per_image_le_14", "redis_usec_per_image_le_100", "fleet_ge_0_9_bare",
        "protocol_only_ge_0_9_bare"}
    assert res["protocol_only"]["images_per_s"] > 0 and "Protocol only K=16" in r.stdout
