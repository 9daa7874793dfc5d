"""Fréchet distance on feature sets, and a classifier's penultimate features."""

from __future__ import annotations

import pytest
import torch

from cvformers.eval.frechet import frechet_distance, penultimate_features


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40000, 3, generator=g)
    m = torch.tensor([1.0, -2.0, 0.5])
    b = 2 * torch.randn(40000, 3, generator=g) + m
    # N(0, I) vs N(m, 4I): |m|^2 + Tr(I + 4I - 2 (4I)^(1/2)) = |m|^2 + 3
    assert frechet_distance(a, b) == pytest.approx(float(m.square().sum()) + 3.0, abs=0.15)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, b[:, :2])


def test_penultimate_features_are_what_the_head_reads():
    from cvformers.models.vision import ClassifierConfig, ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier(ClassifierConfig(family="vit", backbone={
        "image_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 3, "embed_dim": 16, "depth": 1, "num_heads": 2}))
    images = torch.rand(5, 1, 8, 8)
    feats, logits = penultimate_features(model, images, batch_size=2)
    head = model.backbone.head
    assert feats.shape == (5, 16) and torch.allclose(head(feats), logits, atol=1e-5)
    assert torch.allclose(logits, model(images), atol=1e-5)
