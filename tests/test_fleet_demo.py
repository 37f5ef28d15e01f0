"""The README's main job runs the whole fleet: redis-server, a worker, the I/O worker, the API, a
key, a signed webhook and the viewer's URL (here on the scripted VLM, so it takes seconds)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet_support import SCRIPTED, make_images

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_fleet_demo_runs_the_whole_system(tmp_path):
    images = make_images(tmp_path / "imgs", ["red", "blue", "bad", "green"])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in images))
    out = tmp_path / "out" / "captions.jsonl"
    r = subprocess.run(
        [sys.executable, "scripts/fleet_demo.py", "--manifest", str(manifest), "--model", "scripted",
         "--out", str(out), "--worker-arg=--backend", f"--worker-arg={SCRIPTED}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["image"] for row in rows) == sorted(str(p) for p in images)
    failed = [row for row in rows if "error" in row["scalecap_record"]]
    assert [row["image"] for row in failed] == [str(images[2])]
    assert "submitted 4 images over HTTP" in log
    assert "webhook received and verified" in log and '"type": "batch.completed"' in log
    assert "viewer: http://127.0.0.1:" in log
    assert "stopped redis-server, the workers and the API" in log
    # Nothing it started is left running: its Redis and its API no longer accept connections.
    redis_port = int(re.search(r"redis-server up at redis://127.0.0.1:(\d+)", log).group(1))
    api_port = int(re.search(r"API up at http://127.0.0.1:(\d+)", log).group(1))
    for port in (redis_port, api_port):
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
