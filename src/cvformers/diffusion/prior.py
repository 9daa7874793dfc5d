"""unCLIP's diffusion prior: a caption's CLIP text embedding -> a CLIP image embedding (Ramesh et al.
2022, arXiv 2204.06125, §2.2).

The prior is a Gaussian diffusion model over the image embedding z_i. Its denoiser is a
decoder-only transformer with a causal mask over one sequence, in the paper's order:

    [caption tokens (text_len)] [CLIP text embedding] [timestep] [noised image embedding z_t] [query]

and the output at the final query token predicts the unnoised z_i directly, trained with
mean-squared error ("we find it better to train our model to predict the unnoised z_i directly,
and use a mean-squared error loss on this prediction"). Classifier-free guidance: the text
conditioning (caption tokens and text embedding) is replaced by learned "null" vectors 10% of
the time. Sampling draws two embeddings per caption and keeps the one with the higher dot product
with the text embedding (§2.2, "we generate two samples of z_i and choose the one with a higher
dot product with z_t").

Departures, each for a small CPU model:
- the caption tokens are the CLIP BPE ids read through the prior's own token embedding (the
  causal transformer encodes them), not the outputs of a separate text encoder;
- embeddings are L2-normalised and scaled by sqrt(clip_dim) (``clip_space``), so that each
  coordinate has about unit variance as the diffusion's N(0, I) end point assumes (DALLE2-pytorch
  does the same); CLIP similarity only depends on the direction, which this keeps;
- the cosine schedule (improved DDPM) with T = 1000 and DDIM sampling over 64 steps, which is how
  the paper samples its prior ("64 strided sampling steps").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cvformers.config import ConfigError
from cvformers.diffusion import samplers
from cvformers.diffusion.samplers import DiffusionSamplingConfig, guided
from cvformers.diffusion.schedules import Schedule, eps_from_x0, q_sample
from cvformers.models.clip_visual import ClipTransformer
from cvformers.nn.unet_blocks import timestep_embedding
from cvformers.registry import register_kind


def clip_space(embedding: torch.Tensor) -> torch.Tensor:
    """A CLIP embedding as the prior and the decoder see it: unit length times sqrt(width)."""
    return F.normalize(embedding.float(), dim=-1) * math.sqrt(embedding.shape[-1])


@dataclass
class PriorConfig:
    """The ``[model]`` table of an unCLIP prior run."""

    clip_dim: int = 64  # width of the CLIP embeddings (fixed by the CLIP run)
    vocab_size: int = 470  # caption token ids (the CLIP run's BPE, pad ids included)
    text_len: int = 32  # caption length in tokens (the CLIP run's context length)
    width: int = 128  # transformer width
    layers: int = 4  # transformer blocks
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / width
    num_steps: int = 1000  # T of the forward process
    schedule: Literal["linear", "cosine"] = "cosine"  # β schedule
    cond_drop_prob: float = 0.1  # share of training captions replaced by the null condition (paper: 10%)

    def __post_init__(self) -> None:
        for name in ("clip_dim", "vocab_size", "text_len", "width", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ConfigError(f"model.heads ({self.heads}) must divide model.width ({self.width})")
        if self.num_steps < 2:
            raise ConfigError(f"model.num_steps must be >= 2, got {self.num_steps}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ConfigError(f"model.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")


@register_kind("unclip_prior", PriorConfig)
class DiffusionPrior(nn.Module):
    """``loss(batch)`` for the trainer (batch: ``text`` ids, ``clip_text``, ``clip_image``);
    ``sample(text, text_embedding)`` for generation."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.text_len + 4, w) * 0.01)
        self.text_embed_proj = nn.Linear(cfg.clip_dim, w)
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.image_embed_proj = nn.Linear(cfg.clip_dim, w)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        # the dropped condition of classifier-free guidance: learned stand-ins for the text inputs
        self.null_tokens = nn.Parameter(torch.randn(cfg.text_len, w) * 0.02)
        self.null_text_embed = nn.Parameter(torch.randn(w) * 0.02)
        self.transformer = ClipTransformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, False)
        self.ln_final = nn.LayerNorm(w)
        self.out = nn.Linear(w, cfg.clip_dim)
        self.schedule = Schedule.make(cfg.schedule, cfg.num_steps)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_embedding: torch.Tensor,
                keep_text: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted unnoised image embedding [B, clip_dim] (in ``clip_space``).

        z_t [B, clip_dim] noised, t [B], text [B, text_len] ids, text_embedding [B, clip_dim] raw CLIP
        output; ``keep_text`` [B] bool: False rows see the null condition instead of the text."""
        b = z_t.shape[0]
        if text.shape[1] != self.cfg.text_len:
            raise ValueError(f"text has {text.shape[1]} tokens, the prior expects {self.cfg.text_len}")
        tokens = self.token_embedding(text)
        text_token = self.text_embed_proj(clip_space(text_embedding))
        if keep_text is not None:
            keep = keep_text.view(b, 1, 1).to(tokens.dtype)
            tokens = keep * tokens + (1 - keep) * self.null_tokens
            text_token = keep[:, 0] * text_token + (1 - keep[:, 0]) * self.null_text_embed
        time_token = self.time_embed(timestep_embedding(t, self.cfg.width))
        sequence = torch.cat([tokens, text_token[:, None], time_token[:, None],
                              self.image_embed_proj(z_t)[:, None], self.query.expand(b, 1, -1)], dim=1)
        h = self.transformer(sequence + self.positional_embedding, causal=True)
        return self.out(self.ln_final(h[:, -1]))

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        z0 = clip_space(batch["clip_image"])
        b = z0.shape[0]
        t = torch.randint(0, self.cfg.num_steps, (b,), device=z0.device)
        z_t = q_sample(self.schedule, z0, t, torch.randn_like(z0))
        keep = torch.rand(b, device=z0.device) >= self.cfg.cond_drop_prob
        pred = self(z_t, t, batch["text"].to(z0.device), batch["clip_text"].to(z0.device), keep)
        loss = F.mse_loss(pred, z0)
        cosine = F.cosine_similarity(pred, z0, dim=-1).mean()
        return loss, {"mse": loss.item(), "cosine": cosine.item()}

    def denoise_fn(self, text: torch.Tensor, text_embedding: torch.Tensor, guidance: float) -> Callable:
        """``denoise(z_t, t) -> (ẑ_0, ε̂)``; guidance mixes the text and null rows of one batch."""
        keep_all = torch.ones(len(text), dtype=torch.bool, device=text.device)

        def denoise(z_t: torch.Tensor, t: torch.Tensor):
            if guidance == 1.0:
                z0 = self(z_t, t, text, text_embedding)
            else:
                out = self(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([text, text]),
                           torch.cat([text_embedding, text_embedding]), torch.cat([keep_all, ~keep_all]))
                z0 = guided(out[: len(z_t)], out[len(z_t):], guidance)  # linear in ẑ_0, so the same as in ε
            return z0, eps_from_x0(self.schedule, z_t, t, z0)

        return denoise

    @torch.no_grad()
    def sample(self, text: torch.Tensor, text_embedding: torch.Tensor, sampling: DiffusionSamplingConfig,
               candidates: int = 2, generator: torch.Generator | None = None,
               progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
        """One image embedding [B, clip_dim] per caption: ``candidates`` are drawn and the one with the
        highest dot product with the caption's text embedding is kept (§2.2; 1: the first draw)."""
        if candidates < 1:
            raise ConfigError(f"prior candidates must be >= 1, got {candidates}")
        device = next(self.parameters()).device
        b = len(text)
        text, text_embedding = text.to(device), text_embedding.to(device)
        rows = lambda x: x.repeat_interleave(candidates, dim=0)  # noqa: E731
        if generator is None:
            generator = torch.Generator(device)
            generator.manual_seed(sampling.seed) if sampling.seed is not None else generator.seed()
        z = torch.randn((b * candidates, self.cfg.clip_dim), generator=generator, device=device)
        denoise = self.denoise_fn(rows(text), rows(text_embedding), sampling.guidance)
        z = samplers.ddim_sample(denoise, self.schedule, z, steps=sampling.steps, eta=sampling.eta, clip=False,
                                 generator=generator, progress=progress)
        z = z.view(b, candidates, -1)
        score = (F.normalize(z, dim=-1) * F.normalize(text_embedding.float(), dim=-1)[:, None]).sum(-1)
        return z[torch.arange(b, device=device), score.argmax(dim=1)]


__all__ = ["DiffusionPrior", "PriorConfig", "clip_space"]
