"""Our operator inside a real DataFlow pipeline (PyPI open-dataflow, the light --no-deps install).

`compile()` must record the operator without running it, check its keys against the dataset and
the next operator, find its serving; `forward()` must run it, hand its output to the next operator
and clean the serving up after its last step. The model is the deterministic scripted VLM.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from scalecap import FileStorage, ImageScaleCaptionGenerate, ImageScaleCaptionGenerateConfig
from scalecap.backends.base import GenerateRequest
from scalecap.dataflow.serving import BackendServing
from scalecap.errors import ConfigError
from tests.image_corpus import write_corpus
from tests.scripted_vlm import ScriptedVLM

dataflow_core = pytest.importorskip("dataflow.core")
from dataflow.pipeline import PipelineABC  # noqa: E402
from dataflow.utils.registry import OPERATOR_REGISTRY  # noqa: E402
from dataflow.utils.storage import DataFlowStorage  # noqa: E402
from dataflow.utils.storage import FileStorage as DataFlowFileStorage  # noqa: E402

CONFIG = {"max_questions": 2}


class CountingVLM(ScriptedVLM):
    """The scripted VLM, also counting how often it was closed."""

    closes: int = 0

    async def aclose(self) -> None:
        self.closes += 1


class CaptionLength(dataflow_core.OperatorABC):
    """A downstream DataFlow operator: reads our record column, writes the caption's length."""

    def run(self, storage, input_key: str = "scalecap_record", output_key: str = "caption_chars"):
        df = storage.read("dataframe")
        recs = [json.loads(r) if isinstance(r, str) else r for r in df[input_key]]
        df[output_key] = [len(r.get("final_caption", "")) for r in recs]
        storage.write(df)
        return [output_key]


