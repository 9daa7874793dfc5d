#!/usr/bin/env bash
# A separate environment with diffusers, for the scheduler check (tests/test_diffusion_compat.py)
# and the sampling-speed comparison (benchmarks/diffusion_speed.py).
#
# diffusers itself needs no torchvision, so the CPU build of torch pinned in constraints/cpu.txt
# serves; it lives apart from the main venv only so that the main one stays small.
#
# Usage:  bash scripts/setup_diffusers_env.sh [VENV_DIR]   (default: .venv-diffusers in the repo root)
# Then:   VENV_DIR/bin/python -m pytest -m compat tests/test_diffusion_compat.py
#         VENV_DIR/bin/python benchmarks/diffusion_speed.py
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-diffusers}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q -c "$repo/constraints/cpu.txt" -e "$repo[dev]" "diffusers>=0.30"
"$venv/bin/python" -c "import diffusers, torch; print('diffusers', diffusers.__version__, 'torch', torch.__version__)"
