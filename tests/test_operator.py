"""The DataFlow drop-in on a FileStorage and on a DataFrame, with the bad-input corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from scalecap import FileStorage, ImageScaleCaptionGenerate, ImageScaleCaptionGenerateConfig
from scalecap.record import DATAFLOW_FIELDS
from tests.image_corpus import EXPECTED_ERRORS, GOOD, write_corpus
from tests.scripted_vlm import ScriptedVLM


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_get_desc_languages():
    zh = ImageScaleCaptionGenerate.get_desc("zh")
    en = ImageScaleCaptionGenerate.get_desc("en")
    assert "黄金句子" in zh and "golden" in en and zh != en
    assert ImageScaleCaptionGenerate.get_desc() == zh


def test_run_on_file_storage_with_bad_inputs(tmp_path, corpus):
    vlm = ScriptedVLM()
    lines = [json.dumps({"image": str(corpus[name]), "name": name}) for name in GOOD + tuple(EXPECTED_ERRORS)]
    lines += ['{"image": broken json', json.dumps({"name": "no image key"}), json.dumps([1, 2])]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    storage = FileStorage(str(src), cache_path=str(tmp_path / "cache"), file_name_prefix="dataflow_cache")
    op = ImageScaleCaptionGenerate(vlm, ImageScaleCaptionGenerateConfig(max_questions=3))
    step = storage.step()
    assert op.run(step, input_image_key="image", output_key="scalecap_record") == ["scalecap_record"]

    assert step.writes == 1, "one write per run"
    written = step.last_written
    assert written == str(tmp_path / "cache" / "dataflow_cache_step1.jsonl"), "DataFlow's file naming"
    rows = [json.loads(line) for line in Path(written).read_text().splitlines()]
    assert len(rows) == len(lines), "count in = count out"
    by_name = {r.get("name"): r["scalecap_record"] for r in rows if r.get("name")}
    for name in GOOD:
        rec = by_name[name]
        assert "error" not in rec, (name, rec)
        assert all(f in rec for f in DATAFLOW_FIELDS)
        assert rec["final_caption"].startswith("FINAL[")
    for name, err in EXPECTED_ERRORS.items():
        rec = by_name[name]
        assert rec["error"]["stage"] == "load"
        assert rec["error"]["type"] == err.__name__, (name, rec["error"])
        assert "final_caption" not in rec and "init_caption" not in rec
    assert by_name["no image key"]["error"]["type"] == "MissingImageKey"
    unnamed = [r for r in rows if not r.get("name")]
    assert len(unnamed) == 2
    assert {r["scalecap_record"]["error"]["type"] for r in unnamed} == {"InvalidRow"}
    assert all("invalid JSON" in r["scalecap_record"]["error"]["message"]
               or "object" in r["scalecap_record"]["error"]["message"] for r in unnamed)

    # the next operator in a pipeline reads what this one wrote
    df = storage.step().read("dataframe")
    assert len(df) == len(lines) and "scalecap_record" in df.columns


def test_run_on_dataframe_keeps_rows_and_order(corpus):
    df = pd.DataFrame({"img": [str(corpus["jpeg"]), None, str(corpus["missing"]), str(corpus["png"])],
                       "id": [1, 2, 3, 4]})
    out = ImageScaleCaptionGenerate(ScriptedVLM()).run(df, input_image_key="img", output_key="rec")
    assert list(out["id"]) == [1, 2, 3, 4]
    recs = list(out["rec"])
    assert "final_caption" in recs[0] and "final_caption" in recs[3]
    assert recs[1]["error"]["type"] == "MissingImageKey"
    assert recs[2]["error"]["type"] == "ImageNotFound"
    assert "rec" not in df.columns, "the caller's DataFrame is not modified"


def test_config_as_dict_and_json_storage(tmp_path, corpus):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"image": str(corpus["jpeg"])}]))
    storage = FileStorage(str(src), cache_path=str(tmp_path / "c"), cache_type="json")
    op = ImageScaleCaptionGenerate(ScriptedVLM(), {"max_questions": 1, "second_filter": True})
    step = storage.step()
    assert op.run(step) == ["scalecap_record"]
    (row,) = json.loads(Path(step.last_written).read_text())
    rec = row["scalecap_record"]
    assert len(rec["object_questions"]) == 1 and len(rec["position_questions"]) == 1
    assert rec["meta"]["config_hash"] == op.config.config_hash()


def test_without_dataflow_installed_the_operator_still_works(tmp_path, corpus):
    """`dataflow` made unimportable in a fresh interpreter: plain base classes, same behaviour."""
    import subprocess
    import sys

    src = write_jsonl(tmp_path / "in.jsonl", [json.dumps({"image": str(corpus["png"])})])
    code = (
        "import sys, json\n"
        "sys.modules['dataflow'] = None\n"
        "from scalecap import FileStorage, ImageScaleCaptionGenerate\n"
        "from scalecap.dataflow.compat import HAVE_DATAFLOW\n"
        "from tests.scripted_vlm import ScriptedVLM\n"
        f"step = FileStorage({str(src)!r}, cache_path={str(tmp_path / 'c')!r}).step()\n"
        "op = ImageScaleCaptionGenerate(ScriptedVLM(), {'max_questions': 1})\n"
        "keys = op.run(step)\n"
        "op.close()\n"
        "print(json.dumps([HAVE_DATAFLOW, keys, step.last_written, op.vlm_serving.closed,"
        " 'dataflow.core' in sys.modules]))\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    have, keys, written, closed, loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert (have, keys, closed, loaded) == (False, ["scalecap_record"], True, False)
    (row,) = [json.loads(x) for x in Path(written).read_text().splitlines()]
    assert row["scalecap_record"]["final_caption"]
