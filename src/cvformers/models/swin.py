"""Swin Transformer (Liu et al. 2021, "Hierarchical Vision Transformer using Shifted Windows").

- §3.1: 4×4 patches are embedded (a linear layer, here the stride-4 conv), then stages of Swin
  blocks alternate with *patch merging*, which concatenates each 2×2 group of neighbours (4C),
  layer-norms it and projects to 2C: resolution halves and width doubles per stage.
- §3.2: self-attention is computed inside non-overlapping M×M windows (cost linear in image
  size); successive blocks alternate regular windows and windows shifted by ⌊M/2⌋, which links
  neighbouring windows. The shift is done as a *cyclic* shift of the feature map, and an
  attention mask keeps tokens that were not neighbours before the roll from attending to each
  other ("efficient batch computation for shifted configuration", fig. 4).
- §3.2 "Relative position bias": each head adds B ∈ R^{M²×M²} to QKᵀ/√d, read from a learned
  table B̂ ∈ R^{(2M-1)×(2M-1)} by the relative offset of the two tokens.

As in the official code, a stage whose resolution is not larger than the window uses one window
covering it and no shift. The classifier head is LayerNorm + global average pooling + Linear.

State-dict keys are timm's ``SwinTransformer`` (timm >= 0.9), so its checkpoints load: the patch
merging that halves the resolution opens the next stage (``layers.{i}.downsample`` for i >= 1)
instead of closing a stage; ``patch_embed.{proj,norm}``, ``layers.N.blocks.M.{norm1,
attn.qkv, attn.proj, attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}``, ``norm``,
``head.fc``. Weights saved with the earlier layout (downsample at a stage's end,
``patch_embed``/``patch_norm``/``head`` as bare layers) are renamed when loaded
(``SwinTransformer.upgrade_state_dict``), as are those of timm < 0.9 and the official code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from cvformers.nn.heads import ClassifierMixin
from cvformers.nn.layers import Mlp
from cvformers.nn.vision_layers import ViTAttention, DropPath, drop_path_rates, init_vit_weights

MASKED = -100.0  # additive score for pairs the shifted-window mask forbids (official value)


@dataclass
class SwinConfig:
    image_size: int = 224  # input side; must be patch_size · window_size · 2^(stages-1) compatible
    patch_size: int = 4  # side of the embedded patches (paper: 4)
    in_chans: int = 3  # image channels
    num_classes: int = 1000  # outputs of the head; 0 = no head (features)
    embed_dim: int = 96  # C: width of stage 1 (Swin-T: 96)
    depths: tuple[int, ...] = (2, 2, 6, 2)  # blocks per stage (Swin-T)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # heads per stage (head dim 32)
    window_size: int = 7  # M: window side in tokens
    mlp_ratio: float = 4.0  # MLP hidden width / C
    qkv_bias: bool = True  # bias in the qkv projection
    dropout: float = 0.0  # dropout after the embedding, in MLPs and after projections
    attn_dropout: float = 0.0  # dropout on attention weights
    drop_path: float = 0.1  # stochastic depth at the last block (§4.1: 0.2 for Swin-T on ImageNet)


def relative_position_index(window: int) -> torch.Tensor:
    """[M², M²] index into the (2M-1)² bias table for each (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # [2, M², M²], each in [0, 2M-2]
    return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B · nW, M², C], windows in row-major order."""
    return rearrange(x, "b (nh m1) (nw m2) c -> (b nh nw) (m1 m2) c", m1=window, m2=window)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``window_partition``: [B · nW, M², C] -> [B, H, W, C]."""
    return rearrange(windows, "(b nh nw) (m1 m2) c -> b (nh m1) (nw m2) c",
                     nh=h // window, nw=w // window, m1=window, m2=window)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask [nW, M², M²]: 0 where two tokens of a window came from the same region of the
    un-rolled map, ``MASKED`` otherwise (§3.2, fig. 4)."""
    region = torch.zeros(h, w)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[rows, cols] = label
            label += 1
    ids = window_partition(region[None, :, :, None], window).squeeze(-1)  # [nW, M²]
    same = ids[:, :, None] == ids[:, None, :]
    return torch.zeros(same.shape).masked_fill(~same, MASKED)


class WindowAttention(ViTAttention):
    """Multi-head attention inside each window plus the learned relative position bias (§3.2).

    Same ``qkv``/``proj`` layers as ViT's ``ViTAttention``; adds ``relative_position_bias_table``.
    """

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True,
                 attn_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias, attn_dropout, proj_dropout)
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        """windows [B · nW, M², C]; mask [nW, M², M²] or None."""
        n = self.window**2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(n, n, -1).permute(2, 0, 1)  # [heads, M², M²]
        if mask is not None:
            num_windows = mask.shape[0]
            batch = windows.shape[0] // num_windows
            bias = bias[None] + mask[:, None]  # [nW, heads, M², M²]
            bias = bias[None].expand(batch, -1, -1, -1, -1).reshape(batch * num_windows, -1, n, n)
        return super().forward(windows, bias=bias.to(windows.dtype), return_weights=return_weights)


class SwinBlock(nn.Module):
    """(Shifted-)window attention block, pre-norm with residuals (§3.1, eq. 3)."""

    def __init__(self, dim: int, num_heads: int, resolution: int, window: int, shift: int,
                 mlp_ratio: float, qkv_bias: bool, dropout: float, attn_dropout: float, drop_path: float):
        super().__init__()
        if resolution <= window:  # one window covers the map: nothing to shift (official code)
            window, shift = resolution, 0
        if resolution % window:
            raise ValueError(f"feature map of side {resolution} is not a multiple of the window {window}")
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias, attn_dropout, dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout)
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        """x [B, H, W, C] -> same shape; with ``return_weights`` also [B · nW, heads, M², M²]."""
        h, w = x.shape[1:3]
        if (h, w) != (self.resolution, self.resolution):
            raise ValueError(f"Swin block built for {self.resolution}x{self.resolution} tokens, got {h}x{w}")
        shortcut = x
        x = self.norm1(x)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        out = self.attn(window_partition(x, self.window), self.attn_mask, return_weights=return_weights)
        out, weights = out if return_weights else (out, None)
        x = window_merge(out, self.window, h, w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, weights) if return_weights else x


class PatchMerging(nn.Module):
    """Concatenate each 2×2 neighbourhood (4C), LayerNorm, Linear to 2C (§3.1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "b (h dh) (w dw) c -> b h w (dw dh c)", dh=2, dw=2)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Patch merging of the previous stage's map (stages after the first, as timm) then Swin blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, resolution: int, window: int,
                 cfg: SwinConfig, drop_paths: list[float], downsample: bool):
        super().__init__()
        self.downsample = PatchMerging(in_dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, resolution, window, 0 if i % 2 == 0 else window // 2,
                      cfg.mlp_ratio, cfg.qkv_bias, cfg.dropout, cfg.attn_dropout, drop_paths[i])
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class SwinPatchEmbed(nn.Module):
    """Non-overlapping P×P patches -> C channels (a stride-P conv), LayerNorm; output [B, H/P, W/P, C]."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(rearrange(self.proj(images), "b c h w -> b h w c"))


class SwinHead(nn.Module):
    """Global average pooling of the [B, H, W, C] map, then ``fc`` (timm's ``ClassifierHead`` keys)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean(dim=(1, 2)))


_STAGE_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(.+)")


def upgrade_swin_keys(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Rename the keys of a Swin under ``prefix`` from the layout with the patch merging at the end
    of a stage (the official code, timm < 0.9, cvformers before the timm layout) to timm's current
    one; drop the index and mask buffers older timm saved (they are rebuilt). Other keys, and a
    state already in the current layout, pass unchanged. Values are not touched (tensors or shapes)."""
    if not any(k.startswith(prefix) for k in state):
        return state
    old_stages = f"{prefix}layers.0.downsample.reduction.weight" in state  # stage 0 never merges now
    renames = {"patch_embed.weight": "patch_embed.proj.weight", "patch_embed.bias": "patch_embed.proj.bias",
               "patch_norm.weight": "patch_embed.norm.weight", "patch_norm.bias": "patch_embed.norm.bias",
               "head.weight": "head.fc.weight", "head.bias": "head.fc.bias"}
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        rest = key[len(prefix):]
        if rest.endswith(("relative_position_index", "attn_mask")):
            continue
        if rest in renames:
            rest = renames[rest]
        elif old_stages and (m := _STAGE_DOWNSAMPLE.fullmatch(rest)):
            rest = f"layers.{int(m[1]) + 1}.downsample.{m[2]}"
        out[prefix + rest] = value
    return out


class SwinTransformer(ClassifierMixin, nn.Module):
    classifier_name = "head.fc"  # timm's ClassifierHead keeps its Linear there

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        if len(cfg.depths) != len(cfg.num_heads):
            raise ValueError("depths and num_heads need one entry per stage")
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        if cfg.image_size % cfg.patch_size or grid % 2 ** (len(cfg.depths) - 1):
            raise ValueError(
                f"image_size {cfg.image_size} must be a multiple of patch_size·2^(stages-1) = "
                f"{cfg.patch_size * 2 ** (len(cfg.depths) - 1)}"
            )
        self.patch_embed = SwinPatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = drop_path_rates(cfg.drop_path, sum(cfg.depths))
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            start = sum(cfg.depths[:i])
            dim = cfg.embed_dim * 2**i
            self.layers.append(SwinStage(
                dim // 2 if i else dim, dim, depth, heads, grid // 2**i, cfg.window_size, cfg,
                rates[start : start + depth], downsample=i > 0,
            ))
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = SwinHead(self.num_features, cfg.num_classes)
        self.apply(init_vit_weights)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> final feature map [B, H/32, W/32, 8C] (for 4 stages), normed."""
        h, w = images.shape[-2:]
        if (h, w) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(
                f"this Swin takes {self.cfg.image_size}x{self.cfg.image_size} images "
                f"(its windows and masks are laid out for that grid), got {h}x{w}; resize first"
            )
        x = self.pos_drop(self.patch_embed(images))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def upgrade_state_dict(self, state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """``state`` with this model's keys (under ``prefix``) in the current layout; see ``upgrade_swin_keys``.
        ``cvformers.loading`` calls it before comparing a weight file with the model."""
        return upgrade_swin_keys(state, prefix)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict passes its own copy of the dict down: renaming in place is how torch's
        # modules upgrade old keys (BatchNorm's num_batches_tracked does the same)
        upgraded = upgrade_swin_keys(state_dict, prefix)
        if upgraded is not state_dict:
            state_dict.clear()
            state_dict.update(upgraded)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
