"""MLP-Mixer (Tolstikhin et al. 2021, "MLP-Mixer: An all-MLP Architecture for Vision").

Patches are linearly embedded by a per-patch "stem" (§2); then N Mixer layers alternate a
token-mixing MLP (across the S patches, one per channel, shared) and a channel-mixing MLP
(across the C channels, one per patch), each pre-norm with a skip connection (eq. 1). There is
no position embedding: the token-mixing MLP is sensitive to token order by itself (§2).
The head is global average pooling over patches, LayerNorm'd, then a Linear.

Keys follow timm's ``MlpMixer``: ``stem.proj``, ``blocks.N.{norm1,mlp_tokens,norm2,mlp_channels}``,
``norm``, ``head`` — timm checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cvformers.nn.heads import ClassifierMixin
from cvformers.nn.vision_layers import MixerBlock, PatchEmbed, drop_path_rates, init_vit_weights, layer_norm


@dataclass
class MixerConfig:
    image_size: int = 224  # input side; the token-mixing MLPs are sized for (image_size/P)^2 patches
    patch_size: int = 16  # P: side of a square patch
    in_chans: int = 3  # image channels
    num_classes: int = 1000  # outputs of the head; 0 = no head (features)
    embed_dim: int = 512  # C: hidden width (paper table 1, Mixer-S)
    depth: int = 8  # number of Mixer layers
    tokens_mlp_dim: int = 256  # D_S: hidden width of the token-mixing MLP
    channels_mlp_dim: int = 2048  # D_C: hidden width of the channel-mixing MLP
    dropout: float = 0.0  # dropout inside the MLPs
    drop_path: float = 0.0  # stochastic depth rate at the last block (linear in depth)


class MlpMixer(ClassifierMixin, nn.Module):
    def __init__(self, cfg: MixerConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid_size = cfg.image_size // cfg.patch_size
        self.num_tokens = self.grid_size**2
        self.stem = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        rates = drop_path_rates(cfg.drop_path, cfg.depth)
        self.blocks = nn.Sequential(*(
            MixerBlock(self.num_tokens, cfg.embed_dim, cfg.tokens_mlp_dim, cfg.channels_mlp_dim, cfg.dropout, rate)
            for rate in rates
        ))
        self.norm = layer_norm(cfg.embed_dim)
        self.num_features = cfg.embed_dim
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(init_vit_weights)

    def check_size(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        if (h, w) != (self.cfg.image_size, self.cfg.image_size):
            # Token-mixing MLPs have one weight per patch position: no other grid fits (§2).
            raise ValueError(
                f"this Mixer takes {self.cfg.image_size}x{self.cfg.image_size} images only "
                f"(its token-mixing MLPs are sized for {self.num_tokens} patches), got {h}x{w}; resize first"
            )

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        self.check_size(images)
        return self.norm(self.blocks(self.stem(images)))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens.mean(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def token_mixing_weights(self, block: int) -> torch.Tensor:
        """First-layer weights of block ``block``'s token-mixing MLP, as images over the patch
        grid: [tokens_mlp_dim, grid, grid] — what each hidden unit looks at (the paper's
        "Visualization" section and its figure of token-mixing units)."""
        w = self.blocks[block].mlp_tokens.fc1.weight.detach()
        return w.reshape(-1, self.grid_size, self.grid_size)
