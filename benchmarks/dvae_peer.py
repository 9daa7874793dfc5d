"""Import DALLE-pytorch 1.6.6 (the peer of the dVAE / DALL-E benchmarks) in .venv-bench.

``import dalle_pytorch`` runs ``dalle_pytorch.vae``, which wraps OpenAI's dVAE and the VQGAN of
taming-transformers; taming needs torchvision and pytorch_lightning<2, and no torchvision
on PyPI imports beside torch 2.13.0 CPU. The benchmarks use only DALLE-pytorch's own classes
(DiscreteVAE, DALLE, CLIP), so this one module is replaced by classes that raise when used;
every other line of the package is its released code. See benchmarks/setup_peers.sh.
"""

from __future__ import annotations

import sys
import types
import warnings


class _Unavailable:
    reason = "needs taming-transformers (torchvision, pytorch_lightning<2), not installable beside torch 2.13.0 CPU"

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} is not available in .venv-bench: it {self.reason}")


def import_dalle_pytorch():
    if "dalle_pytorch" in sys.modules:
        return sys.modules["dalle_pytorch"]
    vae = types.ModuleType("dalle_pytorch.vae")
    vae.OpenAIDiscreteVAE = type("OpenAIDiscreteVAE", (_Unavailable,), {})
    vae.VQGanVAE = type("VQGanVAE", (_Unavailable,), {})
    sys.modules["dalle_pytorch.vae"] = vae
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            import dalle_pytorch
    except ImportError as e:
        del sys.modules["dalle_pytorch.vae"]
        raise SystemExit(f"dalle_pytorch not importable ({e}); run: bash benchmarks/setup_peers.sh "
                         f"and use .venv-bench/bin/python") from e
    return dalle_pytorch
