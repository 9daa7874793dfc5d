"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

An image is cut into P×P patches, each patch is linearly embedded (§3.1, eq. 1), a learned
class token is prepended and learned 1-D position embeddings are added; a stack of pre-norm
transformer blocks (eq. 2-3) follows, and the class token's final state, layer-normed (eq. 4),
goes through a linear head.

State-dict keys and shapes are timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``,
``head``), LayerNorm eps 1e-6 and exact GELU, so timm checkpoints load with ``strict=True``.

Departure from the paper: the head is a single Linear (the paper's pre-training head has a
hidden tanh layer, §3.1 / appendix B.1.1; its fine-tuning head — and timm — is one Linear).

Small-data options, off by default and in every timm-compatible preset: ``patch_norm`` puts a
LayerNorm on each flattened patch before the linear projection and another on its embedding
(keys ``patch_embed.norm_in``, ``patch_embed.proj`` as a Linear, ``patch_embed.norm_out``), and
``init = "pytorch"`` keeps PyTorch's default layer init with unit-normal position and class
embeddings instead of the paper's / timm's truncated normal(0.02). Both are what lucidrains'
vit-pytorch does; on Fashion-MNIST with a 20-minute CPU budget they train faster than the paper's
setup (measured by ``benchmarks/classifiers_fmnist.py``, see docs/results.md), which is why the
``vit_nano_patch4_*`` presets use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cvformers.nn.heads import ClassifierMixin
from cvformers.nn.vision_layers import (ViTBlock, PatchEmbed, drop_path_rates, init_vit_weights, layer_norm,
                                        shift_diagonally)


@dataclass
class ViTConfig:
    image_size: int = 224  # input height = width the position embeddings are learned for
    patch_size: int = 16  # P: side of a square patch; tokens = (image_size / P)^2
    in_chans: int = 3  # image channels (1 for MNIST / Fashion-MNIST)
    num_classes: int = 1000  # outputs of the head; 0 = no head (features)
    embed_dim: int = 768  # D: token width
    depth: int = 12  # L: transformer blocks
    num_heads: int = 12  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden width / D (paper table 1: 3072 / 768)
    qkv_bias: bool = True  # bias in the fused qkv projection (as in the released models)
    pool: Literal["token", "avg"] = "token"  # class token (paper) or mean of patch tokens (§D.3)
    dropout: float = 0.0  # dropout after embeddings, in MLPs and after attention projection
    attn_dropout: float = 0.0  # dropout on attention weights
    drop_path: float = 0.0  # stochastic depth rate at the last block (linear in depth)
    # Small-data options (not the paper; off for the timm-compatible presets, see the module doc):
    patch_norm: bool = False  # LayerNorm each flattened patch before the projection and after it
    init: Literal["timm", "pytorch"] = "timm"  # trunc-normal(0.02) weights, or PyTorch's defaults
    shifted_patches: bool = False  # SPT (Lee et al. 2021 §3.1): patches of the image + 4 diagonal half-patch shifts
    locality_attention: bool = False  # LSA (Lee et al. 2021 §3.2): learned temperature, no attention to self


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Bicubic 2-D interpolation of the patch position embeddings to a new grid (ViT §3.2).

    "Fine-tuning and higher resolution": the learned embeddings of the patch grid are
    interpolated according to their 2-D location; the class token's embedding is kept.
    pos_embed [1, prefix + g·g, D] -> [1, prefix + new_h·new_w, D].
    """
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} patches is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1)
    return torch.cat([prefix, grid], dim=1)


class VisionTransformer(ClassifierMixin, nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid_size = cfg.image_size // cfg.patch_size
        num_patches = self.grid_size**2
        d = cfg.embed_dim
        if cfg.shifted_patches and not cfg.patch_norm:
            raise ValueError("shifted_patches needs patch_norm = true (SPT normalises each patch, §3.1)")
        in_chans = cfg.in_chans * (5 if cfg.shifted_patches else 1)
        self.patch_embed = PatchEmbed(cfg.patch_size, in_chans, d, norm=cfg.patch_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, d))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = drop_path_rates(cfg.drop_path, cfg.depth)
        self.blocks = nn.ModuleList(
            ViTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.dropout, cfg.attn_dropout, rate,
                  cfg.locality_attention)
            for rate in rates
        )
        self.norm = layer_norm(d)
        self.num_features = d
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

        if cfg.init == "timm":
            self.apply(init_vit_weights)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        elif cfg.init == "pytorch":  # layers keep PyTorch's defaults; unit-normal position / class embeddings
            nn.init.normal_(self.pos_embed)
            nn.init.normal_(self.cls_token)
        else:
            raise ValueError(f"init must be 'timm' or 'pytorch', got {cfg.init!r}")

    # --- embedding ----------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens [B, 1 + N, D]: class token, patches, plus position embeddings.

        An input whose size differs from ``image_size`` (but is a multiple of the patch size)
        gets interpolated position embeddings (§3.2).
        """
        h, w = images.shape[-2:]
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(
                f"a ViT with patch size {p} needs an image whose sides are multiples of {p}, got {h}x{w}"
            )
        if self.cfg.shifted_patches:
            images = shift_diagonally(images, p // 2)
        x = self.patch_embed(images)
        pos = self.pos_embed
        if (h // p, w // p) != (self.grid_size, self.grid_size):
            pos = resize_pos_embed(pos, (h // p, w // p))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        return self.pos_drop(x)

    # --- trunk and head -----------------------------------------------------------------
    def forward_features(self, images: torch.Tensor, return_attention: bool = False):
        """Final normed tokens [B, 1 + N, D]; with ``return_attention`` also the list of each
        block's attention weights [B, heads, 1 + N, 1 + N] (explicit softmax path)."""
        x = self.embed(images)
        maps = []
        for block in self.blocks:
            if return_attention:
                x, weights = block(x, return_weights=True)
                maps.append(weights)
            else:
                x = block(x)
        x = self.norm(x)
        return (x, maps) if return_attention else x

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens[:, 0] if self.cfg.pool == "token" else tokens[:, 1:].mean(dim=1)
        return self.head(pooled)

    def forward_class_token(self, images: torch.Tensor) -> torch.Tensor:
        """The final normed class token [B, D], the same numbers as ``forward_features(images)[:, 0]``.

        Nothing reads the patch tokens' last-block outputs when the class token is pooled, so the
        last block updates the class token alone: its attention still reads every token's key and
        value, but the query, the output projection, the MLP and the norms run on one token instead
        of 1 + N. For the 6-block ``vit_nano`` at 28 px that is about an eighth of the trunk's
        matrix products, in training (forward and backward) and inference alike.
        """
        x = self.embed(images)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.norm(self.blocks[-1](x, queries=1))[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "token":
            return self.head(self.forward_class_token(images))
        return self.forward_head(self.forward_features(images))

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-block attention weights [B, heads, 1 + N, 1 + N]; token 0 is the class token."""
        return self.forward_features(images, return_attention=True)[1]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like ``nn.Module.load_state_dict``, but a checkpoint trained at another resolution
        has its position embeddings interpolated to this model's grid first (§3.2)."""
        pe = state_dict.get("pos_embed")
        if pe is not None and pe.shape != self.pos_embed.shape:
            state_dict = dict(state_dict)
            state_dict["pos_embed"] = resize_pos_embed(pe, (self.grid_size, self.grid_size))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
