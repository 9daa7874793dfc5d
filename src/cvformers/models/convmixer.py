"""ConvMixer (Trockman & Kolter 2022, "Patches Are All You Need?").

§2 of the paper, with σ the activation and BN batch norm:
    z₀      = BN(σ(Conv_{c→h}(X, kernel = stride = p)))        patch embedding
    z'_l    = BN(σ(DepthwiseConv(z_{l-1}))) + z_{l-1}           spatial mixing, residual
    z_{l+1} = BN(σ(PointwiseConv(z'_l)))                        channel mixing, no residual
then global average pooling and a Linear classifier. Unlike ViT and Mixer the patch grid
stays a 2-D feature map, so any input size works.

On the CPU the model runs in ``channels_last`` memory format (NHWC), where oneDNN's depthwise
and 1×1 convolutions are faster than in the default NCHW layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cvformers.nn.heads import ClassifierMixin


@dataclass
class ConvMixerConfig:
    image_size: int = 224  # nominal input side (any size works; used by presets and the task)
    patch_size: int = 7  # p: kernel and stride of the patch-embedding convolution
    in_chans: int = 3  # image channels
    num_classes: int = 1000  # outputs of the head; 0 = no head (features)
    dim: int = 1536  # h: channels of every layer
    depth: int = 20  # number of ConvMixer layers
    kernel_size: int = 9  # side of the depthwise (spatial mixing) kernel
    activation: Literal["gelu", "relu"] = "gelu"  # σ; the paper's 768/32 model uses ReLU
    channels_last: bool = True  # NHWC memory format (faster convolutions on CPU)


def _act(name: str) -> nn.Module:
    return nn.GELU() if name == "gelu" else nn.ReLU()


class ConvMixerLayer(nn.Module):
    """One layer: residual depthwise conv (spatial mixing), then pointwise conv (channel mixing)."""

    def __init__(self, dim: int, kernel_size: int, activation: str):
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same")
        self.act1 = _act(activation)
        self.norm1 = nn.BatchNorm2d(dim)
        self.pointwise = nn.Conv2d(dim, dim, kernel_size=1)
        self.act2 = _act(activation)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.act1(self.depthwise(x)))
        return self.norm2(self.act2(self.pointwise(x)))


class ConvStem(nn.Module):
    """z₀ = BN(σ(Conv(X, kernel = stride = p))): the patch embedding kept as a feature map."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, activation: str):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.act = _act(activation)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.proj(images)))


class ConvMixer(ClassifierMixin, nn.Module):
    def __init__(self, cfg: ConvMixerConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = ConvStem(cfg.in_chans, cfg.dim, cfg.patch_size, cfg.activation)
        self.blocks = nn.Sequential(*(ConvMixerLayer(cfg.dim, cfg.kernel_size, cfg.activation) for _ in range(cfg.depth)))
        self.num_features = cfg.dim
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Feature map [B, dim, H/p, W/p] after the last layer."""
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.blocks(self.stem(images))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))
