"""The fleet scaling bench runs end to end with real workers (tiny sizes; figures not judged)."""

from __future__ import annotations

import json

import pytest

from tests.test_bench_smoke import run_bench

pytestmark = [pytest.mark.slow, pytest.mark.services]


def test_fleet_scaling_bench_runs(tmp_path):
    out = tmp_path / "s.json"
    r = run_bench("bench.fleet_scaling", "--sizes", "1,2", "--images-per-worker", "6",
                  "--warmup-images", "2", "--latency", "0.05", "--output-json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 worker(s): efficiency (larger is better)" in r.stdout
    res = json.loads(out.read_text())
    assert [x["workers"] for x in res["runs"]] == [1, 2]
    assert [x["images"] for x in res["runs"]] == [6, 12]
    assert res["runs"][0]["efficiency"] == 1.0 and res["runs"][1]["efficiency"] > 0
    assert all(x["redis_commands_per_image"] > 0 for x in res["runs"])
