"""Layers shared by the vision backbones, with timm's state-dict keys.

``PatchEmbed`` (``proj``), ``ViTAttention`` (``qkv``, ``proj``) and ``ViTBlock`` (``norm1``, ``attn``,
``norm2``, ``mlp.fc1``, ``mlp.fc2``) carry the same parameter names and shapes as timm's
layers, so a timm ViT checkpoint loads with ``strict=True``.

ViTAttention has two paths that compute the same function:
- the default one calls ``F.scaled_dot_product_attention`` (fused kernel, never materialises
  the N×N matrix when it can avoid it);
- ``return_weights=True`` computes softmax(QKᵀ/√d + bias) explicitly and also returns it, for
  attention maps and rollout (``cvformers.pipelines.attention``). Tests hold the two equal.
One case takes an explicit path without returning weights: training on CPU with a 2-D float
mask over a short sequence (LSA's diagonal mask at 50 tokens), where q kᵀ + mask as one batched
product, softmax and @ v beat SDPA's masked kernel forward + backward (see ``attention``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cvformers.nn.layers import Mlp


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm with eps 1e-6, as in the ViT / Mixer reference code (and timm)."""
    return nn.LayerNorm(dim, eps=1e-6)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample (Huang et al. 2016).

    Used by Swin (§4.1, drop-path 0.2 for Swin-T) and available to every block; identity when
    the rate is 0 or in eval mode.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def drop_path_rates(final_rate: float, n: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 at the first block to ``final_rate``."""
    return [final_rate * i / max(n - 1, 1) for i in range(n)]


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping P×P patches and project each to ``dim`` (ViT §3.1).

    A stride-P convolution with a P×P kernel is exactly "flatten each patch, multiply by E".
    Returns tokens [B, N, dim] with N = (H/P)·(W/P), row-major over the patch grid.
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int, norm: bool = False):
        super().__init__()
        self.patch_size, self.norm = patch_size, norm
        if norm:
            # LayerNorm of each flattened patch, Linear, LayerNorm of the embedding (as lucidrains'
            # vit-pytorch): per-patch contrast normalisation, which speeds up training on small data
            patch_dim = in_chans * patch_size * patch_size
            self.norm_in = nn.LayerNorm(patch_dim)
            self.proj = nn.Linear(patch_dim, dim)
            self.norm_out = nn.LayerNorm(dim)
        else:
            self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        if self.norm:
            patches = rearrange(images, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=p, p2=p)
            return self.norm_out(self.proj(self.norm_in(patches)))
        return rearrange(self.proj(images), "b d gh gw -> b (gh gw) d")


def shift_diagonally(images: torch.Tensor, shift: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, 5C, H, W]: the image and its four copies moved ``shift`` pixels along
    each diagonal (zeros where they leave the frame): Shifted Patch Tokenization (Lee et al. 2021,
    §3.1, a shift of half a patch), so that each patch also sees its neighbours' edges."""
    s, (h, w) = shift, images.shape[-2:]
    padded = F.pad(images, (s, s, s, s))
    moved = [padded[..., s + dy : s + dy + h, s + dx : s + dx + w] for dy in (-s, s) for dx in (-s, s)]
    return torch.cat([images, *moved], dim=1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              dropout: float = 0.0, return_weights: bool = False, scale: float | None = None):
    """softmax(q kᵀ · scale + bias) v over [B, heads, N, d] tensors; scale defaults to 1/√d.

    ``bias`` is an additive float mask broadcastable to [B, heads, N, N] (Swin's relative
    position bias plus its -100 shifted-window mask), or a boolean one (True = may attend).
    Returns ``(out, weights or None)``.
    """
    if not return_weights:
        if _explicit_is_faster(q, bias, dropout):
            return _masked_attention_short(q, k, v, bias, scale), None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
        return out, None
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if bias is not None and bias.dtype == torch.bool:
        scores = scores.masked_fill(~bias, float("-inf"))
    elif bias is not None:
        scores = scores + bias
    weights = scores.softmax(dim=-1)
    dropped = F.dropout(weights, dropout) if dropout > 0 else weights
    return dropped @ v, weights


# Up to this many tokens, training with a 2-D float mask goes the explicit way: on one CPU thread
# at 50 tokens, 4 heads of 32, batch 64, forward + backward took 9.7 ms against SDPA's 11.6 ms
# (median of 21 alternating rounds). Without a mask SDPA was as fast (12.2 against 12.8 ms), and
# inference (no backward) was faster with SDPA, so both keep it.
EXPLICIT_MASKED_MAX_TOKENS = 64


def _explicit_is_faster(q: torch.Tensor, bias: torch.Tensor | None, dropout: float) -> bool:
    return (bias is not None and bias.ndim == 2 and bias.is_floating_point() and dropout == 0.0
            and q.device.type == "cpu" and q.shape[-2] <= EXPLICIT_MASKED_MAX_TOKENS and q.requires_grad)


def _masked_attention_short(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            scale: float | None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v with the [N, N] float mask added inside one batched product
    (``baddbmm``) over [B·heads, N, d]; the same function as SDPA with ``attn_mask=mask``."""
    b, h, n, d = q.shape
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(dim=-1), v).view(b, h, n, d)


@functools.lru_cache(maxsize=16)
def diagonal_mask(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[n, n] additive mask, -inf on the diagonal: LSA's "no token attends to itself". Made once
    per size (a float mask goes to SDPA as it is; a boolean one is converted on every call)."""
    with torch.inference_mode(False):  # a normal tensor even when first made under inference mode
        return torch.zeros(n, n, dtype=dtype, device=device).fill_diagonal_(float("-inf"))


class ViTAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. §3.2.2; ViT eq. 2) with one fused qkv Linear.

    ``locality=True`` is Locality Self-Attention (Lee et al. 2021, "Vision Transformer for
    Small-Size Datasets", §3.2): a learned softmax temperature (``log_scale``, the log of the
    factor on q·k, starting at log 1/√d) and diagonal masking (a token never attends to itself),
    which sharpen the attention of a ViT trained from scratch on small data.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0,
                 proj_dropout: float = 0.0, locality: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_dropout = attn_dropout
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)
        self.log_scale = nn.Parameter(torch.tensor(-0.5 * math.log(dim // num_heads))) if locality else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, return_weights: bool = False,
                queries: int | None = None):
        """x [B, N, dim] -> [B, N, dim]; with ``return_weights`` -> (out, weights [B, heads, N, N]).

        ``queries = m``: only the first m tokens ask (the output is [B, m, dim]); every token is
        still read as key and value. The same numbers as ``forward(x)[:, :m]`` for less work.
        """
        scale = None
        weight, b = self.qkv.weight, self.qkv.bias
        if self.log_scale is not None:  # LSA: the learned temperature scales q (SDPA takes only a
            # float scale), folded into q's rows of the weight and bias: a weight-sized product, not a q-sized one
            if bias is not None:
                raise ValueError("locality attention takes no extra bias")
            dim = x.shape[-1]
            rows = torch.cat([self.log_scale.exp().expand(dim), self.log_scale.new_ones(2 * dim)])
            weight, b, scale = weight * rows[:, None], None if b is None else b * rows, 1.0
            bias = diagonal_mask(x.shape[1], x.device, x.dtype)
        if queries is None:
            # timm's layout of the fused projection: output features ordered (qkv, head, head_dim).
            # Split on the qkv axis before moving the heads forward: the backward then stacks the three
            # gradients straight into qkv's layout, one copy instead of a stack plus a permuted copy.
            qkv = F.linear(x, weight, b).unflatten(-1, (3, self.num_heads, -1))
            q, k, v = (rearrange(t, "b n h d -> b h n d") for t in qkv.unbind(2))
        else:  # q of the asking tokens only, k and v of all: the fused weight's rows split (q | k, v)
            dim = x.shape[-1]
            q = F.linear(x[:, :queries], weight[:dim], None if b is None else b[:dim])
            q = rearrange(q, "b n (h d) -> b h n d", h=self.num_heads)
            kv = F.linear(x, weight[dim:], None if b is None else b[dim:]).unflatten(-1, (2, self.num_heads, -1))
            k, v = (rearrange(t, "b n h d -> b h n d") for t in kv.unbind(2))
            bias = None if bias is None else bias[..., :queries, :]
        dropout = self.attn_dropout if self.training else 0.0
        out, weights = attention(q, k, v, bias, dropout, return_weights, scale)
        out = self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))
        return (out, weights) if return_weights else out


