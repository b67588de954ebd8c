#!/usr/bin/env bash
# The test command: sets up .venv if needed, lints, runs the test suite (no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests bench examples
.venv/bin/python -m pytest "$@"
