"""A diffusion model conditioned on a caption through a small transformer text encoder (GLIDE §2.3).

GLIDE (Nichol et al. 2021, arXiv 2112.10741, §2.3): "we first encode [the caption] into a sequence
of K tokens, and feed these tokens into a Transformer model. The output of this transformer is
used in two ways: first, the final token embedding is used in place of a class embedding in the
ADM model; second, the last layer of token embeddings ... is separately projected to the
dimensionality of each attention layer throughout the ADM model, and then concatenated to the
attention context at each layer." Here both: the encoder's tokens are the U-Net's ``context``
(``SpatialSelfAttention`` projects them to extra keys and values), and its last position is the
U-Net's ``cond`` vector, projected and added to the timestep embedding.

``CaptionDDPM`` owns the encoder (caption BPE ids -> tokens) and is the base of unCLIP's decoder
(``cvformers.diffusion.decoder``), which adds CLIP-embedding inputs to it (and uses the CLIP
embedding, not the pooled caption, as its cond vector); kind "ddpm_caption" is
the plain text-to-image model that ``cvformers train ddpm`` trains with ``[ddpm] conditional = "caption"``.

Classifier-free guidance (Ho & Salimans 2022, Algorithm 1): in training a caption is dropped with
probability ``caption_drop_prob``; a dropped caption is all-zero tokens and a zero pooled vector
(GLIDE drops to the empty caption, 20% of the time; zeroing is what unCLIP's decoder does, and
one rule serves both). The encoder attends in both directions over all ``text_len`` positions, so
its last position has read the whole caption; padding keeps its per-position ids (cvformers.text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from cvformers.config import ConfigError
from cvformers.diffusion.model import DDPM, DDPMConfig
from cvformers.diffusion.samplers import DiffusionSamplingConfig
from cvformers.models.clip_visual import ClipTransformer
from cvformers.registry import register_kind


@dataclass
class CaptionDDPMConfig(DDPMConfig):
    """The ``[model]`` table of a caption-conditioned diffusion run."""

    vocab_size: int = 470  # caption token ids incl. one pad id per position (the tokenizer's num_text_tokens); 0: none
    text_len: int = 32  # caption length in tokens
    text_width: int = 64  # width of the caption encoder = the U-Net's context width
    text_layers: int = 1  # transformer blocks of the caption encoder
    text_heads: int = 2  # attention heads of the caption encoder
    caption_drop_prob: float = 0.2  # share of training captions dropped for guidance (GLIDE: 20%)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("text_len", "text_width", "text_layers", "text_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size must be >= 0, got {self.vocab_size}")
        if self.text_width % self.text_heads:
            raise ConfigError(f"model.text_heads ({self.text_heads}) must divide model.text_width ({self.text_width})")
        if not 0.0 <= self.caption_drop_prob < 1.0:
            raise ConfigError(f"model.caption_drop_prob must be in [0, 1), got {self.caption_drop_prob}")
        if self.unet.num_classes:
            raise ConfigError("this model is conditioned on captions, not labels: remove model.unet.num_classes")
        # the caption's tokens are the attention context, its pooled token the cond vector
        self.unet.context_dim = self.unet.cond_dim = self.text_width


@register_kind("ddpm_caption", CaptionDDPMConfig)
class CaptionDDPM(DDPM):
    """``loss(batch)`` (batch: ``image``, ``text`` ids); ``sample(text)``; ``encode_captions`` for subclasses."""

    cfg: CaptionDDPMConfig

    def __init__(self, cfg: CaptionDDPMConfig):
        super().__init__(cfg)
        w = cfg.text_width
        if cfg.vocab_size:
            self.token_embedding = nn.Embedding(cfg.vocab_size, w)
            self.positional_embedding = nn.Parameter(torch.randn(cfg.text_len, w) * 0.01)
            self.text_encoder = ClipTransformer(w, cfg.text_layers, cfg.text_heads)
            self.text_ln = nn.LayerNorm(w)

    def encode_captions(self, text: torch.Tensor | None, batch: int,
                        keep: torch.Tensor | None = None) -> torch.Tensor:
        """Caption ids [B, text_len] -> tokens [B, text_len, text_width]; all zero for ``text`` None
        and in the rows whose ``keep`` is False (a dropped caption)."""
        cfg = self.cfg
        if text is None:
            return self.positional_embedding.new_zeros(batch, cfg.text_len, cfg.text_width)
        if not cfg.vocab_size:
            raise ValueError("this model was built without a caption encoder (model.vocab_size = 0)")
        if text.ndim != 2 or text.shape[1] != cfg.text_len:
            raise ValueError(f"text must be [B, {cfg.text_len}] caption ids, got {tuple(text.shape)}")
        if bool(((text < 0) | (text >= cfg.vocab_size)).any()):
            raise ValueError(f"caption ids must be in [0, {cfg.vocab_size})")
        tokens = self.text_ln(self.text_encoder(self.token_embedding(text) + self.positional_embedding))
        if keep is not None:
            tokens = tokens * keep.view(-1, 1, 1).to(tokens.dtype)
        return tokens

    def caption_conditions(self, text: torch.Tensor | None, batch: int,
                   keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The U-Net's ``context`` (the caption's tokens) and ``cond`` (its last token, GLIDE's
        "final token embedding")."""
        tokens = self.encode_captions(text, batch, keep)
        return {"context": tokens, "cond": tokens[:, -1]}

    def training_inputs(self, batch: dict, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        keep = torch.rand(len(x0), device=x0.device) >= self.cfg.caption_drop_prob
        return self.caption_conditions(batch["text"].to(x0.device), len(x0), keep)

    @torch.inference_mode()
    def sample(self, text: torch.Tensor | None, n: int | None = None, sampling: DiffusionSamplingConfig | None = None,
               generator: torch.Generator | None = None,
               progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
        """One image [n, C, H, W] in [0, 1] per caption row of ``text`` [n, text_len]; ``text`` None:
        ``n`` unconditional images (the dropped caption)."""
        s = sampling or DiffusionSamplingConfig()
        device = next(self.parameters()).device
        if text is None and n is None:
            raise ValueError("give captions or a number of images")
        n = len(text) if text is not None else n
        cond = self.caption_conditions(None if text is None else text.to(device), n)
        null = self.caption_conditions(None, n)
        return self.to_images(self.run_sampler(n, s, cond, null, generator, progress))


__all__ = ["CaptionDDPM", "CaptionDDPMConfig"]
