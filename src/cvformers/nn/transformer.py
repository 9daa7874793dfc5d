"""The pre-norm transformer block shared by the decoder models (GPT-2 / DALL-E style)."""

from __future__ import annotations

import torch
from torch import nn

from cvformers.nn.attention import AttentionPattern, KVCache, SelfAttention
from cvformers.nn.layers import Mlp


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). Pre-norm keeps deep stacks trainable without warm-up tricks."""

    def __init__(self, dim: int, heads: int, dim_head: int, pattern: AttentionPattern,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dim_head, pattern, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, pos)
        return x + self.mlp(self.norm2(x))
