#!/usr/bin/env bash
# The benchmark environment: cvformers (editable, torch 2.13.0 CPU from the constraints file)
# plus the peer DALLE-pytorch 1.6.6, in .venv-bench at the repo root. Idempotent: rerunning it
# reuses the venv and only installs what is missing.
#
# DALLE-pytorch is installed --no-deps with only what `import dalle_pytorch` needs for its own
# DiscreteVAE / DALLE / CLIP classes:
#   axial-positional-embedding, rotary-embedding-torch (imported by dalle_pytorch.dalle_pytorch /
#   transformer), einops (already a cvformers dependency), and setuptools<81 (its __init__ calls
#   pkg_resources.get_distribution; setuptools 81+ no longer ships pkg_resources).
# Its module dalle_pytorch.vae (wrappers of OpenAI's dVAE and of taming-transformers' VQGAN) is
# NOT importable here: taming imports torchvision and pytorch_lightning<2, and no torchvision
# build on PyPI imports beside torch 2.13.0 CPU ("operator torchvision::nms does not exist").
# benchmarks/dvae_peer.py therefore imports dalle_pytorch with that one module replaced by
# classes that raise if used; the benchmarks use only DALLE-pytorch's own classes.
#
# Usage:  bash benchmarks/setup_peers.sh            then  .venv-bench/bin/python benchmarks/dvae_vs_dallepytorch.py
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv-bench}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/pip" install -q --disable-pip-version-check)

# cvformers itself (and torch pinned to the CPU build on local disk)
if ! "$venv/bin/python" -c "import cvformers, torch" 2>/dev/null; then
    "${pip[@]}" -c "$repo/constraints/cpu.txt" -e "$repo[dev]"
fi
# the peer, pinned, without its heavy dependency list (CUDA torch, torchvision, transformers, deepspeed …)
"${pip[@]}" -c "$repo/constraints/cpu.txt" --no-deps \
    "dalle-pytorch==1.6.6" "axial-positional-embedding==0.3.12" "rotary-embedding-torch==0.9.1" "setuptools<81"
# the ViT peer of benchmarks/classifiers_fmnist.py (its vit.py needs only torch and einops)
"${pip[@]}" --no-deps "vit-pytorch==1.26.14"

"$venv/bin/python" - <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from dvae_peer import import_dalle_pytorch
import torch, cvformers
dp = import_dalle_pytorch()
print(f"ok: dalle_pytorch {dp.__version__}, torch {torch.__version__}, cvformers from {cvformers.__file__}")
PY
