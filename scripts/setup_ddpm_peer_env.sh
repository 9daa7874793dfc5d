#!/usr/bin/env bash
# A separate environment with denoising-diffusion-pytorch (lucidrains), the second peer of
# `cvformers train ddpm` / `sample ddpm` (benchmarks/diffusion_speed_ddp.py).
#
# denoising-diffusion-pytorch imports torchvision at module level, and PyPI's torchvision does not
# import beside the torch CPU build of constraints/cpu.txt (see scripts/setup_lightly_env.sh), so
# this environment takes torch 2.14.1 + torchvision 0.29.1 from PyPI (a CUDA build; it runs on the
# CPU). The benchmark runs cvformers in the same environment: both sides use the same torch.
#
# Usage:  bash scripts/setup_ddpm_peer_env.sh [VENV_DIR]    (default: .venv-ddp in the repo root)
# Then:   VENV_DIR/bin/python benchmarks/diffusion_speed_ddp.py --threads 1
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-ddp}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Pinned: an unpinned torch would pull whatever CUDA build is newest.
"$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install -q -e "$repo[dev]" "denoising-diffusion-pytorch>=2.0"
"$venv/bin/python" -c "import torch, denoising_diffusion_pytorch as d; print('torch', torch.__version__, 'denoising-diffusion-pytorch', d.__version__)"
echo "denoising-diffusion-pytorch environment ready: $venv"