class CaptionPipeline(PipelineABC):
    def __init__(self, storage, serving, *, image_key="image", record_format="dict", config=None):
        super().__init__()
        self.storage = storage
        self.image_key = image_key
        self.captioner = ImageScaleCaptionGenerate(
            serving, config or CONFIG, record_format=record_format
        )
        self.length = CaptionLength()

    def forward(self):
        self.captioner.run(
            storage=self.storage.step(), input_image_key=self.image_key, output_key="scalecap_record"
        )
        self.length.run(storage=self.storage.step(), input_key="scalecap_record", output_key="caption_chars")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def source(tmp_path, corpus):
    src = tmp_path / "in.jsonl"
    rows = [{"image": str(corpus["jpeg"]), "id": 1}, {"image": str(corpus["png"]), "id": 2},
            {"image": str(corpus["missing"]), "id": 3}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_operator_is_a_registered_dataflow_operator():
    assert issubclass(ImageScaleCaptionGenerate, dataflow_core.OperatorABC)
    assert OPERATOR_REGISTRY.get("ImageScaleCaptionGenerate") is ImageScaleCaptionGenerate
    assert isinstance(FileStorage("x.jsonl"), DataFlowStorage)


def test_compile_records_then_forward_runs_and_cleans_up(tmp_path, source):
    vlm = CountingVLM()
    storage = FileStorage(str(source), cache_path=str(tmp_path / "cache"), file_name_prefix="caps")
    pipe = CaptionPipeline(storage, vlm)
    handle = pipe.captioner.vlm_serving
    assert isinstance(handle, BackendServing) and isinstance(handle, dataflow_core.LLMServingABC)

    pipe.compile()
    assert vlm.calls == [], "compile() records the step; it must not call the model"
    assert not (tmp_path / "cache").exists()
    assert [n.op_name for n in pipe.op_nodes_list[1:-1]] == ["captioner", "length"]
    assert pipe.op_nodes_list[1].llm_serving is handle, "the pipeline finds the serving on the operator"
    assert "scalecap_record" in pipe.final_keys and "caption_chars" in pipe.final_keys

    pipe.forward()
    step1 = read_jsonl(tmp_path / "cache" / "caps_step1.jsonl")
    step2 = read_jsonl(tmp_path / "cache" / "caps_step2.jsonl")
    assert [r["id"] for r in step1] == [1, 2, 3] == [r["id"] for r in step2]
    good = [r["scalecap_record"] for r in step1[:2]]
    assert all("error" not in r and r["final_caption"] for r in good), good
    assert step1[2]["scalecap_record"]["error"]["type"] == "ImageNotFound"
    assert [r["caption_chars"] for r in step2] == [len(r["scalecap_record"].get("final_caption", ""))
                                                   for r in step1]
    assert step2[0]["caption_chars"] > 0
    assert vlm.calls, "forward() runs the model"
    assert handle.closed and handle.cleanups == 1 and vlm.closes == 1, "cleanup() after the last step"


def test_compile_checks_keys_before_any_model_call(tmp_path, source):
    vlm = ScriptedVLM()
    storage = FileStorage(str(source), cache_path=str(tmp_path / "cache"))
    pipe = CaptionPipeline(storage, vlm, image_key="picture")
    with pytest.raises(KeyError, match="picture"):
        pipe.compile()
    assert vlm.calls == []


def test_resume_skips_the_captioning_step(tmp_path, source):
    vlm = CountingVLM()
    storage = FileStorage(str(source), cache_path=str(tmp_path / "cache"))
    pipe = CaptionPipeline(storage, vlm)
    pipe.compile()
    pipe.forward()
    n_calls = len(vlm.calls)
    step2 = tmp_path / "cache" / "dataflow_cache_step_step2.jsonl"
    step2.unlink()
    pipe.forward(resume_step=1)
    assert len(vlm.calls) == n_calls, "the captioning step is not run again"
    assert len(read_jsonl(step2)) == 3, "the next step ran from the cached captions"


def test_spec_built_engines_restart_after_cleanup(tmp_path, source):
    storage = FileStorage(str(source), cache_path=str(tmp_path / "cache"))
    spec = {"backend": "tests.scripted_vlm:ScriptedVLM", "model": "scripted-spec"}
    pipe = CaptionPipeline(storage, spec)
    handle = pipe.captioner.vlm_serving
    pipe.compile()
    pipe.forward()
    first = handle.backends[0]
    assert handle.closed and handle.cleanups == 1
    (tmp_path / "cache" / "dataflow_cache_step_step1.jsonl").unlink()
    pipe.forward()
    assert handle.backends[0] is not first, "a new engine was started from the spec"
    rows = read_jsonl(tmp_path / "cache" / "dataflow_cache_step_step1.jsonl")
    assert all("final_caption" in r["scalecap_record"] for r in rows[:2])


def test_engine_object_cannot_restart_after_cleanup_and_says_so(tmp_path, source):
    storage = FileStorage(str(source), cache_path=str(tmp_path / "cache"))
    pipe = CaptionPipeline(storage, ScriptedVLM())
    pipe.compile()
    pipe.forward()
    with pytest.raises(RuntimeError, match="cleaned up"):
        pipe.forward()


class TwoCaptioners(PipelineABC):
    """Two operators on one engine object: one serving handle, released after the second."""

    def __init__(self, storage, vlm):
        super().__init__()
        self.storage = storage
        self.first = ImageScaleCaptionGenerate(vlm, CONFIG)
        self.second = ImageScaleCaptionGenerate(vlm, {"max_questions": 1}, record_format="json")

    def forward(self):
        self.first.run(storage=self.storage.step(), input_image_key="image", output_key="rec_a")
        self.second.run(storage=self.storage.step(), input_image_key="image", output_key="rec_b")


def test_operators_sharing_an_engine_share_one_serving(tmp_path, source):
    vlm = CountingVLM()
    storage = FileStorage(str(source), cache_path=str(tmp_path / "cache"))
    pipe = TwoCaptioners(storage, vlm)
    handle = pipe.first.vlm_serving
    assert pipe.second.vlm_serving is handle
    pipe.compile()
    assert pipe.llm_serving_counter[handle] == 2
    pipe.forward()
    rows = read_jsonl(tmp_path / "cache" / "dataflow_cache_step_step2.jsonl")
    assert isinstance(rows[0]["rec_a"], dict), "record_format='dict': an object"
    assert isinstance(rows[0]["rec_b"], str), "record_format='json': a JSON string"
    assert json.loads(rows[0]["rec_b"])["final_caption"]
    assert vlm.closes == 1 and handle.cleanups == 1


@pytest.mark.parametrize("record_format", ["dict", "json"])
def test_dataflows_own_file_storage(tmp_path, source, record_format):
    storage = DataFlowFileStorage(str(source), cache_path=str(tmp_path / "cache"), file_name_prefix="df")
    pipe = CaptionPipeline(storage, ScriptedVLM(), record_format=record_format)
    pipe.compile()
    pipe.forward()
    rows = read_jsonl(tmp_path / "cache" / "df_step2.jsonl")
    recs = [r["scalecap_record"] for r in rows]
    assert all(isinstance(r, dict if record_format == "dict" else str) for r in recs)
    recs = [json.loads(r) if isinstance(r, str) else r for r in recs]
    assert recs[0]["final_caption"] and recs[2]["error"]["type"] == "ImageNotFound"
    assert rows[0]["caption_chars"] == len(recs[0]["final_caption"])


def test_legacy_jsonl_fields_are_accepted_with_a_warning(tmp_path, corpus):
    legacy_in = tmp_path / "legacy.jsonl"
    legacy_in.write_text(json.dumps({"image": str(corpus["jpeg"])}) + "\n")
    legacy_out = tmp_path / "out" / "legacy.scalecap.jsonl"
    with pytest.warns(FutureWarning) as caught:
        config = ImageScaleCaptionGenerateConfig.from_dict(
            {"max_questions": 1, "input_jsonl_path": str(legacy_in), "output_jsonl_path": str(legacy_out)}
        )
    assert sorted(str(w.message).split()[0] for w in caught) == ["input_jsonl_path", "output_jsonl_path"]
    assert config.config_hash() == ImageScaleCaptionGenerateConfig(max_questions=1).config_hash()
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"note": "no image column here"}) + "\n")
    storage = FileStorage(str(empty), cache_path=str(tmp_path / "cache"))
    op = ImageScaleCaptionGenerate(ScriptedVLM(), config)
    step = storage.step()
    assert op.run(step) == ["scalecap_record"]
    (row,) = read_jsonl(Path(step.last_written))
    assert row["scalecap_record"]["final_caption"]
    (line,) = read_jsonl(legacy_out)
    assert line["image"] == str(corpus["jpeg"])
    assert line["final_caption"] == row["scalecap_record"]["final_caption"]


