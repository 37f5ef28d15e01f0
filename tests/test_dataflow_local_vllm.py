"""The operator on open-dataflow's real `LocalVLMServing_vllm` with the tiny model (yes/no mode).

This serving has no `model_name` attribute (the original AttributeError) and takes image paths;
the tiny model's text is gibberish, so the test checks structure, not content.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripted_vlm import solid_image

pytest.importorskip("dataflow.core")
pytestmark = [pytest.mark.engine, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_operator_on_local_vlm_serving_vllm(tmp_path, tiny_model_dir):
    images = []
    for colour in ("red", "blue"):
        images.append(tmp_path / f"{colour}.png")
        solid_image(colour).save(images[-1])
    missing = tmp_path / "missing.png"
    cmd = [sys.executable, "-m", "tests.dataflow_local_vllm_probe", str(tiny_model_dir), *map(str, images),
           str(missing)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=dict(os.environ))
    lines = [line for line in r.stdout.splitlines() if line.startswith("RECORDS ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    out = json.loads(lines[0][len("RECORDS "):])
    assert out["model_name"] == str(tiny_model_dir), "the name comes from hf_model_name_or_path"
    good, bad = out["records"][:2], out["records"][2]
    for rec in good:
        assert "error" not in rec, rec
        assert rec["init_caption"] and rec["final_caption"] and rec["sentences"]
        assert len(rec["sentence_scores"]) == len(rec["sentences"])
        assert all(-1.0 <= s <= 1.0 for s in rec["sentence_scores"])
        assert rec["meta"]["model"] == str(tiny_model_dir)
    assert bad["error"]["type"] == "ImageNotFound"
