#!/usr/bin/env bash
# A separate environment with lightly, the peer of `cvformers train dino`
# (benchmarks/dino_speed.py: training images/s and k-NN accuracy of lightly's DINOLoss +
# DINOProjectionHead around the same ViT, crops and steps). lightly imports torchvision.ops, hence
# torch 2.14.1 from PyPI: see scripts/setup_torchvision_peer_env.sh.
#
# Usage:  bash scripts/setup_lightly_env.sh [VENV_DIR]    (default: .venv-lightly in the repo root)
# Then:   VENV_DIR/bin/python benchmarks/dino_speed.py
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup_torchvision_peer_env.sh" "${1:-$(dirname "$here")/.venv-lightly}" "lightly>=1.5" lightly
