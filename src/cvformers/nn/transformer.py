"""The decoder layer: self-attention with a sparse pattern and a KV cache, and the pre-norm block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cvformers.nn.attention import AttentionPattern
from cvformers.nn.decode_linear import DecodeLinear
from cvformers.nn.layers import Mlp


@dataclass
class DecodeWeights:
    """A block's four products prepared for decode steps of a fixed number of rows (decode_linear)."""

    qkv: DecodeLinear
    proj: DecodeLinear
    fc1: DecodeLinear
    fc2: DecodeLinear


@dataclass
class KVCache:
    """One layer's state for a sampling run: preallocated keys and values ``kv`` [2, B, heads, S, d],
    filled by prefill, then one slot a step; and, when built by ``SparseTransformerBlock.new_cache``, the layer's
    weights prepared for B-row products (``weights``), which live exactly as long as the run.

    ``k``/``v`` are its two halves [B, heads, S, d]; ``k3``/``v3`` the same memory seen as
    [B·heads, S, d], the layout the decode step reads. Keys and values share one buffer so that a
    decode step stores both with one copy.
    """

    kv: torch.Tensor
    weights: DecodeWeights | None = None

    def __post_init__(self):
        _, B, heads, S, d = self.kv.shape
        self.k, self.v = self.kv[0], self.kv[1]
        self.k3, self.v3 = self.k.view(B * heads, S, d), self.v.view(B * heads, S, d)

    @classmethod
    def empty(cls, batch: int, heads: int, seq_len: int, dim_head: int, device=None, dtype=None,
              weights: DecodeWeights | None = None):
        return cls(torch.zeros(2, batch, heads, seq_len, dim_head, device=device, dtype=dtype), weights)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection and a sparse pattern.

    ``forward(x)`` on the whole sequence uses the pattern's fast path. With a ``cache``:
    ``x`` of length L > 1 starting at 0 is a prefill (fast path, padded to S, keys stored);
    ``x`` of length 1 at ``pos`` is one decode step that reads only the pattern's slots.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, pattern: AttentionPattern,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.heads, self.dim_head, self.pattern = heads, dim_head, pattern
        inner = heads * dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.proj = nn.Linear(inner, dim, bias=bias)
        self.attn_dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def _split(self, x):
        q, k, v = rearrange(self.qkv(x), "b s (three n d) -> three b n s d", three=3, n=self.heads)
        return q, k, v

    def decode(self, x: torch.Tensor, cache: KVCache, pos: int, residual: torch.Tensor | None = None) -> torch.Tensor:
        """One token x [B, dim] at ``pos`` -> [B, dim], plus ``residual`` if given (inference: no dropout).

        Written with functional calls on 2-D tensors: it runs once per layer per sampled token,
        and at small widths module-call and reshape overhead is a visible share of a step. The
        products use the cache's prepared weights when it has them.
        """
        B, heads, d = x.shape[0], self.heads, self.dim_head
        w = cache.weights
        qkv_w, proj_w = (w.qkv, w.proj) if w is not None else (DecodeLinear(self.qkv), DecodeLinear(self.proj))
        qkv = qkv_w(x).view(B, 3, heads, d)
        cache.kv.select(3, pos).copy_(qkv[:, 1:].transpose(0, 1))  # [2, B, heads, d]: k and v in one copy
        q = (qkv[:, 0] * d**-0.5).view(B * heads, 1, d)  # the scale, and the copy to [B·heads, 1, d], in one op
        out = self.pattern.decode_attend(q, cache.k3, cache.v3, pos).view(B, heads * d)  # from [B·heads, 1, d]
        return proj_w(out) if residual is None else proj_w.add(out, residual)

    def store(self, x: torch.Tensor, cache: KVCache) -> None:
        """Only the keys and values of x [B, L, dim] (positions 0..L-1) into ``cache``: for a layer
        whose outputs are not needed at these positions (the last layer of a prefill)."""
        inner = self.heads * self.dim_head
        bias = None if self.qkv.bias is None else self.qkv.bias[inner:]
        kv = F.linear(x, self.qkv.weight[inner:], bias)
        cache.kv[:, :, :, : x.shape[1]] = rearrange(kv, "b s (two n d) -> two b n s d", two=2, n=self.heads)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The weights of the reference path, written out for pictures: x [B, S, dim] (the whole
        sequence) -> [B, heads, S, S], softmax over the keys the pattern's dense mask allows."""
        q, k, _ = self._split(x)
        scores = (q @ k.transpose(-2, -1)) * self.dim_head**-0.5
        allowed = self.pattern.dense_mask(x.device)[: x.shape[1], : x.shape[1]]
        return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        length, S = x.shape[1], self.pattern.seq_len
        if cache is not None and length == 1:  # one decode step
            return self.decode(x[:, 0], cache, pos)[:, None]
        q, k, v = self._split(x)
        if cache is not None:  # prefill of a prefix
            if pos != 0:
                raise ValueError("a multi-token forward with a cache must start at position 0")
            cache.k[:, :, :length] = k
            cache.v[:, :, :length] = v
        if length > S:
            raise ValueError(f"sequence of {length} tokens is longer than the pattern's {S}")
        drop = self.attn_dropout if self.training else 0.0
        if length <= self.pattern.text_len:  # text only (a sampling prefill): causal over text in every pattern
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            if length < S:  # a causal prefix: pad to the full sequence, the padding is never seen
                pad = (0, 0, 0, S - length)
                q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
            out = self.pattern.attend(q, k, v, dropout_p=drop)[:, :, :length]
        return self.proj_drop(self.proj(rearrange(out, "b n s d -> b s (n d)")))


class SparseTransformerBlock(nn.Module):
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

    def decode_weights(self, rows: int | None) -> DecodeWeights:
        """The block's products prepared for ``rows``-row decode steps (None: plain F.linear)."""
        attn, mlp = self.attn, self.mlp
        return DecodeWeights(*(DecodeLinear(m, rows) for m in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)))

    def new_cache(self, batch: int, seq_len: int, packed: bool = True, device=None, dtype=None) -> KVCache:
        """An empty cache for ``batch`` sequences, with the weights packed for ``batch`` rows if ``packed``."""
        return KVCache.empty(batch, self.attn.heads, seq_len, self.attn.dim_head, device=device, dtype=dtype,
                             weights=self.decode_weights(batch if packed else None))

    def decode(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """``forward`` for one token x [B, dim] at ``pos`` against ``cache`` (inference: no dropout)."""
        n1, n2, mlp = self.norm1, self.norm2, self.mlp
        w = cache.weights if cache.weights is not None else self.decode_weights(None)
        x = self.attn.decode(F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps), cache, pos, x)
        h = F.layer_norm(x, n2.normalized_shape, n2.weight, n2.bias, n2.eps)
        # the fused GELU is the exact one: any other activation runs on its own
        exact_gelu = type(mlp.act) is nn.GELU and mlp.act.approximate == "none"
        return w.fc2.add(w.fc1.gelu(h) if exact_gelu else mlp.act(w.fc1(h)), x)
