#!/usr/bin/env bash
# Make a separate venv with open_clip_torch for the weight-compatibility test
# (tests/test_clip_compat.py, marked `compat`).
#
# Why a separate environment: open_clip imports torchvision, and the torchvision build that
# matches the project's torch 2.13.0 CPU wheel is not available here; torch 2.14.1 +
# torchvision 0.29.1 are (a large CUDA build). Keeping them apart leaves the main venv alone.
#
# Usage: scripts/setup_openclip_env.sh [VENV_DIR]      (default: .venv-openclip in the repo)
# Then:  VENV_DIR/bin/python -m pytest -m compat tests/test_clip_compat.py
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-openclip}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --upgrade pip wheel >/dev/null
# Pinned: an unpinned `pip install torch` pulls whatever is newest.
"$venv/bin/pip" install "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/pip" install open_clip_torch pytest
"$venv/bin/pip" install -e "$repo"
"$venv/bin/python" - <<'PY'
import open_clip, torch
print("open_clip", open_clip.__version__, "torch", torch.__version__)
PY
