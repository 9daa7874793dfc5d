"""A denoising diffusion model: a U-Net that predicts the noise (or v) of a noised image.

Training (DDPM §3.4, Algorithm 1): draw t uniformly, noise the image by the closed form
q(x_t | x_0), and regress the U-Net's output on the noise with L_simple = ||ε - ε_θ(x_t, t)||²
(eq. 14); or on v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0 (Salimans & Ho 2022), an option that keeps the
target's scale even at the ends of the chain. Labels are replaced by the "no label" index with
probability ``cond_drop_prob`` so one network learns the conditional and the unconditional model
for classifier-free guidance (Ho & Salimans 2022, Algorithm 1). Images are mapped from [0, 1] to
[-1, 1] on the way in and back on the way out (§3.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cvformers.config import ConfigError
from cvformers.diffusion import samplers
from cvformers.diffusion.samplers import DiffusionSamplingConfig, guided
from cvformers.diffusion.schedules import Schedule, q_sample, v_target, x0_eps_from_v, x0_from_eps
from cvformers.models.unet import UNet, UNetConfig
from cvformers.registry import register_kind


EMA_FILE = "ema.safetensors"  # a run's averaged weights, what sampling loads (written by the EMA hook)


def min_snr_weights(schedule: Schedule, t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-image loss weights of Min-SNR-γ (Hang et al. 2023 §3.4) for the U-Net's target.

    The x̂_0 error weighted by min(SNR_t, γ), SNR_t = ᾱ_t / (1 - ᾱ_t), said in the target trained on:
    an ε error reaches x̂_0 divided by sqrt(SNR_t), a v error multiplied by sqrt(1 - ᾱ_t), so the
    weights are min(SNR_t, γ) / SNR_t for ε and min(SNR_t, γ) / (SNR_t + 1) for v.
    """
    ac = schedule.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "eps" else clipped / (snr + 1)


