#!/usr/bin/env bash
# A separate environment with denoising-diffusion-pytorch (lucidrains), the second peer of
# `cvformers train ddpm` / `sample ddpm` (benchmarks/diffusion_speed_ddp.py). It imports
# torchvision, hence torch 2.14.1 from PyPI: see scripts/setup_torchvision_peer_env.sh.
#
# Usage:  bash scripts/setup_ddpm_peer_env.sh [VENV_DIR]    (default: .venv-ddp in the repo root)
# Then:   VENV_DIR/bin/python benchmarks/diffusion_speed_ddp.py --threads 1
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup_torchvision_peer_env.sh" "${1:-$(dirname "$here")/.venv-ddp}" "denoising-diffusion-pytorch>=2.0" denoising_diffusion_pytorch
