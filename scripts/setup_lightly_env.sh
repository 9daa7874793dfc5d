#!/usr/bin/env bash
# A separate environment with lightly, the peer of `cvformers train dino`
# (benchmarks/dino_speed.py: training images/s and k-NN accuracy of lightly's DINOLoss +
# DINOProjectionHead around the same ViT, crops and steps).
#
# lightly imports torchvision.ops, and PyPI's torchvision 0.28.0 (the release for torch 2.13) does
# not import beside the torch 2.13.0 CPU build of constraints/cpu.txt ("operator torchvision::nms
# does not exist": its compiled ops are built against PyPI's CUDA torch). As in
# scripts/setup_timm_env.sh, the environment takes torch 2.14.1 + torchvision 0.29.1 from PyPI,
# which import together (a large CUDA build; it runs on the CPU). The benchmark runs cvformers in
# the same environment, so both sides of a comparison use the same torch.
#
# Usage:  bash scripts/setup_lightly_env.sh [VENV_DIR]    (default: .venv-lightly in the repo root)
# Then:   VENV_DIR/bin/python benchmarks/dino_speed.py
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-lightly}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Pinned: an unpinned torch would pull whatever CUDA build is newest.
"$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install -q -e "$repo[dev]" "lightly>=1.5"
"$venv/bin/python" -c "import torch, torchvision, lightly; from lightly.loss import DINOLoss; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightly', lightly.__version__)"
echo "lightly environment ready: $venv"
