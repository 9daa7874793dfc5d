"""Fréchet distance between two sets of feature vectors, and a classifier's penultimate features.

The Fréchet distance of two Gaussians fitted to the sets (Dowson & Landau 1982; FID, Heusel et al.
2017, eq. 6): ||μ_a - μ_b||² + Tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^½). FID computes it on the pool features
of an ImageNet Inception-v3; this module takes any features, here those of one of our own
classifiers, so a figure from it is "FD on our classifier's features" and is not comparable to FID.
"""

from __future__ import annotations

import torch
from torch import nn


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` [N, D] and ``b`` [M, D].

    Tr((Σ_a Σ_b)^½) is the sum of the square roots of the eigenvalues of Σ_a^½ Σ_b Σ_a^½, a
    symmetric positive semi-definite matrix with the same eigenvalues, so ``eigh`` in float64
    suffices (no general matrix square root).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] feature sets of the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each set needs at least two vectors for a covariance")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.no_grad()
def penultimate_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], logits [N, classes]) of images [N, C, H, W] in [0, 1]: the features are
    what enters the backbone's last Linear (``backbone.head``), as FID reads Inception's pool layer."""
    head = classifier.backbone.head
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().flatten(1)))
    logits = []
    try:
        classifier.eval()
        device = next(classifier.parameters()).device
        for i in range(0, len(images), batch_size):
            logits.append(classifier(images[i:i + batch_size].to(device)).cpu())
    finally:
        handle.remove()
    return torch.cat([s.cpu() for s in seen]), torch.cat(logits)


__all__ = ["frechet_distance", "penultimate_features"]
