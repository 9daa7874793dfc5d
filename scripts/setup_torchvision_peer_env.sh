#!/usr/bin/env bash
# A peer's environment for a package that imports torchvision (lightly, denoising-diffusion-pytorch).
#
# PyPI's torchvision does not import beside the torch CPU build of constraints/cpu.txt ("operator
# torchvision::nms does not exist": its compiled ops are built against PyPI's CUDA torch), so the
# environment takes torch 2.14.1 + torchvision 0.29.1 from PyPI, which import together (a large CUDA
# build; it runs on the CPU), and cvformers beside the peer: a benchmark then runs both sides of a
# comparison with the same torch.
#
# Usage:  bash scripts/setup_torchvision_peer_env.sh VENV_DIR "PACKAGE>=VERSION" IMPORT_NAME
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$1" package="$2" module="$3"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Pinned: an unpinned torch would pull whatever CUDA build is newest.
"$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install -q -e "$repo[dev]" "$package"
"$venv/bin/python" -c "import torch, torchvision, $module as m; print('torch', torch.__version__, 'torchvision', torchvision.__version__, '$module', getattr(m, '__version__', '?'))"
echo "environment ready: $venv"
