"""Denoising U-Net of DDPM (Ho et al. 2020, arXiv 2006.11239, appendix B), with GLIDE / unCLIP inputs.

The network maps a noisy image x_t and its timestep t to a tensor of x's shape (the predicted
noise ε, or v: the diffusion model that owns the U-Net decides). Its layout is the DDPM
reference's (``diffusion_tf/models/unet.py``):

- the timestep goes through ``timestep_embedding`` (width ``base_channels``) and an MLP
  Linear -> SiLU -> Linear to ``4·base_channels``: the embedding every ResBlock reads;
- a 3×3 input conv, then a down path of ``len(channel_mults)`` levels, level i being
  ``base_channels · channel_mults[i]`` wide and ``image_size / 2^i`` on a side: ``num_res_blocks``
  ResBlocks (each followed by self-attention when the side is in ``attention_resolutions``),
  then a stride-2 conv except at the last level. Every block's output is kept as a skip;
- a middle of ResBlock, attention, ResBlock at the lowest resolution;
- an up path mirroring the down path, deepest level first: ``num_res_blocks + 1`` ResBlocks per
  level, each reading the concatenation of the running features and the next skip (so every
  skip is read exactly once), then nearest ×2 + conv except at the top level;
- GroupNorm, SiLU and a zero-initialised 3×3 conv to ``in_channels``: the output starts at 0.

Conditioning (all optional, all added to the timestep embedding or read by attention):
- ``num_classes > 0``: a label embedding (improved DDPM / ADM) with one extra row, index
  ``num_classes``, meaning "no label", which classifier-free guidance (Ho & Salimans 2021) trains
  by dropping labels and uses for the unconditional prediction;
- ``cond_dim > 0``: a vector such as a CLIP image embedding, projected by a Linear and added to
  the timestep embedding (unCLIP §2.1: "projecting and adding CLIP embeddings to the existing
  timestep embedding"); a missing ``cond`` is the zero vector, which is how unCLIP drops it for
  guidance ("randomly setting the CLIP embeddings to zero ... 10% of the time");
- ``context_dim > 0``: context tokens [B, L, context_dim] (GLIDE's text-encoder outputs, plus
  unCLIP's four CLIP tokens, prepared by the caller) that every attention layer projects to
  extra keys and values (GLIDE §2.3);
- ``cond_channels > 0``: an image [B, cond_channels, H, W] concatenated to x before the input conv,
  the low-resolution image (upsampled to H×W) that a super-resolution model is conditioned on
  (SR3, Saharia et al. 2021; unCLIP's upsamplers, §2.1).

Departures from the DDPM reference: the timestep reaches each ResBlock as the scale and shift of
its second GroupNorm (ADM's adaptive group norm, see ``ResBlock`` for why), several attention
heads instead of one (guided-diffusion's choice), PyTorch's default initialisation instead of TF's
fan-average uniform one (as guided-diffusion), and GroupNorm falls back to fewer than 32 groups
for narrow widths. ADM's BigGAN resampling blocks (Dhariwal & Nichol 2021) are not included.
The layout and the state dict map one to one onto diffusers' ``UNet2DModel`` with
``resnet_time_scale_shift="scale_shift"`` (``cvformers.diffusion.convert``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cvformers.config import ConfigError
from cvformers.nn.unet_blocks import (
    Downsample,
    ResBlock,
    SpatialSelfAttention,
    Upsample,
    group_norm,
    norm_silu,
    timestep_embedding,
)


@dataclass
class UNetConfig:
    image_size: int = 32  # side of the (square) input; divisible by 2^(len(channel_mults)-1)
    in_channels: int = 3  # image channels, also the output channels
    base_channels: int = 64  # width of the input conv and of level 0; timestep embedding width
    channel_mults: tuple[int, ...] = (1, 2, 2)  # width of level i = base_channels · channel_mults[i]
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more per level on the way up)
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sides at which self-attention runs
    heads: int = 4  # attention heads; must divide the width of every level that has attention
    dropout: float = 0.1  # dropout inside the ResBlocks (DDPM: 0.1 on CIFAR-10)
    num_classes: int = 0  # 0: no label input; else a label embedding with an extra "no label" row
    cond_dim: int = 0  # width of a conditioning vector (e.g. a CLIP embedding) added to the time embedding; 0: none
    context_dim: int = 0  # width of context tokens the attention layers may read; 0: none
    cond_channels: int = 0  # channels of an image concatenated to the input (super-resolution); 0: none
    groups: int = 32  # GroupNorm groups (fewer where a width is not divisible)
    norm_eps: float = 1e-6  # GroupNorm epsilon (DDPM's TF code: 1e-6; diffusers' default: 1e-5)

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)  # a TOML / JSON list becomes a tuple
        self.attention_resolutions = tuple(self.attention_resolutions)
        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "heads", "groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"unet.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_classes", "cond_dim", "context_dim", "cond_channels"):
            if getattr(self, name) < 0:
                raise ConfigError(f"unet.{name} must be >= 0, got {getattr(self, name)}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ConfigError(f"unet.channel_mults must be a non-empty list of integers >= 1, got {self.channel_mults}")
        if not self.norm_eps > 0.0:
            raise ConfigError(f"unet.norm_eps must be > 0, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"unet.dropout must be in [0, 1), got {self.dropout}")
        if self.image_size % self.min_side_divisor:
            raise ConfigError(f"unet.image_size {self.image_size} is not divisible by 2^(len(channel_mults)-1) "
                              f"= {self.min_side_divisor}")
        sides = self.sides
        for res in self.attention_resolutions:
            if res not in sides:
                raise ConfigError(f"unet.attention_resolutions: no level is {res}x{res} "
                                  f"(the levels' sides are {list(sides)})")
        width = {side: self.base_channels * mult for side, mult in zip(sides, self.channel_mults)}
        for side in (*self.attention_resolutions, sides[-1]):  # the middle always has attention
            if width[side] % self.heads:
                raise ConfigError(f"unet.heads ({self.heads}) must divide the width {width[side]} of the "
                                  f"{side}x{side} level, which has attention")

    @property
    def min_side_divisor(self) -> int:
        """The input's sides must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def sides(self) -> tuple[int, ...]:
        """Feature-map side of each level, top first."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mults)))

    @property
    def emb_dim(self) -> int:
        """Width of the timestep (plus conditioning) embedding: 4·base_channels, as DDPM."""
        return 4 * self.base_channels


class ResAttnBlock(nn.Module):
    """A ResBlock, followed by self-attention at the levels listed in ``attention_resolutions``."""

    def __init__(self, res: ResBlock, attn: SpatialSelfAttention | None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h = self.res(h, emb)
        return h if self.attn is None else self.attn(h, context)


class Level(nn.Module):
    """One resolution of the down or up path: its blocks, then a resampler (None at the end)."""

    def __init__(self, blocks: list[ResAttnBlock], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class Middle(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution (DDPM's ``mid``)."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.res1 = ResBlock(ch, ch, cfg.emb_dim, cfg.dropout, cfg.groups, cfg.norm_eps)
        self.attn = SpatialSelfAttention(ch, cfg.heads, cfg.context_dim, cfg.groups, cfg.norm_eps)
        self.res2 = ResBlock(ch, ch, cfg.emb_dim, cfg.dropout, cfg.groups, cfg.norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return self.res2(self.attn(self.res1(h, emb), context), emb)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        base, emb_dim = cfg.base_channels, cfg.emb_dim

        # --- embeddings of t and of the conditioning, summed into one vector per sample -------
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None
        self.cond_proj = nn.Linear(cfg.cond_dim, emb_dim) if cfg.cond_dim > 0 else None

        def block(in_ch: int, out_ch: int, side: int) -> ResAttnBlock:
            attn = (SpatialSelfAttention(out_ch, cfg.heads, cfg.context_dim, cfg.groups, cfg.norm_eps)
                    if side in cfg.attention_resolutions else None)
            return ResAttnBlock(ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, cfg.groups, cfg.norm_eps), attn)

        # --- down path: remember the width of every tensor that will be kept as a skip --------
        self.input_conv = nn.Conv2d(cfg.in_channels + cfg.cond_channels, base, 3, padding=1)
        skip_widths = [base]
        ch, last = base, len(cfg.channel_mults) - 1
        self.down = nn.ModuleList()
        for i, (mult, side) in enumerate(zip(cfg.channel_mults, cfg.sides)):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(block(ch, base * mult, side))
                ch = base * mult
                skip_widths.append(ch)
            downsample = Downsample(ch) if i < last else None
            if downsample is not None:
                skip_widths.append(ch)
            self.down.append(Level(blocks, downsample))

        self.middle = Middle(ch, cfg)

        # --- up path, deepest level first: one more block per level, each eating one skip -----
        self.up = nn.ModuleList()
        for i, (mult, side) in reversed(list(enumerate(zip(cfg.channel_mults, cfg.sides)))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(block(ch + skip_widths.pop(), base * mult, side))
                ch = base * mult
            self.up.append(Level(blocks, Upsample(ch) if i > 0 else None))
        assert not skip_widths  # every skip is read once

        # --- output: zero-initialised conv, so the untrained network predicts 0 ---------------
        out_conv = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(out_conv.weight)
        nn.init.zeros_(out_conv.bias)
        self.out = nn.Sequential(group_norm(ch, cfg.groups, cfg.norm_eps), nn.SiLU(), out_conv)

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None = None,
              cond: torch.Tensor | None = None) -> torch.Tensor:
        """[B, emb_dim]: MLP(timestep embedding) + label embedding + projected cond, as configured."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels))
        if labels is not None and self.label_embed is None:
            raise ValueError("labels were given to a U-Net built with num_classes = 0")
        if self.label_embed is not None:
            if labels is None:  # the extra row: "no label" (classifier-free guidance)
                labels = torch.full((t.shape[0],), self.cfg.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label_embed(labels)
        if cond is not None and self.cond_proj is None:
            raise ValueError("cond was given to a U-Net built with cond_dim = 0")
        if self.cond_proj is not None:
            if cond is None:  # the zero vector: unCLIP's dropped CLIP embedding
                cond = emb.new_zeros(t.shape[0], self.cfg.cond_dim)
            emb = emb + self.cond_proj(cond)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, labels: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, context: torch.Tensor | None = None,
                cond_image: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in_channels, H, W], t [B] (or a scalar for the whole batch), labels [B] long,
        cond [B, cond_dim], context [B, L, context_dim], cond_image [B, cond_channels, H, W]
        -> [B, in_channels, H, W]."""
        height, width = x.shape[-2:]
        k = self.cfg.min_side_divisor
        if height % k or width % k:
            raise ValueError(f"this U-Net halves the image {len(self.cfg.channel_mults) - 1} times: "
                             f"its sides must be multiples of {k}, got {height}x{width}")
        if context is not None and self.cfg.context_dim == 0:
            raise ValueError("context was given to a U-Net built with context_dim = 0")
        if (cond_image is None) != (self.cfg.cond_channels == 0):
            raise ValueError(f"this U-Net takes a {self.cfg.cond_channels}-channel conditioning image; "
                             f"got {'none' if cond_image is None else tuple(cond_image.shape)}")
        t = t.to(x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, labels, cond)

        h = self.input_conv(x if cond_image is None else torch.cat([x, cond_image], dim=1))
        skips = [h]
        for level in self.down:
            for block in level.blocks:
                h = block(h, emb, context)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.middle(h, emb, context)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
            if level.resample is not None:
                h = level.resample(h)
        norm, _, out_conv = self.out
        return out_conv(norm_silu(norm, h))
