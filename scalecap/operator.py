"""`ImageScaleCaptionGenerate`: a drop-in for DataFlow's ScaleCap operator.

`run(storage, input_image_key, output_key)` reads the current step's rows, captions every image
concurrently on one engine, and writes every row back with its record under `output_key`, in one
write. Rows whose image cannot be read, or that have no image at all, get an error record: the
count of rows out always equals the count in.
"""

from __future__ import annotations

import math
from typing import Any

from scalecap.backends.base import Backend
from scalecap.chain import ChainItem, ScaleCapChain
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.engine_setup import build_chain
from scalecap.record import base_meta, error_record
from scalecap.runtime import BackgroundLoop, default_loop

_DESC = {
    "zh": (
        "ScaleCap 图像描述生成算子：先由视觉语言模型生成初始描述，再以有图/无图的 token 概率对比"
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
        "'golden' only when the image itself supports them (token probabilities with the image "
        "against without it); object and position questions are asked about them and answered by "
        "the VLM (with an optional second filter); a language model fuses everything into one "
        "dense, hallucination-filtered caption.\n"
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


class ImageScaleCaptionGenerate:
    """ScaleCap over a DataFlow storage or a pandas DataFrame.

    vlm_serving: a `Backend` (see scalecap.backends), or a model path/name to start the vLLM
        backend with, or a dict {"backend": "vllm"|"openai"|"transformers", "model": ..., **options}.
    """

    def __init__(
        self,
        vlm_serving: Backend | str | dict[str, Any],
        config: ImageScaleCaptionGenerateConfig | dict[str, Any] | None = None,
        *,
        concurrency: int = 64,
        loop: BackgroundLoop | None = None,
    ) -> None:
        if isinstance(config, dict):
            config = ImageScaleCaptionGenerateConfig.from_dict(config)
        self.config = config or ImageScaleCaptionGenerateConfig()
        self.loop = loop or default_loop()
        if isinstance(vlm_serving, str):
            spec: dict[str, Any] = {"backend": "vllm", "model": vlm_serving}
        elif isinstance(vlm_serving, dict):
            spec = dict(vlm_serving)
        else:
            spec = {"backend": vlm_serving}
        backend = spec.pop("backend", "vllm")
        model = spec.pop("model", None)
        self.chain: ScaleCapChain = self.loop.run(
            build_chain(backend, model, self.config, concurrency=concurrency, **spec)
        )

    @staticmethod
    def get_desc(lang: str = "zh") -> str:
        return _DESC["zh" if lang == "zh" else "en"]

    def caption_rows(
        self, rows: list[dict[str, Any]], input_image_key: str = "image"
    ) -> list[dict[str, Any]]:
        """Records for rows, in order; rows without a usable image get error records."""
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

    def _input_error(self, kind: str, message: str) -> dict[str, Any]:
        meta = base_meta(
            job=None,
            model=self.chain.vlm.model_name,
            llm_model=getattr(self.chain.llm, "model_name", None),
            config_hash=self.chain.config_hash,
        )
        return error_record({"stage": "input", "type": kind, "message": message}, meta)

    def run(self, storage: Any, input_image_key: str = "image", output_key: str = "scalecap_record") -> Any:
        """Caption every row of `storage` (a FileStorage-like object or a DataFrame).

        With a storage, the rows with their records are written once and the written path is
        returned; with a DataFrame, a new DataFrame with the `output_key` column is returned.
        """
        if hasattr(storage, "read") and hasattr(storage, "write"):
            df = storage.read("dataframe")
            df = self._with_records(df, input_image_key, output_key)
            drop = [c for c in ("_raw", "_error") if c in df.columns]
            return storage.write(df.drop(columns=drop) if drop else df)
        if hasattr(storage, "to_dict") and hasattr(storage, "columns"):
            return self._with_records(storage, input_image_key, output_key)
        raise TypeError("storage must be a DataFlow-style storage (read/write) or a pandas DataFrame")

    def _with_records(self, df: Any, input_image_key: str, output_key: str) -> Any:
        rows = df.to_dict(orient="records")
        records = self.caption_rows(rows, input_image_key)
        out = df.copy()
        out[output_key] = records
        return out

    def close(self) -> None:
        self.loop.run(self.chain.vlm.aclose())
        if self.chain.llm is not self.chain.vlm:
            self.loop.run(self.chain.llm.aclose())
