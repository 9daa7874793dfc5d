"""Reconstruction metrics for image tokenizers: PSNR, codebook perplexity and usage."""

from __future__ import annotations

import math

import torch


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0,1], computed per image then averaged."""
    mse = (pred - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


def code_perplexity(ids: torch.Tensor, num_tokens: int) -> float:
    """exp(entropy) of the code histogram: the effective number of codes in use."""
    counts = torch.bincount(ids.flatten(), minlength=num_tokens).float()
    p = counts[counts > 0] / counts.sum()
    return math.exp(-(p * p.log()).sum().item())