class ViTBlock(nn.Module):
    """Pre-norm transformer block (ViT eq. 2-3): x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 dropout: float = 0.0, attn_dropout: float = 0.0, drop_path: float = 0.0,
                 locality: bool = False):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = ViTAttention(dim, num_heads, qkv_bias, attn_dropout, dropout, locality)
        self.drop_path = DropPath(drop_path)
        self.norm2 = layer_norm(dim)
        # exact (erf) GELU, as in the ViT reference and timm — not the tanh approximation
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor, return_weights: bool = False, queries: int | None = None):
        """x [B, N, dim] -> [B, N, dim]. ``queries = m`` updates only the first m tokens (output
        [B, m, dim], the same numbers as the full block's first m): what a last block needs when
        only the class token is read afterwards."""
        if return_weights:
            attn_out, weights = self.attn(self.norm1(x), return_weights=True, queries=queries)
        else:
            attn_out, weights = self.attn(self.norm1(x), queries=queries), None
        if queries is not None:
            x = x[:, :queries]
        x = x + self.drop_path(attn_out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, weights) if return_weights else x


class MixerBlock(nn.Module):
    """One Mixer layer (Tolstikhin et al. §2, eq. 1): token-mixing MLP, then channel-mixing MLP.

    The token-mixing MLP acts on each channel's column of length N = number of patches, shared
    across channels; the channel-mixing MLP acts on each token's row. Both pre-norm, residual.
    Keys match timm's ``MixerBlock``: norm1, mlp_tokens, norm2, mlp_channels.
    """

    def __init__(self, num_tokens: int, dim: int, tokens_hidden: int, channels_hidden: int,
                 dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.mlp_tokens = Mlp(num_tokens, tokens_hidden, dropout=dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = layer_norm(dim)
        self.mlp_channels = Mlp(dim, channels_hidden, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mlp_tokens(rearrange(self.norm1(x), "b n d -> b d n"))
        x = x + self.drop_path(rearrange(mixed, "b d n -> b n d"))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


def init_vit_weights(module: nn.Module) -> None:
    """Truncated-normal(0.02) Linear weights, zero biases, unit LayerNorms (the ViT/timm init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
