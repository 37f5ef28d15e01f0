"""The seeded nemesis runs end to end on a real fleet and finds nothing (one fixed seed, short).

`python -m bench.chaos` starts its own redis-server, SeaweedFS, workers, I/O worker, API and
receiver, injects at least six kinds of fault, and exits 0 only when every invariant holds. Soak
runs (many seeds, longer) are in docs/protocol.md; this keeps one seed in CI under 3 minutes.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.test_bench_smoke import run_bench

pytestmark = [pytest.mark.slow, pytest.mark.services]

SEED = 20261202
LAST_LINE = re.compile(r"^(\d+) faults of (\d+) kinds injected, (\d+) invariant violations$")


def test_nemesis_one_seed_finds_no_violation(tmp_path):
    out = tmp_path / "chaos.json"
    t0 = time.monotonic()
    r = run_bench("bench.chaos", "--seed", str(SEED), "--minutes", "1.25", "--settle", "45",
                  "--output-json", str(out), timeout=175)
    took = time.monotonic() - t0
    lines = r.stdout.strip().splitlines()
    assert lines, r.stderr[-3000:]
    m = LAST_LINE.match(lines[-1])
    assert m, f"last line: {lines[-1]!r}"
    faults, kinds, violations = map(int, m.groups())
    assert r.returncode == (0 if violations == 0 else 1)
    assert violations == 0 and r.returncode == 0, r.stdout[-6000:]
    assert kinds >= 6 and faults >= kinds
    res = json.loads(out.read_text())
    assert res["violations"] == 0 and res["fault_kinds"] == kinds
    assert sum(res["faults"].values()) == faults
    assert all(c["ok"] for c in res["invariants"]) and len(res["invariants"]) == 7
    assert res["workload"]["by_via"]["cli"] > 0 and res["workload"]["by_via"]["http"] > 0
    assert took < 180, f"the nemesis took {took:.0f} s"
