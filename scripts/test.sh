#!/usr/bin/env bash
# The test command: sets up .venv if needed, lints, runs the test suite (no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# CI must run the browser tests (tests/chromium.py fails them there when no browser is found), so
# install Debian's Chromium if it is missing; `apt-get update` only if the install fails (stale
# package lists). Outside CI nothing is installed: those tests skip.
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null \
  && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
  apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
  "${apt[@]}" install -y --no-install-recommends chromium \
    || { "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends chromium; }
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests bench examples
.venv/bin/python -m pytest "$@"
