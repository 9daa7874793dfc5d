"""Building blocks of the denoising U-Net of DDPM (Ho et al. 2020, arXiv 2006.11239, appendix B).

DDPM's network is "a U-Net backbone similar to an unmasked PixelCNN++ with group normalization":
residual blocks of GroupNorm -> SiLU -> 3×3 conv, into which the diffusion timestep enters as a
sinusoidal embedding ("Transformer sinusoidal position embedding"; here as the scale and shift of
the second norm, see ``ResBlock``),
and self-attention blocks at the 16×16 feature maps. GLIDE (Nichol et al. 2021, §2.3) and
unCLIP (Ramesh et al. 2022, §2.1) condition the same network on text / CLIP: a vector added to
the timestep embedding (handled by ``cvformers.models.unet``), and a sequence of context tokens
that "is separately projected to the dimensionality of each attention layer ... and then
concatenated to the attention context at each layer" (``SpatialSelfAttention(context_dim=...)``).

Every residual branch ends in a zero-initialised convolution (as in the DDPM and guided-diffusion
reference code), so each block starts as the identity and the U-Net starts as a plain stack of
its input conv, resamplers and output conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps: t [B] (int or float) -> [B, dim], float32.

    The Transformer's position encoding (Vaswani et al. 2017 §3.5), with frequencies
    max_period^(-i / half) for i = 0 .. half-1, laid out as [cos | sin] halves (the order of
    guided-diffusion / GLIDE; DDPM's TF code puts sin first, which a learned MLP after it
    cannot tell apart). An odd ``dim`` gets a zero column at the end.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups that divides ``channels`` and is <= ``groups``.

    DDPM uses 32 groups everywhere; narrow test models (8 or 12 channels) fall back to fewer.
    eps 1e-6 as ``tf.contrib.layers.group_norm``, which the DDPM reference calls (diffusers'
    default is 1e-5, hence the parameter).
    """
    n = max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(n, channels, eps=eps)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor, scale: torch.Tensor | None = None,
              shift: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(GroupNorm(x) · (1 + scale) + shift), or SiLU(GroupNorm(x)) without a scale.

    The scale and shift go in with one ``addcmul`` and the SiLU runs in place on the norm's fresh
    output: two fewer temporaries of the feature map's size than the module-by-module form.
    """
    h = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    if scale is not None:
        h = torch.addcmul(shift, h, 1 + scale)
    return F.silu(h, inplace=True)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias, so that the residual branch it ends starts at 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block: skip(x) + conv(drop(act(norm(conv(act(norm(x)))) · (1 + scale) + shift))).

    ``emb`` [B, emb_dim] (timestep plus any conditioning) goes through SiLU and a Linear to a
    per-channel (scale, shift) applied after the second GroupNorm: the adaptive group norm of
    Dhariwal & Nichol 2021 (§3, "AdaGN"), which guided-diffusion, GLIDE and unCLIP use. Departure
    from DDPM, which *adds* the embedding before that norm: with the narrow U-Nets a CPU trains,
    GroupNorm's groups shrink to single channels, and a per-channel constant added before a
    per-channel normalisation is subtracted again — the timestep and the label would not reach
    the branch at all. When the width changes the skip is a 1×1 conv ("nin_shortcut").
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, groups: int = 32,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch, groups, eps)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        scale, shift = rearrange(self.emb_proj(F.silu(emb)), "b (two c) -> two b c 1 1", two=2)
        h = self.conv2(self.drop(norm_silu(self.norm2, h, scale, shift)))
        return self.skip(x) + h


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions of a feature map, with a residual add.

    DDPM's ``attn_block`` (one head) with several heads as in guided-diffusion. With
    ``context_dim > 0`` a ``context`` [B, L, context_dim] (text-encoder tokens in GLIDE, plus
    unCLIP's four CLIP tokens) is projected by one Linear to keys and values that are
    concatenated to the spatial ones: every pixel may attend to every token, with no extra
    cross-attention layer (GLIDE §2.3, ``encoder_kv`` in its code).
    """

    def __init__(self, channels: int, heads: int, context_dim: int = 0, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} is not divisible by heads {heads}")
        self.heads = heads
        self.norm = group_norm(channels, groups, eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim > 0 else None
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], context [B, L, context_dim] or None -> [B, C, H, W]."""
        height = x.shape[2]
        # fused projection laid out (q|k|v, head, head_dim) along the channels, as timm's qkv
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three h d) y x -> three b h (y x) d",
                            three=3, h=self.heads)
        if context is not None:
            if self.context_kv is None:
                raise ValueError("this attention layer was built without context_dim; it cannot read a context")
            ck, cv = rearrange(self.context_kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        # head_dim must be the contiguous axis, or SDPA on CPU falls back to its slower math path
        # (a copy, then -inf checks on every row); an 8x8 layer at batch 16: 5.3 ms -> 2.4 ms
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return x + self.proj(rearrange(out, "b h (y x) d -> b (h d) y x", y=height))


class Downsample(nn.Module):
    """Halve the sides with a stride-2 3×3 conv (DDPM ``downsample`` with ``with_conv=True``)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the sides: nearest-neighbour ×2, then a 3×3 conv (DDPM ``upsample``)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
