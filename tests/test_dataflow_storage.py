"""Our FileStorage keeps DataFlow's FileStorage contract (open-dataflow 1.0.13), checked side by side."""

from __future__ import annotations

import csv
import json

import pytest

from scalecap import FileStorage

dataflow_storage = pytest.importorskip("dataflow.utils.storage")
DataFlowFileStorage = dataflow_storage.FileStorage

ROWS = [
    {"image": "a.png", "scalecap_record": {"final_caption": "A red square.", "golden_sentences": ["A."]}},
    {"image": "b.png", "scalecap_record": {"error": {"stage": "load", "type": "ImageNotFound"}}},
]


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"image": r["image"], "n": i}) + "\n" for i, r in enumerate(ROWS)))
    return src


def both(source, tmp_path, **kwargs):
    ours = FileStorage(str(source), cache_path=str(tmp_path / "cache"), **kwargs)
    theirs = DataFlowFileStorage(str(source), cache_path=str(tmp_path / "cache"), **kwargs)
    return ours, theirs


def test_step_file_names_match_dataflow(source, tmp_path):
    for kwargs in ({}, {"file_name_prefix": "caps", "cache_type": "json"}):
        ours, theirs = both(source, tmp_path, **kwargs)
        for step in (0, 1, 2):
            assert str(ours.file_for_step(step)) == theirs._get_cache_file_path(step)
    assert FileStorage(str(source)).file_name_prefix == "dataflow_cache_step"


def test_step_returns_a_copy_pinned_to_its_step(source, tmp_path):
    ours, theirs = both(source, tmp_path)
    for storage in (ours, theirs):
        first, second = storage.step(), storage.step()
        assert first is not storage and second is not first
        assert (first.operator_step, second.operator_step, storage.operator_step) == (0, 1, 1)
        assert storage.reset().operator_step == -1


def test_reading_or_writing_before_step_is_an_error(source, tmp_path):
    ours, theirs = both(source, tmp_path)
    with pytest.raises(ValueError, match=r"storage\.step\(\)") as mine:
        ours.read()
    with pytest.raises(ValueError) as dataflows:
        theirs.read()
    assert str(mine.value) == str(dataflows.value)
    with pytest.raises(ValueError, match=r"storage\.step\(\)"):
        ours.write(ROWS)
    assert not (tmp_path / "cache").exists()


def test_each_reads_what_the_other_wrote(source, tmp_path):
    ours, theirs = both(source, tmp_path, file_name_prefix="x")
    assert ours.step().get_keys_from_dataframe() == theirs.step().get_keys_from_dataframe() == ["image", "n"]
    path = ours.write(ROWS)
    assert path.endswith("x_step1.jsonl")
    assert theirs.step().read("dict") == ROWS, "DataFlow reads our step file"
    theirs.write([{**r, "k": 1} for r in ROWS])  # DataFlow writes step 2
    ours.step()
    assert ours.step().read("dict") == [{**r, "k": 1} for r in ROWS], "we read DataFlow's step file"


def test_bad_jsonl_lines_become_rows_instead_of_failing_the_read(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"image": "a.png"}\n{"image": broken\n[1, 2]\n')
    rows = FileStorage(str(src)).step().read("dict")
    assert rows[0] == {"image": "a.png"}
    assert "invalid JSON" in rows[1]["_error"] and rows[1]["_raw"] == '{"image": broken'
    assert "expected a JSON object" in rows[2]["_error"]
    with pytest.raises(ValueError):
        DataFlowFileStorage(str(src)).step().read("dict")  # DataFlow fails the whole file


def test_empty_first_entry_reads_as_no_rows():
    storage = FileStorage("").step()
    assert storage.read("dict") == [] and len(storage.read("dataframe")) == 0


def test_csv_cells_hold_json_text_and_parquet_keeps_records(source, tmp_path):
    step = FileStorage(str(source), cache_path=str(tmp_path / "c"), cache_type="csv").step()
    path = step.write(ROWS)
    with open(path, newline="") as f:
        cells = [r["scalecap_record"] for r in csv.DictReader(f)]
    assert [json.loads(c) for c in cells] == [r["scalecap_record"] for r in ROWS], "JSON, not Python's repr"

    storage = FileStorage(str(source), cache_path=str(tmp_path / "p"), cache_type="parquet")
    storage.step().write(ROWS)
    back = storage.step().read("dict")
    assert [r["image"] for r in back] == ["a.png", "b.png"]
    assert back[0]["scalecap_record"]["final_caption"] == "A red square."
    assert back[1]["scalecap_record"]["error"]["type"] == "ImageNotFound"


def test_unknown_cache_type_is_refused(source):
    with pytest.raises(ValueError, match="cache_type"):
        FileStorage(str(source), cache_type="xlsx")
