"""The two hybrids of the lecture: what happens when the mixing operators are swapped.

1. ``MixerAttention``: an MLP-Mixer whose later blocks are self-attention blocks. The first
   ``mixer_depth`` blocks mix tokens with the fixed, position-specific token-mixing MLP
   (Tolstikhin et al. §2); the rest mix them with content-dependent self-attention (ViT eq. 2).
   The attention blocks come *after* the MLP blocks on purpose: the token-mixing MLP is not
   permutation invariant, so it has already written each token's position into its features and
   the attention blocks need no position embedding (the Mixer has none).
2. ``ConvMixerMixer``: a ConvMixer (Trockman & Kolter §2) whose first ``conv_depth`` layers mix
   space with depthwise convolutions — local, translation-equivariant — and whose later layers
   are Mixer blocks that mix all patches globally. The feature map is flattened into tokens at
   the split.

Each model keeps the keys of the blocks it borrows (``blocks.N.mlp_tokens`` for a Mixer block,
``blocks.N.attn.qkv`` for an attention block, ``blocks.N.depthwise`` for a ConvMixer layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from cvformers.models.convmixer import ConvMixerLayer, ConvStem
from cvformers.nn.heads import ClassifierMixin
from cvformers.nn.vision_layers import ViTBlock, MixerBlock, PatchEmbed, drop_path_rates, init_vit_weights, layer_norm


@dataclass
class MixerAttentionConfig:
    image_size: int = 224  # input side (the token-mixing MLPs fix the number of patches)
    patch_size: int = 16  # side of a square patch
    in_chans: int = 3  # image channels
    num_classes: int = 1000  # outputs of the head; 0 = no head (features)
    embed_dim: int = 512  # token width
    depth: int = 8  # total blocks
    mixer_depth: int = 4  # the split: blocks [0, mixer_depth) are Mixer blocks, the rest attention
    num_heads: int = 8  # heads of the attention blocks
    tokens_mlp_dim: int = 256  # D_S of the Mixer blocks
    channels_mlp_dim: int = 2048  # D_C of the Mixer blocks; also the attention blocks' MLP width
    dropout: float = 0.0  # dropout inside MLPs / after attention
    drop_path: float = 0.0  # stochastic depth rate at the last block


class MixerAttention(ClassifierMixin, nn.Module):
    def __init__(self, cfg: MixerAttentionConfig):
        super().__init__()
        if not 0 <= cfg.mixer_depth <= cfg.depth:
            raise ValueError(f"mixer_depth {cfg.mixer_depth} must be in [0, depth={cfg.depth}]")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid_size = cfg.image_size // cfg.patch_size
        num_tokens = self.grid_size**2
        d = cfg.embed_dim
        self.stem = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        rates = drop_path_rates(cfg.drop_path, cfg.depth)
        self.blocks = nn.Sequential(*(
            MixerBlock(num_tokens, d, cfg.tokens_mlp_dim, cfg.channels_mlp_dim, cfg.dropout, rates[i])
            if i < cfg.mixer_depth else
            ViTBlock(d, cfg.num_heads, cfg.channels_mlp_dim / d, True, cfg.dropout, 0.0, rates[i])
            for i in range(cfg.depth)
        ))
        self.norm = layer_norm(d)
        self.num_features = d
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(init_vit_weights)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if (h, w) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"this model takes {self.cfg.image_size}x{self.cfg.image_size} images, got {h}x{w}; resize first")
        return self.norm(self.blocks(self.stem(images)))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens.mean(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


@dataclass
class ConvMixerMixerConfig:
    image_size: int = 224  # input side (the Mixer blocks fix the number of patches)
    patch_size: int = 7  # kernel and stride of the patch-embedding convolution
    in_chans: int = 3  # image channels
    num_classes: int = 1000  # outputs of the head; 0 = no head (features)
    dim: int = 768  # channels / token width throughout
    depth: int = 16  # total layers
    conv_depth: int = 8  # the split: layers [0, conv_depth) are ConvMixer layers, the rest Mixer blocks
    kernel_size: int = 9  # depthwise kernel of the ConvMixer layers
    tokens_mlp_dim: int = 256  # D_S of the Mixer blocks
    channels_mlp_dim: int = 3072  # D_C of the Mixer blocks
    activation: Literal["gelu", "relu"] = "gelu"  # activation of the ConvMixer layers
    channels_last: bool = True  # NHWC memory format for the convolutional part (CPU speed)


class ConvMixerMixer(ClassifierMixin, nn.Module):
    def __init__(self, cfg: ConvMixerMixerConfig):
        super().__init__()
        if not 0 <= cfg.conv_depth <= cfg.depth:
            raise ValueError(f"conv_depth {cfg.conv_depth} must be in [0, depth={cfg.depth}]")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid_size = cfg.image_size // cfg.patch_size
        self.stem = ConvStem(cfg.in_chans, cfg.dim, cfg.patch_size, cfg.activation)
        self.blocks = nn.Sequential(*(
            ConvMixerLayer(cfg.dim, cfg.kernel_size, cfg.activation) if i < cfg.conv_depth else
            MixerBlock(self.grid_size**2, cfg.dim, cfg.tokens_mlp_dim, cfg.channels_mlp_dim)
            for i in range(cfg.depth)
        ))
        self.norm = layer_norm(cfg.dim)
        self.num_features = cfg.dim
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        for block in self.blocks[cfg.conv_depth:]:
            block.apply(init_vit_weights)
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if (h, w) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"this model takes {self.cfg.image_size}x{self.cfg.image_size} images, got {h}x{w}; resize first")
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.stem(images)
        for block in self.blocks[: self.cfg.conv_depth]:
            x = block(x)
        x = rearrange(x, "b c h w -> b (h w) c")  # the split: feature map -> tokens
        for block in self.blocks[self.cfg.conv_depth :]:
            x = block(x)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens.mean(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))
