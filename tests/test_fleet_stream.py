"""Submission streams: a 100k-line manifest goes out in constant memory, and a worker finishes
the first job while the producer is still reading the manifest.

Memory is the producer process's peak RSS growth during the submission (measured in a fresh
process by tests/fleet_stream_probe.py; tracemalloc slows this path about 6x, too much for a
100k-job test on two cores). Holding the rows would cost more than the manifest's size.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fleet_support import REPO, Fleet, make_images

pytestmark = [pytest.mark.services, pytest.mark.slow]

LINES = 100_000


def test_100k_line_manifest_streams(fleet: Fleet):
    worker = fleet.scripted(concurrency=4)
    real = make_images(fleet.tmp / "imgs", ["red", "green", "blue"])
    manifest = fleet.tmp / "big.jsonl"
    with open(manifest, "w") as f:
        for p in real:
            f.write(json.dumps({"image": str(p)}) + "\n")
        pad = "x" * 40
        for i in range(LINES - len(real)):
            f.write(json.dumps({"image": f"{fleet.tmp}/more/{i:07d}.png", "note": pad}) + "\n")
    size = manifest.stat().st_size

    out = subprocess.run(
        [sys.executable, "-m", "tests.fleet_stream_probe", str(manifest), str(real[0]), str(worker.pid)],
        cwd=REPO, env=fleet.env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])

    assert r["submitted"] == LINES
    growth = r["peak_rss"] - r["baseline_rss"]
    assert growth < size / 2, f"RSS grew {growth / 1e6:.1f} MB for a {size / 1e6:.1f} MB manifest"
    # The first job was finished by the worker while submission was still going on.
    assert r["first_done_row"] is not None and r["first_done_row"] < LINES
    assert r["first_done_at"] < r["ended_at"]
    st = fleet.client().status(r["batch_id"])
    assert st["total"] == LINES and st["done"] >= 1
    print(f"\n100k submit: {r['seconds']:.1f} s ({LINES / r['seconds']:.0f} jobs/s), "
          f"RSS growth {growth / 1e6:.1f} MB, manifest {size / 1e6:.1f} MB, "
          f"first job done after {r['first_done_row']} rows")
