"""Tensors a training task computes once per run and keeps beside it: DALL-E's image ids of the
dataset, unCLIP's CLIP embeddings. A cache never stops a run: a torn, foreign or stale file is
computed again (with a warning when it could not be read)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch


def cached_tensors(path: Path, key: str, names: tuple[str, ...], compute: Callable[[], dict[str, torch.Tensor]],
                   fits: Callable[[dict[str, torch.Tensor]], bool] = lambda tensors: True,
                   what: str = "computing") -> dict[str, torch.Tensor]:
    """The tensors ``names`` from the safetensors file ``path`` when its metadata ``key`` matches
    and ``fits`` accepts them, else ``compute()`` once and write them atomically with that key
    (the key says what they were computed from: weights, data, split)."""
    from safetensors import safe_open
    from safetensors.torch import save

    from cvformers.utils import atomic_write_bytes

    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    tensors = {name: f.get_tensor(name) for name in names}
                    if fits(tensors):
                        return tensors
        except Exception as e:  # a torn or foreign file: safetensors raises several types
            print(f"warning: {path} is unreadable ({type(e).__name__}); {what} again", file=sys.stderr)
    tensors = compute()
    atomic_write_bytes(path, save({name: tensors[name].contiguous() for name in names}, metadata={"key": key}))
    return tensors
