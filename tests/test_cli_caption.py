"""`scalecap caption` end to end in a real subprocess (scripted VLM backend: fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.image_corpus import EXPECTED_ERRORS, write_corpus

SCRIPTED = "tests.scripted_vlm:ScriptedVLM"
ROOT = Path(__file__).resolve().parents[1]


def caption_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "scalecap_command", "caption", *args]


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT, **kw)


@pytest.fixture
def manifest(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    names = ["jpeg", "png", "cmyk_jpeg", "gif_animated", *EXPECTED_ERRORS]
    lines = [json.dumps({"image": str(corpus[n]), "name": n}) for n in names]
    lines.insert(2, "{not json")
    lines.append(json.dumps({"name": "no-image"}))
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


def test_caption_writes_one_row_per_input_and_resumes(tmp_path, manifest):
    src, n = manifest
    out = tmp_path / "out.jsonl"
    r = run(caption_cmd(str(src), "-o", str(out), "--backend", SCRIPTED, "--model", "scripted",
                        "--max-questions", "2", "--second-filter"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == n
    ok = [x for x in rows if "final_caption" in x["scalecap_record"]]
    failed = [x for x in rows if "error" in x["scalecap_record"]]
    assert len(ok) == 4 and len(failed) == n - 4
    assert all(len(x["scalecap_record"]["object_questions"]) <= 2 for x in ok)
    stages = {x.get("name", "?"): x["scalecap_record"]["error"]["stage"] for x in failed}
    assert stages["no-image"] == "input" and stages["missing"] == "load"
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    assert summary["captioned"] == 4 and summary["failed"] == n - 4

    # interrupted run: keep 3 rows and half of a 4th line; the rerun does only the rest
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    r = run(caption_cmd(str(src), "-o", str(out), "--backend", SCRIPTED, "--model", "scripted",
                        "--max-questions", "2", "--second-filter", "--no-progress"))
    assert r.returncode == 0, r.stderr
    rows2 = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows2) == n
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    assert summary["skipped_already_done"] == 3
    key = lambda x: json.dumps(x.get("image")) + json.dumps(x.get("name"))  # noqa: E731
    assert sorted(map(key, rows2)) == sorted(map(key, rows))


def test_caption_config_file_and_flags(tmp_path, manifest):
    src, _ = manifest
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[scalecap]\nmax_questions = 1\nsentence_filter = "yesno"\n')
    out = tmp_path / "o.jsonl"
    r = run(caption_cmd(str(src), "-o", str(out), "--backend", SCRIPTED, "--model", "m",
                        "--config", str(cfg), "--tau-sentence", "0.3"))
    assert r.returncode == 0, r.stderr
    rec = next(json.loads(x)["scalecap_record"] for x in out.read_text().splitlines()
               if "final_caption" in x)
    assert rec["meta"]["sentence_filter"] == "yesno"
    assert len(rec["object_questions"]) == 1


def test_caption_exits_nonzero_only_when_nothing_can_run(tmp_path, manifest):
    src, _ = manifest
    r = run(caption_cmd(str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                        "--backend", SCRIPTED))
    assert r.returncode == 2 and "cannot read input" in r.stderr
    r = run(caption_cmd(str(src), "-o", str(tmp_path / "o.jsonl"), "--backend", "no.such.module:X"))
    assert r.returncode == 2 and "cannot start backend" in r.stderr
    r = run(caption_cmd(str(src), "-o", str(tmp_path / "o.jsonl"), "--backend", SCRIPTED,
                        "--sentence-filter", "maybe"))
    assert r.returncode == 2


def test_caption_help_lists_config_flags():
    r = run(caption_cmd("--help"))
    assert r.returncode == 0
    for flag in ("--tau-sentence", "--max-questions", "--second-filter", "--sentence-filter",
                 "--image-key", "--output-key", "--backend", "--model", "--config"):
        assert flag in r.stdout
