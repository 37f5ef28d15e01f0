"""`scalecap results --format jsonl|parquet|webdataset` and the README's shard-to-Parquet run.

Real redis-server, SeaweedFS and `scalecap worker` processes on the scripted VLM; the README's
`scalecap submit/results` lines are run as written (the model comes from SCALECAP_MODEL).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from producer.export import export, flat_row, iter_rows, parquet_schema
from producer.s3_fetch import S3Fetcher
from tests.fleet_support import REPO, Fleet
from tests.test_shards import png, wds_samples, write_tar

README = REPO / "README.md"


def _readme_commands() -> list[str]:
    text = README.read_text()
    start = text.index("<!-- data-e2e")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, "the data-e2e block is missing from the README"
    return [ln.split(" #", 1)[0].strip() for ln in block.group(1).splitlines()
            if ln.startswith(("scalecap submit", "scalecap results"))]


def _run(line: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "scalecap_command", *shlex.split(line)[1:]]
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.services
@pytest.mark.slow
def test_readme_webdataset_shards_captioned_into_parquet(fleet: Fleet, s3_server: Any) -> None:
    import datasets

    work = fleet.tmp
    write_tar(work / "shards" / "00000.tar", [*wds_samples(["red", "blue"]),
                                              ("000002.jpg", b"this member is not an image")])
    write_tar(work / "shards" / "00001.tar", [*wds_samples(["green"], start=10),
                                              ("000011.json", b'{"orphan": true}')])
    client = s3_server.client()
    if "captions" not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket="captions")
    fleet.scripted()
    env = {**fleet.env, "SCALECAP_MODEL": "scripted", "SCALECAP_ALLOWED_ROOTS": str(work / "shards")}
    commands = _readme_commands()
    assert [c.split()[1] for c in commands] == ["submit", "results", "results"]
    for line in commands:
        _run(line, env, work)

    ds = datasets.load_dataset("parquet", data_files=str(work / "captions.parquet"), split="train")
    assert set(ds.column_names) == set(parquet_schema().names)
    rows = {r["source_key"] or r["image"]: r for r in ds}
    assert len(ds) == 5  # 3 captioned, 1 member that is not an image, 1 sample without an image
    for key, colour in (("000000", "red"), ("000001", "blue"), ("000010", "green")):
        r = rows[key]
        assert r["final_caption"].startswith("FINAL[") and r["error_type"] is None
        assert r["source_text"] == f"alt text {colour}"
        assert json.loads(r["source_json"])["caption"] == f"old caption {colour}"
        assert r["golden_sentences"] and len(r["questions"]) == len(r["answers"]) > 0
        assert r["model"] == "scripted" and r["config_hash"] and r["source_format"] == "webdataset"
    assert rows["000002"]["error_type"] == "NotAnImage" and rows["000002"]["final_caption"] is None
    orphan = next(r for r in ds if r["error_type"] == "NoImageMember")
    assert "000011" in orphan["error_message"]

    shard = work / "captioned" / "00000.tar"
    with tarfile.open(shard) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    docs = {n: json.loads(b) for n, b in members.items() if n.endswith(".json")}
    assert len(docs) == 5
    red = next(d for d in docs.values() if d["source_key"] == "000000")
    assert red["final_caption"].startswith("FINAL[") and red["scalecap_record"]["meta"]["source"]["txt"]
    assert members[f"{red['job_id']}.png"] == png("red", 0)  # the original bytes, copied
    bad = next(d for d in docs.values() if d["source_key"] == "000002")
    assert f"{bad['job_id']}.jpg" in members  # copied as it was, although it is not an image


@pytest.mark.services
@pytest.mark.slow
def test_hf_parquet_on_s3_into_redis_sink_and_jsonl(fleet: Fleet, s3_server: Any, s3_bucket: str) -> None:
    import datasets

    colours = ["red", "blue", "green"]
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": png(c, i), "path": None} for i, c in enumerate(colours)],
         "uid": [f"laion-{i}" for i in range(3)]},
        features=datasets.Features({"img": datasets.Image(), "uid": datasets.Value("string")}))
    ds.to_parquet(str(fleet.tmp / "t.parquet"))
    s3_server.client().upload_file(str(fleet.tmp / "t.parquet"), s3_bucket, "hf/train.parquet")
    fleet.scripted()
    client = fleet.client()
    sub = client.submit(f"s3://{s3_bucket}/hf/", sink="redis", model="scripted",
                        image_column="img", id_column="uid")
    assert sub.submitted == 3
    client.wait(sub.batch_id, timeout=60)
    rows = list(iter_rows(client, sub.batch_id, window=2))  # several windows, one in flight
    ids = sorted(r["scalecap_record"]["meta"]["source"]["id"] for r in rows)
    assert ids == ["laion-0", "laion-1", "laion-2"]
    assert all(r["scalecap_record"]["final_caption"].startswith("FINAL[") for r in rows)
    # A record that expired from the Redis sink is an error row; the export goes on.
    gone = next(iter(client.redis.scan_iter("scalecap:result:*")))
    client.redis.delete(gone)
    out = fleet.tmp / "out.jsonl"
    assert export(client, sub.batch_id, "jsonl", str(out)) == 3
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [ln["scalecap_record"].get("error", {}).get("type") for ln in lines].count("SinkError") == 1


@pytest.mark.services
def test_s3_fetcher_signs_awkward_keys_and_reports_failures_in_place(s3_server: Any, s3_bucket: str) -> None:
    client = s3_server.client()
    keys = ["plain.json", "with space/and+plus.json", "ünï/çødé.json", "a=b&c;d/~x(1).json"]
    for i, k in enumerate(keys):
        client.put_object(Bucket=s3_bucket, Key=k, Body=f'{{"n": {i}}}'.encode())
    settings = s3_server.settings()
    with S3Fetcher(settings, connections=3) as f:
        urls = [f"s3://{s3_bucket}/{k}" for k in keys] * 5
        assert [json.loads(b)["n"] for b in f.get_many(urls)] == [0, 1, 2, 3] * 5
        assert f.fallbacks == 0  # every signature was accepted on the fast path
        got = f.collect([urls[0], f"s3://{s3_bucket}/missing.json"],
                        f.submit([urls[0], f"s3://{s3_bucket}/missing.json"]))
        assert got[0] == b'{"n": 0}' and "NoSuchKey" in str(got[1]) and f.fallbacks == 1
    wrong = settings.with_overrides(s3_secret_access_key="not-the-secret")
    with S3Fetcher(wrong, connections=2) as f:
        out = f.collect(urls[:2], f.submit(urls[:2]))
        assert all(isinstance(x, Exception) for x in out) and f.fallbacks == 2


def test_flat_row_columns_and_docs_agree() -> None:
    record = {
        "init_caption": "a dog", "final_caption": "A brown dog.", "golden_sentences": ["A dog."],
        "sentence_scores": [0.9], "object_questions": ["What colour?"], "position_questions": ["Where?"],
        "qa_pairs": [{"question": "What colour?", "answer": "Brown.", "kept": True, "score": 0.8},
                     {"question": "Where?", "answer": "Left.", "kept": False}],
        "meta": {"job_id": "j1", "model": "m", "config_hash": "h",
                 "source": {"format": "webdataset", "shard": "s3://b/s.tar", "key": "000001",
                            "ext": "jpg", "txt": "old alt", "json": {"caption": "old"}}},
    }
    flat = flat_row({"image": "wds+s3://b/s.tar#key=000001", "scalecap_record": record})
    assert flat["source_key"] == "000001" and flat["source_text"] == "old alt"
    assert flat["questions"] == ["What colour?", "Where?"] and flat["answer_kept"] == [True, False]
    assert flat["answer_scores"] == [0.8, None] and flat["error_type"] is None
    failed = {"error": {"stage": "load", "type": "NotAnImage", "message": "m"}, "meta": {"job_id": "j"}}
    err = flat_row({"image": "x.png", "scalecap_record": failed})
    assert (err["error_type"], err["error_stage"], err["final_caption"], err["questions"]) == (
        "NotAnImage", "load", None, [])
    assert list(flat) == parquet_schema().names
    cut = flat_row({"image": "wds+file:///s/a.tar#key=k7&ext=jpg&offset=512&size=9",
                    "scalecap_record": {"error": {"stage": "submit", "type": "TruncatedShard"}, "meta": {}}})
    assert (cut["source_key"], cut["source_file"], cut["error_type"]) == ("k7", "/s/a.tar", "TruncatedShard")
    doc = (REPO / "docs" / "data.md").read_text()
    missing = [c for c in parquet_schema().names if f"`{c}`" not in doc]
    assert not missing, f"docs/data.md does not describe {missing}"


def test_export_refuses_bad_combinations_before_reading(tmp_path: Path) -> None:
    for fmt, out, images, why in (("csv", "x", False, "unknown format"),
                                  ("parquet", "-", False, "needs -o"),
                                  ("jsonl", "x", True, "needs --format webdataset")):
        with pytest.raises(ValueError, match=why):
            export(object(), "b", fmt, out, with_images=images)
    assert os.listdir(tmp_path) == []


def test_without_pyarrow_parquet_in_and_out_name_the_data_extra(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    from producer.sources import expand
    from scalecap.errors import ScaleCapError

    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # import pyarrow raises ImportError
    with pytest.raises(ScaleCapError, match=r"scalecap-fleet\[data\]"):
        export(object(), "b", "parquet", str(tmp_path / "o.parquet"))
    with pytest.raises(ScaleCapError, match=r"scalecap-fleet\[data\]"):
        list(expand(str(tmp_path / "t.parquet")))
