"""Small shared layers with timm's state-dict keys (``fc1``/``fc2``), used by every model."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> activation -> dropout -> Linear -> dropout.

    Keys ``fc1.*``/``fc2.*`` match timm's ``Mlp`` so that ViT/Mixer checkpoints load.
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None,
                 act: type[nn.Module] = nn.GELU, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared tensors counted once, as ``parameters()`` yields them)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