def test_bad_record_format_and_serving_are_refused():
    with pytest.raises(ConfigError, match="record_format"):
        ImageScaleCaptionGenerate(ScriptedVLM(), record_format="yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="vlm_serving"):
            ImageScaleCaptionGenerate(42)


class AskServing(dataflow_core.OperatorABC):
    """A DataFlow operator that calls its serving the DataFlow way (`generate_from_input`)."""

    def __init__(self, llm_serving):
        super().__init__()
        self.llm_serving = llm_serving

    def run(self, storage, input_key: str = "id", output_key: str = "reply"):
        df = storage.read("dataframe")
        df[output_key] = self.llm_serving.generate_from_input([f"row {i}" for i in df[input_key]], "be brief")
        storage.write(df)
        return [output_key]


class CaptionThenAsk(PipelineABC):
    def __init__(self, storage, vlm):
        super().__init__()
        self.storage = storage
        self.captioner = ImageScaleCaptionGenerate(vlm, CONFIG)
        self.ask = AskServing(self.captioner.vlm_serving)

    def forward(self):
        self.captioner.run(storage=self.storage.step(), input_image_key="image", output_key="scalecap_record")
        self.ask.run(storage=self.storage.step(), input_key="id", output_key="reply")


def test_other_dataflow_operators_can_use_our_engine_as_their_serving(tmp_path, source):
    vlm = CountingVLM()
    storage = FileStorage(str(source), cache_path=str(tmp_path / "cache"))
    pipe = CaptionThenAsk(storage, vlm)
    handle = pipe.captioner.vlm_serving
    pipe.compile()
    assert pipe.llm_serving_counter[handle] == 2
    pipe.forward()
    asked = [r for kind, reqs in vlm.calls if kind == "generate" for r in reqs if r.prompt.startswith("row ")]
    assert [r.prompt for r in asked] == ["row 1", "row 2", "row 3"]
    assert {r.system for r in asked} == {"be brief"} and all(r.image is None for r in asked)
    rows = read_jsonl(tmp_path / "cache" / "dataflow_cache_step_step2.jsonl")
    script = ScriptedVLM()
    expected = [script._answer(GenerateRequest(prompt=f"row {i}", max_tokens=1024)).text for i in (1, 2, 3)]
    assert [r["reply"] for r in rows] == expected
    assert handle.cleanups == 1 and vlm.closes == 1, "released once, after the second operator"


def test_batched_pipeline_with_dataflows_batched_storage(tmp_path, source):
    from dataflow.pipeline import BatchedPipelineABC
    from dataflow.utils.storage import BatchedFileStorage

    class Batched(BatchedPipelineABC):
        def __init__(self, storage, vlm):
            super().__init__()
            self.storage = storage
            self.captioner = ImageScaleCaptionGenerate(vlm, CONFIG)

        def forward(self):
            self.captioner.run(storage=self.storage.step(), input_image_key="image", output_key="rec")

    vlm = CountingVLM()
    storage = BatchedFileStorage(str(source), cache_path=str(tmp_path / "cache"), file_name_prefix="b")
    pipe = Batched(storage, vlm)
    pipe.compile()
    pipe.forward(batch_size=2)
    rows = read_jsonl(tmp_path / "cache" / "b_step1.jsonl")
    assert [r["id"] for r in rows] == [1, 2, 3], "two batches, appended in order"
    assert rows[0]["rec"]["final_caption"] and rows[2]["rec"]["error"]["type"] == "ImageNotFound"
    caption_calls = [r for kind, reqs in vlm.calls if kind == "generate" for r in reqs if r.image is not None]
    assert caption_calls and vlm.closes == 1
