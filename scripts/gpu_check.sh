#!/usr/bin/env bash
# The GPU path measured in one call (bench/gpu_check.py): a weight-less Qwen2.5-VL-3B-shaped model
# (vLLM --load-format dummy), `bench.chain_throughput --full-lengths --num-images 256` on it, then
# redis-server, one `scalecap worker` on the GPU and the I/O worker captioning a batch through the
# queue; one table: serial, concurrent and stage-batched img/s, the fleet's img/s and its ratio to
# the in-process chain, scoring requests per image, GPU memory used.
#
# Usage: scripts/gpu_check.sh [--bundle DIR] [--cpu] [bench.gpu_check options, e.g. --num-images 64]
#   --bundle DIR  first install an offline bundle (scripts/offline_bundle.sh) into .gpu/venv, a
#                 virtualenv that sees the machine's own torch (--system-site-packages)
#   --cpu         this CPU machine instead: the tiny model, a few images (what CI runs)
# On a GPU: about 7 minutes estimated for 256 images (engine starts twice, ~1 min each).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
bundle="" args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$bundle" ]; then
  venv=${SCALECAP_GPU_VENV:-.gpu/venv}
  [ -x "$venv/bin/python" ] || "${py:-python3}" -m venv --system-site-packages "$venv"
  PYTHON="$venv/bin/python" bash scripts/offline_install.sh "$bundle"
  py="$venv/bin/python"
fi
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PATH="$(cd "$(dirname "$py")" && pwd):$PATH"  # the bundle's redis-server, the venv's tools
exec "$py" -m bench.gpu_check "${args[@]}"
