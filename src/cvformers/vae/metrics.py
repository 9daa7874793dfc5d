"""What an image tokenizer keeps and how many codes it uses: PSNR and codebook perplexity.

Used by the tokenizers' own losses (logged every step) and by ``cvformers.eval.reconstruction``.
"""

from __future__ import annotations

import math

import torch


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0,1], computed per image then averaged."""
    mse = (pred - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


def code_histogram(ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return torch.bincount(ids.flatten().cpu(), minlength=num_tokens).double()


def perplexity_of(counts: torch.Tensor) -> float:
    p = counts[counts > 0] / counts.sum()
    return math.exp(-(p * p.log()).sum().item())


def code_perplexity(ids: torch.Tensor, num_tokens: int) -> float:
    """exp(entropy) of the code histogram: the effective number of codes in use."""
    return perplexity_of(code_histogram(ids, num_tokens))