@dataclass
class DDPMConfig:
    """The ``[model]`` table of a diffusion run."""

    unet: UNetConfig = field(default_factory=UNetConfig)  # the denoising network ([model.unet])
    num_steps: int = 1000  # T, steps of the forward process (DDPM: 1000)
    schedule: Literal["linear", "cosine"] = "linear"  # β schedule: DDPM's linear or improved DDPM's cosine
    prediction: Literal["eps", "v"] = "eps"  # what the U-Net predicts: the noise ε (DDPM) or v
    cond_drop_prob: float = 0.1  # classifier-free guidance: share of training labels replaced by "no label"
    # Min-SNR-γ loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    # Weighting Strategy", eq. 9-10): each timestep's loss weighted as if its x̂_0 error counted
    # min(SNR_t, γ), so that the many nearly-clean steps stop dominating; 0 = off (L_simple, DDPM eq. 14)
    min_snr_gamma: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):
            from cvformers.config import from_dict

            self.unet = from_dict(UNetConfig, self.unet, "model.unet")
        if self.num_steps < 2:
            raise ValueError(f"model.num_steps must be >= 2, got {self.num_steps}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"model.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.min_snr_gamma < 0:
            raise ValueError(f"model.min_snr_gamma must be >= 0 (0 = off), got {self.min_snr_gamma}")


@register_kind("ddpm", DDPMConfig)
class DDPM(nn.Module):
    """``loss(batch)`` for the trainer; ``denoise`` and ``sample`` for generation."""

    def __init__(self, cfg: DDPMConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(cfg.unet)
        # derived from the config, not learned: kept out of the state dict
        self.schedule = Schedule.make(cfg.schedule, cfg.num_steps)

    @property
    def num_classes(self) -> int:
        return self.cfg.unet.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        u = self.cfg.unet
        return (u.in_channels, u.image_size, u.image_size)

    def training_inputs(self, batch: dict, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """The U-Net's conditioning keywords for a training batch, with classifier-free guidance's
        drops applied. Here: the labels, each replaced by "no label" with ``cond_drop_prob``."""
        if not self.num_classes:
            return {}
        labels = batch["label"].to(x0.device).clone()
        drop = torch.rand(len(labels), device=x0.device) < self.cfg.cond_drop_prob
        labels[drop | (labels < 0)] = self.num_classes  # "no label": the unconditional model
        return {"labels": labels}

    def clean_sample(self, batch: dict) -> torch.Tensor:
        """x_0 of a training batch in the model's space: the images, mapped from [0, 1] to [-1, 1]."""
        return batch["image"] * 2 - 1

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's x̂_0 in the model's space -> images in [0, 1] (the inverse of ``clean_sample``)."""
        return ((x + 1) / 2).clamp(0, 1)

    def channel_weights(self) -> torch.Tensor | None:
        """Weights [C] (mean 1) of each channel's squared error in the loss; None: all equal."""
        return None

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self.clean_sample(batch)
        b = x0.shape[0]
        conditions = self.training_inputs(batch, x0)
        t = torch.randint(0, self.cfg.num_steps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        xt = q_sample(self.schedule, x0, t, noise)
        out = self.unet(xt, t, **conditions)
        target = noise if self.cfg.prediction == "eps" else v_target(self.schedule, x0, t, noise)
        error = (out - target).square()
        if (channel_weights := self.channel_weights()) is not None:
            error = error * channel_weights.view(1, -1, 1, 1)
        per_image = error.flatten(1).mean(dim=1)
        weights = (min_snr_weights(self.schedule, t, self.cfg.min_snr_gamma, self.cfg.prediction)
                   if self.cfg.min_snr_gamma else 1.0)
        return (weights * per_image).mean(), {"mse": per_image.mean().item()}

    def predict(self, xt: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) from the U-Net's output, whichever target it was trained on."""
        if self.cfg.prediction == "eps":
            return x0_from_eps(self.schedule, xt, t, out), out
        return x0_eps_from_v(self.schedule, xt, t, out)

    def denoise_fn(self, cond: dict[str, torch.Tensor], null: dict[str, torch.Tensor] | None = None,
                   guidance: float = 1.0) -> Callable:
        """``denoise(x_t, t) -> (x̂_0, ε̂)`` for the samplers. ``cond`` holds the U-Net's conditioning
        keywords; with guidance != 1 the conditional rows and the ``null`` ones (the same keywords
        with the condition dropped) run as one batch and are mixed in ε (Ho & Salimans eq. 6)."""
        if guidance != 1.0 and null is None:
            raise ConfigError("guidance needs a conditional model; this one was trained without a condition")
        # the conditional and null rows of the conditioning are the same at every step: join them once
        both = {k: torch.cat([cond[k], null[k]]) for k in cond} if guidance != 1.0 else {}

        def denoise(xt: torch.Tensor, t: torch.Tensor):
            if guidance == 1.0:
                return self.predict(xt, t, self.unet(xt, t, **cond))
            out = self.unet(torch.cat([xt, xt]), torch.cat([t, t]), **both)
            x0_c, eps_c = self.predict(xt, t, out[: len(xt)])
            x0_u, eps_u = self.predict(xt, t, out[len(xt):])
            eps = guided(eps_c, eps_u, guidance)
            return x0_from_eps(self.schedule, xt, t, eps), eps

        return denoise

    def label_inputs(self, labels: torch.Tensor) -> tuple[dict, dict | None]:
        """(conditional, unconditional) U-Net keywords for class ``labels`` [n]."""
        return {"labels": labels}, {"labels": torch.full_like(labels, self.num_classes)}

    def run_sampler(self, n: int, sampling: DiffusionSamplingConfig, cond: dict, null: dict | None,
                    generator: torch.Generator | None = None,
                    progress: Callable[[Iterable], Iterable] | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_T (or start from ``noise``) and run the configured sampler down to x̂_0 in [-1, 1]
        (the model's own space)."""
        s = sampling
        device = next(self.parameters()).device
        if generator is None:
            generator = torch.Generator(device)
            generator.manual_seed(s.seed) if s.seed is not None else generator.seed()
        if noise is not None and tuple(noise.shape) != (n, *self.image_shape):
            raise ValueError(f"noise must have shape {(n, *self.image_shape)}, got {tuple(noise.shape)}")
        x = torch.randn((n, *self.image_shape), generator=generator, device=device) if noise is None else noise.to(device)
        denoise = self.denoise_fn(cond, null, s.guidance)
        if s.sampler == "ddpm":
            return samplers.ddpm_sample(denoise, self.schedule, x, variance=s.variance, clip=s.clip,
                                        generator=generator, progress=progress)
        return samplers.ddim_sample(denoise, self.schedule, x, steps=s.steps, eta=s.eta, clip=s.clip,
                                    generator=generator, progress=progress)

    @torch.inference_mode()  # no autograd bookkeeping at all: no_grad still counts tensor versions
    def sample(self, n: int, sampling: DiffusionSamplingConfig | None = None, labels: torch.Tensor | None = None,
               generator: torch.Generator | None = None,
               progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
        """``n`` images [n, C, H, W] in [0, 1]. ``labels`` [n] (class-conditional models; None: unconditional)."""
        s = sampling or DiffusionSamplingConfig()
        device = next(self.parameters()).device
        if labels is not None:
            if not self.num_classes:
                raise ConfigError("labels given to a model trained without labels")
            labels = labels.to(device)
            if bool(((labels < 0) | (labels >= self.num_classes)).any()):
                raise ConfigError(f"labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        elif self.num_classes:
            labels = torch.full((n,), self.num_classes, dtype=torch.long, device=device)  # unconditional
        cond, null = self.label_inputs(labels) if self.num_classes else ({}, None)
        return self.to_images(self.run_sampler(n, s, cond, null, generator, progress))


__all__ = ["DDPM", "DDPMConfig", "EMA_FILE"]
