"""Sampling a diffusion model: DDPM's ancestral chain and DDIM's shortcut, with classifier-free guidance.

Both samplers take a ``denoise(x_t, t) -> (x̂_0, ε̂)`` function (the model's prediction, guidance
already mixed in) and a schedule, so the math here is the papers' and nothing else:

- **DDPM** (Ho et al. 2020, Algorithm 2): x_{t-1} = μ̃_t(x_t, x̂_0) + σ_t z for t = T … 1, with
  σ_t² = β_t or β̃_t (§3.2: both gave similar results; β_t is optimal for x_0 ~ N(0, I)).
- **DDIM** (Song et al. 2021, eq. 12): on any decreasing subset of timesteps,
  x_{t'} = sqrt(ᾱ_{t'}) x̂_0 + sqrt(1 - ᾱ_{t'} - σ²) ε̂ + σ z, σ = η sqrt((1-ᾱ_{t'})/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_{t'}).
  η = 0 is deterministic; η = 1 on every step is DDPM with σ² = β̃ (a test holds them equal).

x̂_0 is clipped to [-1, 1] when ``clip`` is set and ε̂ recomputed from the clipped x̂_0, as the
reference implementations and diffusers do, so both samplers stay consistent with each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch

from cvformers.config import ConfigError
from cvformers.diffusion.schedules import Schedule, at, eps_from_x0, posterior_mean

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DiffusionSamplingConfig:
    """How a diffusion model is sampled; built and checked once (CLI, TOML, Python)."""

    sampler: Literal["ddpm", "ddim"] = "ddim"  # ddpm: all T ancestral steps; ddim: `steps` of them
    steps: int = 50  # DDIM steps (a subset of the T training steps); ignored by ddpm
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 = DDPM's posterior variance
    guidance: float = 1.0  # classifier-free guidance s: ε_u + s (ε_c - ε_u); 1 = the conditional model alone
    variance: Literal["beta", "beta_tilde"] = "beta"  # DDPM's σ_t²: β_t or the posterior's β̃_t
    clip: bool = True  # clip the predicted x_0 to [-1, 1]
    seed: int | None = 0  # seed of the sampling noise; None = fresh randomness

    def __post_init__(self) -> None:
        if self.sampler not in ("ddpm", "ddim"):
            raise ConfigError(f"unknown sampler {self.sampler!r}; known: ddpm, ddim")
        if self.variance not in ("beta", "beta_tilde"):
            raise ConfigError(f"sampling.variance must be beta or beta_tilde, got {self.variance!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"sampling.steps must be an integer >= 1, got {self.steps!r}")
        for name in ("eta", "guidance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"sampling.{name} must be a finite number >= 0, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ConfigError(f"sampling.seed must be an integer in [0, 2^64), got {self.seed!r}")


def ddim_timesteps(num_train_steps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced training timesteps, largest first (diffusers' "leading" spacing:
    0, k, 2k, … with k = T // steps)."""
    if not 1 <= steps <= num_train_steps:
        raise ConfigError(f"sampling.steps must be between 1 and the model's {num_train_steps} training steps, got {steps}")
    k = num_train_steps // steps
    return [i * k for i in range(steps)][::-1]


def _clipped(s: Schedule, denoise: Denoise, x: torch.Tensor, t: torch.Tensor, clip: bool):
    x0, eps = denoise(x, t)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(s, x, t, x0)
    return x0, eps


def ddpm_sample(denoise: Denoise, s: Schedule, x: torch.Tensor, *, variance: str = "beta", clip: bool = True,
                generator: torch.Generator | None = None, progress: Callable[[Iterable], Iterable] | None = None):
    """DDPM Algorithm 2 from the noise ``x`` (= x_T) to x_0."""
    var = s.betas if variance == "beta" else s.posterior_variance
    steps = range(s.num_steps - 1, -1, -1)
    for step in progress(steps) if progress else steps:
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        x0, _ = _clipped(s, denoise, x, t, clip)
        x = posterior_mean(s, x0, x, t)
        if step > 0:
            x = x + at(var, t, x).sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def ddim_sample(denoise: Denoise, s: Schedule, x: torch.Tensor, *, steps: int, eta: float = 0.0, clip: bool = True,
                generator: torch.Generator | None = None, progress: Callable[[Iterable], Iterable] | None = None):
    """DDIM (Song et al. eq. 12) over ``steps`` timesteps from the noise ``x``."""
    ts = ddim_timesteps(s.num_steps, steps)
    pairs = list(zip(ts, ts[1:] + [-1]))
    for step, prev in progress(pairs) if progress else pairs:
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        x0, eps = _clipped(s, denoise, x, t, clip)
        ac = s.alphas_cumprod[step].item()
        ac_prev = s.alphas_cumprod[prev].item() if prev >= 0 else 1.0
        sigma = eta * math.sqrt((1 - ac_prev) / (1 - ac)) * math.sqrt(1 - ac / ac_prev)
        x = math.sqrt(ac_prev) * x0 + math.sqrt(max(1 - ac_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 with s = 1 + w): s = 1 is ``cond`` exactly."""
    return uncond + scale * (cond - uncond) if scale != 1.0 else cond
