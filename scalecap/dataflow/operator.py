"""`ImageScaleCaptionGenerate`: a drop-in for DataFlow's ScaleCap operator (docs/dataflow.md).

`run(storage, input_image_key, output_key)` reads the current step's rows, captions every image
concurrently on one engine, writes every row back with its record under `output_key` in one write,
and returns `[output_key]`. Rows whose image cannot be read, or that have no image at all, get an
error record: the count of rows out always equals the count in.

When DataFlow (`open-dataflow`) imports, the class is an `OperatorABC` in `OPERATOR_REGISTRY`, so a
DataFlow `PipelineABC` records it at `compile()`, checks its keys, and releases its serving (the
`vlm_serving` attribute) through `cleanup()` after its last step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from scalecap.backends.base import Backend
from scalecap.backends.dataflow_serving import CONTRASTIVE_UNSUPPORTED, DataFlowServingBackend
from scalecap.backends.setup import build_chain
from scalecap.chain import ChainItem, ScaleCapChain
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.dataflow.compat import OperatorBase, is_dataflow_serving, register_operator
from scalecap.dataflow.serving import BackendServing, serving_for
from scalecap.dataflow.storage import read_rows
from scalecap.errors import ConfigError
from scalecap.record import base_meta, error_record
from scalecap.runtime import BackgroundLoop, default_loop

RecordFormat = Literal["dict", "json"]

_DESC = {
    "zh": (
        "ScaleCap 图像描述生成算子：先由视觉语言模型生成初始描述，再以有图/无图的 token 对数概率逐子句对比"
        "筛选出图像真正支持的“黄金句子”，据此生成物体与位置问题并由模型作答（可选二次过滤），"
        "最后由语言模型融合成信息密集、抑制幻觉的最终描述。\n"
        "输入参数：vlm_serving（模型后端）、config（ImageScaleCaptionGenerateConfig）\n"
        "run 参数：storage、input_image_key（默认 'image'）、output_key（默认 'scalecap_record'）\n"
        "输出：每行在 output_key 下写入记录，包含 init_caption、golden_sentences、object_questions、"
        "position_questions、qa_answers_filtered、final_caption、sentence_scores 等字段；"
        "失败的图片写入 error 字段。"
    ),
    "en": (
        "ScaleCap image captioning operator: a VLM writes an initial caption; sentences are kept as "
        "'golden' only when the image itself supports them (each token's log-probability with "
        "the image against without it, clause by clause); object and position questions are "
        "asked about them and answered by the VLM (with an optional second filter); a language "
        "model fuses everything into one dense, hallucination-filtered caption.\n"
        "Init: vlm_serving (a model backend), config (ImageScaleCaptionGenerateConfig).\n"
        "run: storage, input_image_key (default 'image'), output_key (default 'scalecap_record').\n"
        "Output: each row gets a record under output_key with init_caption, golden_sentences, "
        "object_questions, position_questions, qa_answers_filtered, final_caption, "
        "sentence_scores and more; a failed image gets an error object instead."
    ),
}


def _present(value: Any) -> Any:
    """The value, or None where pandas filled a missing cell with NaN."""
    return None if isinstance(value, float) and math.isnan(value) else value


@register_operator
class ImageScaleCaptionGenerate(OperatorBase):  # type: ignore[misc, valid-type]
    """ScaleCap over a DataFlow storage or a pandas DataFrame.

    vlm_serving: a scalecap `Backend` (see scalecap.backends); a model path/name to start the vLLM
        backend with; a dict {"backend": "vllm"|"openai"|"transformers"|"dataflow", "model": ...,
        **options}; or a DataFlow serving object (APIVLMServing_openai, LocalVLMServing_vllm,
        DataFlow-MM's servings), which returns text only and so needs sentence_filter='yesno'.
    record_format: "dict" writes each record as an object (nested JSON in json/jsonl files);
        "json" writes it as a JSON string, as DataFlow-MM's original operator did.
    """

    def __init__(
        self,
        vlm_serving: Backend | str | dict[str, Any] | Any,
        config: ImageScaleCaptionGenerateConfig | dict[str, Any] | None = None,
        *,
        concurrency: int = 64,
        loop: BackgroundLoop | None = None,
        record_format: RecordFormat = "dict",
    ) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = ImageScaleCaptionGenerateConfig.from_dict(config)
        self.config = config or ImageScaleCaptionGenerateConfig()
        if record_format not in ("dict", "json"):
            raise ConfigError(f"record_format must be 'dict' or 'json', not {record_format!r}")
        self.record_format = record_format
        self.concurrency = concurrency
        self._spec: dict[str, Any] | None = None
        if isinstance(vlm_serving, Backend):
            # One handle per engine object: operators sharing an engine share the handle (and its
            # loop, which the engine is bound to), so the pipeline releases it after the last one.
            vlm_serving = serving_for(vlm_serving, loop or default_loop())
        if isinstance(vlm_serving, BackendServing):
            self.loop = vlm_serving.loop
            if vlm_serving.reopen is not None:
                vlm_serving.start_serving()
            self.vlm_serving: Any = vlm_serving
            self.chain = self._build(vlm_serving.backends[0])
            vlm_serving.add(self.chain.llm)
            return
        self.loop = loop or default_loop()
        if isinstance(vlm_serving, str | dict):
            if isinstance(vlm_serving, str):
                vlm_serving = {"backend": "vllm", "model": vlm_serving}
            self._spec = dict(vlm_serving)
            self.chain = self._build_from_spec()
            self.vlm_serving = BackendServing(_engines(self.chain), self.loop)
            self.vlm_serving.reopen = self._reopen
        elif is_dataflow_serving(vlm_serving):
            if self.config.sentence_filter == "contrastive":
                raise ConfigError(CONTRASTIVE_UNSUPPORTED.format(name=type(vlm_serving).__name__))
            # The DataFlow serving itself is the attribute: the pipeline cleans it up directly.
            self.vlm_serving = vlm_serving
            self.chain = self._build(DataFlowServingBackend(vlm_serving))
        else:
            raise TypeError(
                "vlm_serving must be a scalecap Backend, a model name, a spec dict or a DataFlow "
                f"serving, not {type(vlm_serving).__name__}"
            )

    def _build(self, backend: Backend) -> ScaleCapChain:
        return self.loop.run(build_chain(backend, None, self.config, concurrency=self.concurrency))

    def _build_from_spec(self) -> ScaleCapChain:
        assert self._spec is not None
        spec = dict(self._spec)
        backend = spec.pop("backend", "vllm")
        model = spec.pop("model", None)
        if backend == "dataflow" and self.config.sentence_filter == "contrastive":
            raise ConfigError(CONTRASTIVE_UNSUPPORTED.format(name=spec.get("serving", "a DataFlow serving")))
        return self.loop.run(build_chain(backend, model, self.config, concurrency=self.concurrency, **spec))

    def _reopen(self) -> list[Backend]:
        self.chain = self._build_from_spec()
        return _engines(self.chain)

    @staticmethod
    def get_desc(lang: str = "zh") -> str:
        return _DESC["zh" if lang == "zh" else "en"]

    def caption_rows(
        self, rows: list[dict[str, Any]], input_image_key: str = "image"
    ) -> list[dict[str, Any]]:
        """Records for rows, in order; rows without a usable image get error records."""
        self._ensure_serving()
        items: list[ChainItem] = []
        index: list[int] = []
        records: list[dict[str, Any] | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            ref = _present(row.get(input_image_key))
            if _present(row.get("_error")):
                records[i] = self._input_error("InvalidRow", str(row["_error"]))
            elif ref is None or ref == "":
                records[i] = self._input_error("MissingImageKey", f"row has no {input_image_key!r} value")
            elif not isinstance(ref, str | bytes):
                kind = type(ref).__name__
                records[i] = self._input_error("InvalidImageRef", f"{input_image_key!r} is {kind}")
            else:
                items.append(ChainItem(source=ref, ref=ref if isinstance(ref, str) else "bytes"))
                index.append(i)
        done = self.loop.run(self.chain.caption_many(items))
        for i, record in zip(index, done, strict=True):
            records[i] = record
        return records  # type: ignore[return-value]

    def _ensure_serving(self) -> None:
        """After a pipeline's cleanup(), start the engines again (or say why that cannot be)."""
        handle = self.vlm_serving
        if not isinstance(handle, BackendServing):
            return
        if handle.closed:
            handle.start_serving()
        if self.chain.vlm is not handle.backends[0]:
            self.chain = self._build(handle.backends[0])
            handle.add(self.chain.llm)

    def _input_error(self, kind: str, message: str) -> dict[str, Any]:
        meta = base_meta(
            job=None,
            model=self.chain.vlm.model_name,
            llm_model=getattr(self.chain.llm, "model_name", None),
            config_hash=self.chain.config_hash,
        )
        return error_record({"stage": "input", "type": kind, "message": message}, meta)

    def run(self, storage: Any, input_image_key: str = "image", output_key: str = "scalecap_record") -> Any:
        """Caption every row of `storage` (a DataFlow storage) and return `[output_key]`.

        The rows with their records are written once, as the storage's next step. Given a pandas
        DataFrame instead, a new DataFrame with the `output_key` column is returned.
        """
        if hasattr(storage, "read") and hasattr(storage, "write"):
            df = storage.read("dataframe")
            legacy = self.config.input_jsonl_path
            if legacy and input_image_key not in df.columns:
                import pandas as pd

                df = pd.DataFrame(read_rows(legacy))
            df = self._with_records(df, input_image_key, output_key)
            drop = [c for c in ("_raw", "_error") if c in df.columns]
            df = df.drop(columns=drop) if drop else df
            storage.write(df)
            if self.config.output_jsonl_path:
                self._write_legacy_output(df, input_image_key, output_key)
            return [output_key]
        if hasattr(storage, "to_dict") and hasattr(storage, "columns"):
            return self._with_records(storage, input_image_key, output_key)
        raise TypeError("storage must be a DataFlow-style storage (read/write) or a pandas DataFrame")

    def _with_records(self, df: Any, input_image_key: str, output_key: str) -> Any:
        rows = df.to_dict(orient="records")
        records: list[Any] = self.caption_rows(rows, input_image_key)
        if self.record_format == "json":
            records = [json.dumps(r, ensure_ascii=False) for r in records]
        out = df.copy()
        out[output_key] = records
        return out

    def _write_legacy_output(self, df: Any, input_image_key: str, output_key: str) -> None:
        """DataFlow-MM's `output_jsonl_path`: one record per line, with the image it describes."""
        path = Path(str(self.config.output_jsonl_path))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for row in df.to_dict(orient="records"):
                record = row[output_key]
                if isinstance(record, str):
                    record = json.loads(record)
                line = {"image": _present(row.get(input_image_key)), **record}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")

    def close(self) -> None:
        """Release the engines (a DataFlow pipeline does this itself, through `vlm_serving`)."""
        if isinstance(self.vlm_serving, BackendServing):
            self.vlm_serving.cleanup()
            return
        self.loop.run(self.chain.vlm.aclose())
        cleanup = getattr(self.vlm_serving, "cleanup", None)
        if callable(cleanup):
            cleanup()
        if self.chain.llm is not self.chain.vlm:
            self.loop.run(self.chain.llm.aclose())


def _engines(chain: ScaleCapChain) -> list[Backend]:
    return [chain.vlm] if chain.llm is chain.vlm else [chain.vlm, chain.llm]
