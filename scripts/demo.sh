#!/usr/bin/env bash
# The main job: sets up .venv if needed, then merges small generated experts end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python examples/merge_tiny.py "$@"
