#!/usr/bin/env bash
# A separate environment for the timm compatibility check (tests/test_vision_timm_compat.py).
#
# Why separate: timm imports torchvision, and PyPI's torchvision does not import beside the
# torch 2.13.0 CPU build of the main venv. torch 2.14.1 + torchvision 0.29.1 do import together
# (a large CUDA build, ~5.5 GB; it still runs on the CPU). cvformers is installed editable so the
# check runs against the working tree.
#
# Usage:  bash scripts/setup_timm_env.sh [VENV_DIR]      (default: .venv-timm in the repo root)
# Then:   VENV_DIR/bin/python -m pytest -m compat tests/test_vision_timm_compat.py
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-timm}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip >/dev/null
# Pinned: an unpinned torch would pull whatever CUDA build is newest.
"$venv/bin/python" -m pip install "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install timm pytest
"$venv/bin/python" -m pip install --no-deps -e "$repo"
# cvformers' own light dependencies (torch is already there, so pip keeps it).
"$venv/bin/python" -m pip install numpy pillow safetensors tokenizers einops tqdm
"$venv/bin/python" -c "import torch, torchvision, timm, cvformers; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
echo "timm environment ready: $venv"
