"""CLIP's building blocks and image towers, in OpenAI / open_clip state-dict layout.

Everything here keeps the parameter names of OpenAI's released CLIP (and open_clip, which
kept them), so that their checkpoints load with ``load_state_dict`` and no renaming:

    visual.conv1.weight                       patch embedding (a strided conv, no bias)
    visual.class_embedding                    [width]
    visual.positional_embedding               [1 + grid*grid, width]
    visual.ln_pre / visual.ln_post            LayerNorm before / after the transformer
    visual.transformer.resblocks.N.ln_1       pre-attention LayerNorm
    visual.transformer.resblocks.N.attn.in_proj_weight / in_proj_bias / out_proj.*
    visual.transformer.resblocks.N.ln_2       pre-MLP LayerNorm
    visual.transformer.resblocks.N.mlp.c_fc / mlp.c_proj
    visual.proj                               [width, embed_dim], no bias

The text tower (clip.py) reuses ``ClipTransformer`` with a causal mask.

Besides the ViT, ``TrunkTower`` puts any backbone of the cvformers registry
(``cvformers.models.vision.create_model(name, num_classes=0)``) under a linear projection,
with keys ``visual.trunk.*`` / ``visual.head.proj.weight`` — the layout open_clip uses for
its timm towers.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI trained CLIP with.

    Their released weights expect it; open_clip's non-"quickgelu" configs use exact GELU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names.

    One packed ``in_proj_weight`` [3*width, width] makes q, k and v; written out here (instead
    of calling ``nn.MultiheadAttention``) so that batch-first tensors and PyTorch's fused
    ``scaled_dot_product_attention`` are used, with the same keys and the same numbers.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # what nn.MultiheadAttention does

    def forward(self, x: torch.Tensor, causal: bool = False, queries: int | None = None) -> torch.Tensor:
        """x [B, N, width] -> [B, N, width]; ``queries = m``: only the first m tokens ask (output
        [B, m, width], the same numbers as the full output's first m), every token is read."""
        if queries is None:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:  # the fused projection's rows split (q | k, v): q of the asking tokens only
            if causal:
                raise ValueError("queries is for the unmasked (image) attention")
            w, b, width = self.in_proj_weight, self.in_proj_bias, x.shape[-1]
            q = F.linear(x[:, :queries], w[:width], b[:width])
            k, v = F.linear(x, w[width:], b[width:]).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ / √d) of ``forward`` without a causal mask, written out (the fused path
        does not return it): [B, heads, N, N], each row sums to 1. For pictures, not training."""
        q, k, _ = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k))
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = ClipAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor, causal: bool = False, queries: int | None = None) -> torch.Tensor:
        """``queries = m`` updates only the first m tokens (output [B, m, width])."""
        attn_out = self.attn(self.ln_1(x), causal=causal, queries=queries)
        x = x + attn_out if queries is None else x[:, :queries] + attn_out
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    """A stack of ``ResidualAttentionBlock`` under the key ``resblocks``."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 quick_gelu: bool = False):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers))
        self.init_weights()

    def init_weights(self) -> None:
        # CLIP's initialisation (OpenAI's model.py, kept by open_clip): attention and MLP input
        # weights ~ N(0, width^-1/2) resp. N(0, (2 width)^-1/2); both output projections scaled
        # down by (2 layers)^-1/2 so that the residual stream's variance does not grow with depth.
        # OpenAI applies it to the text transformer only; we apply it to both towers.
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


class ClipVisionTransformer(nn.Module):
    """CLIP's ViT (CLIP §2.4): patches + class token -> ln_pre -> transformer -> ln_post -> proj.

    CLIP departs from the original ViT by a LayerNorm on the combined patch and position
    embeddings before the transformer (``ln_pre``), and by a bias-free patch convolution.
    Input: images already normalised with the model's mean/std, [B, C, H, W].
    """

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 embed_dim: int, in_channels: int = 3, mlp_ratio: float = 4.0,
                 quick_gelu: bool = False):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        grid = image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = ClipTransformer(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, width]: the class token and the patches, as the transformer's input."""
        x = rearrange(self.conv1(images), "b d h w -> b (h w) d")
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The class token's output is the image representation (ViT §3.1). Nothing reads the patch
        # tokens' last-block outputs, so the last block updates the class token alone (its
        # attention still reads every token): the same numbers, and for the 2-layer towers of the
        # shipped models about a third fewer matrix products in the tower.
        blocks = self.transformer.resblocks
        x = self.tokens(images)
        for block in blocks[:-1]:
            x = block(x)
        x = blocks[-1](x, queries=1)
        return self.ln_post(x[:, 0]) @ self.proj

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-block attention weights [B, heads, 1 + N, 1 + N]; token 0 is the class token, whose
        last-layer output is pooled into the embedding."""
        x, maps = self.tokens(images), []
        for block in self.transformer.resblocks:
            maps.append(block.attn.attention_weights(block.ln_1(x)))
            x = block(x)
        return maps


class TrunkTower(nn.Module):
    """Any registry backbone as CLIP's image tower: pooled features -> linear projection.

    CLIP §2.4 tries ResNets and ViTs as image encoders; this opens the choice to every
    backbone in ``cvformers.models.vision`` (ViT, Mixer, ConvMixer, Swin). Keys:
    ``trunk.*`` (the backbone's own timm-style keys) and ``head.proj.weight``.
    """

    def __init__(self, name: str, embed_dim: int, image_size: int, in_channels: int = 3):
        super().__init__()
        try:
            from cvformers.models.vision import create_model
        except ModuleNotFoundError as e:  # pragma: no cover - depends on the backbones helper
            raise ValueError(
                f"image_encoder {name!r} needs cvformers.models.vision (the backbone registry), "
                "which is not installed; use image_encoder = 'vit'") from e
        self.trunk = create_model(name, num_classes=0, image_size=image_size, in_chans=in_channels)
        features = getattr(self.trunk, "num_features", None)
        if features is None:  # infer from one dummy forward
            with torch.no_grad():
                features = self.trunk(torch.zeros(1, in_channels, image_size, image_size)).shape[-1]
        self.head = nn.Module()
        self.head.proj = nn.Linear(features, embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head.proj(self.trunk(images))
