"""Noise schedules and the closed forms of the forward process (DDPM, Ho et al. 2020 §2).

The forward process adds Gaussian noise in T steps, q(x_t | x_{t-1}) = N(sqrt(1 - β_t) x_{t-1}, β_t I);
with α_t = 1 - β_t and ᾱ_t = ∏_{s<=t} α_s it has the closed form (eq. 4)

    q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I),

and the posterior that sampling inverts (eqs. 6-7)

    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I),  μ̃_t = c0_t x_0 + c1_t x_t,  β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t).

Timesteps are 0-based here (t = 0 … T-1 is the paper's 1 … T), as in diffusers, whose
``DDPMScheduler`` / ``DDIMScheduler`` give the same ``alphas_cumprod`` for the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


def beta_schedule(kind: str, num_steps: int) -> torch.Tensor:
    """β_1 … β_T in float64.

    ``linear``: 1e-4 to 0.02 over T = 1000 (DDPM §4), the end points rescaled by 1000 / T so that a
    shorter chain destroys the image as completely (improved DDPM's rule; exactly the paper at T = 1000).
    ``cosine``: ᾱ_t = f(t) / f(0), f(t) = cos²(π/2 · (t/T + s) / (1 + s)), s = 0.008, β clipped at
    0.999 (Nichol & Dhariwal 2021 §3.2; diffusers' "squaredcos_cap_v2").
    """
    if num_steps < 1:
        raise ValueError(f"diffusion.num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        scale = 1000.0 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {kind!r}; known: linear, cosine")


@dataclass(frozen=True)
class Schedule:
    """Every per-timestep coefficient, computed once in float64 and kept as float32 tensors."""

    betas: torch.Tensor  # β_t
    alphas_cumprod: torch.Tensor  # ᾱ_t
    alphas_cumprod_prev: torch.Tensor  # ᾱ_{t-1} (1 at t = 0)
    posterior_variance: torch.Tensor  # β̃_t
    posterior_mean_x0: torch.Tensor  # c0_t = β_t sqrt(ᾱ_{t-1}) / (1 - ᾱ_t)
    posterior_mean_xt: torch.Tensor  # c1_t = (1 - ᾱ_{t-1}) sqrt(α_t) / (1 - ᾱ_t)

    @classmethod
    def make(cls, kind: Literal["linear", "cosine"], num_steps: int) -> "Schedule":
        betas = beta_schedule(kind, num_steps)
        alphas = 1 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        f = lambda x: x.float()  # noqa: E731  (float64 for the products, float32 to use)
        return cls(
            betas=f(betas), alphas_cumprod=f(ac), alphas_cumprod_prev=f(ac_prev),
            posterior_variance=f(betas * (1 - ac_prev) / (1 - ac)),
            posterior_mean_x0=f(betas * ac_prev.sqrt() / (1 - ac)),
            posterior_mean_xt=f((1 - ac_prev) * alphas.sqrt() / (1 - ac)),
        )

    @property
    def num_steps(self) -> int:
        return len(self.betas)


def at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped [B, 1, 1, 1] to broadcast over images like ``like``."""
    return values.to(like.device)[t].view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def q_sample(s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) by the closed form (DDPM eq. 4)."""
    ac = at(s.alphas_cumprod, t, x0)
    return ac.sqrt() * x0 + (1 - ac).sqrt() * noise


def x0_from_eps(s: Schedule, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    ac = at(s.alphas_cumprod, t, xt)
    return (xt - (1 - ac).sqrt() * eps) / ac.sqrt()


def eps_from_x0(s: Schedule, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    ac = at(s.alphas_cumprod, t, xt)
    return (xt - ac.sqrt() * x0) / (1 - ac).sqrt()


def v_target(s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 (Salimans & Ho 2022, §4), the v-prediction target."""
    ac = at(s.alphas_cumprod, t, x0)
    return ac.sqrt() * noise - (1 - ac).sqrt() * x0


def x0_eps_from_v(s: Schedule, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ac = at(s.alphas_cumprod, t, xt)
    return ac.sqrt() * xt - (1 - ac).sqrt() * v, (1 - ac).sqrt() * xt + ac.sqrt() * v


def posterior_mean(s: Schedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """μ̃_t(x_t, x_0) of q(x_{t-1} | x_t, x_0) (DDPM eq. 7)."""
    return at(s.posterior_mean_x0, t, xt) * x0 + at(s.posterior_mean_xt, t, xt) * xt
