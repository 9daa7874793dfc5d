"""Frozen features, judged by labels: weighted k-NN and a linear probe (DINO §4.1, appendix).

**Weighted k-NN** (Wu et al. 2018, as DINO §4.1 and its ``eval_knn.py``): the features of the
train split are the memory bank; a test image's features (L2-normalised) vote through its k
nearest train images by cosine similarity s, each vote weighted exp(s / T), with k = 20 and
T = 0.07; the class with the largest total wins.

**Linear probe**: a linear classifier trained on the frozen features of the train split,
scored on the test split. Departure from the paper's linear evaluation (SGD for 100 epochs on
augmented images): the features are extracted once, without augmentation, and the classifier is
fitted on them by full-batch L-BFGS, so a probe costs seconds on a CPU.

Features come from ``feature_encoder``: a dino run's teacher (or student) backbone, a classifier
run's backbone (its head left out), or a preset name at random init — the three baselines of
docs/results.md.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cvformers.errors import UserError

Encoder = Callable[[torch.Tensor], torch.Tensor]  # images [B, C, H, W] in [0, 1] -> features [B, D]


@torch.no_grad()
def extract_features(encoder: Encoder, dataset, batch_size: int = 256, limit: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], labels [N]) of the first ``limit`` items of ``dataset`` (all by default)."""
    from torch.utils.data import Subset

    from cvformers.data import collate

    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    feats, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        feats.append(encoder(batch["image"]).float())
        labels.append(batch["label"])
    if not feats:
        raise UserError("no images to extract features from: the split is empty")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN class of each test feature: [M] predicted labels."""
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise UserError(f"the k-NN temperature must be > 0, got {temperature}")
    train = F.normalize(train_feats.float(), dim=1)
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test_feats), chunk):
        query = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)  # [m, k]
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(query), num_classes).scatter_add_(1, train_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of the weighted k-NN classifier."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    preds = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return float((preds == test_labels).float().mean())


def linear_probe(train_feats, train_labels, test_feats, test_labels, steps: int = 100,
                 weight_decay: float = 1e-4) -> float:
    """Top-1 test accuracy of a linear classifier fitted on frozen, standardised train features
    (full-batch L-BFGS on the cross-entropy plus an L2 penalty)."""
    mean, std = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
    x_train, x_test = (train_feats - mean) / std, (test_feats - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.random.fork_rng():
        torch.manual_seed(0)
        probe = torch.nn.Linear(x_train.shape[1], num_classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x_train), train_labels) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((probe(x_test).argmax(1) == test_labels).float().mean())


# --- encoders from run folders ------------------------------------------------------------


@dataclass
class FeatureEncoder:
    """A frozen model's features: ``encoder(images in [0, 1]) -> [B, D]``, and what it takes."""

    encode: Encoder
    image_size: int
    in_chans: int
    info: dict[str, Any]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)


def pooled_features(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What a registry backbone's head reads (the [CLS] token or the pooled tokens), head left out."""
    head, backbone.head = backbone.head, torch.nn.Identity()
    try:
        return backbone(images)
    finally:
        backbone.head = head


def feature_encoder(model: str | Path, student: bool = False) -> FeatureEncoder:
    """The features of a dino run (its teacher, or ``student``), a classifier run (its backbone
    without the head), or a preset name (random init, seed 0)."""
    from cvformers.config import load_toml
    from cvformers.loading import TEACHER_WEIGHTS, WEIGHTS, load_run
    from cvformers.models.vision import PRESETS, ImageClassifier, classifier_config

    text = str(model)
    if Path(text).is_dir():
        config = Path(text) / "config.toml"
        kind = load_toml(config).get("kind") if config.is_file() else None
        if kind == "dino":
            weights = WEIGHTS if student else TEACHER_WEIGHTS
            net, _ = load_run(text, weights=weights)
            return FeatureEncoder(net.features, net.image_size, net.in_chans,
                                  {"model": text, "kind": "dino", "weights": "student" if student else "teacher"})
        if kind == "classifier":
            net, _ = load_run(text)
            return FeatureEncoder(lambda x: pooled_features(net.backbone, (net.fit_input(x) - net.mean) / net.std),
                                  net.image_size, net.in_chans, {"model": text, "kind": "classifier"})
        if kind is None:
            raise UserError(f"{text} is not a run folder (no config.toml)")
        raise UserError(f"{text} is a {kind!r} run; features come from dino and classifier runs")
    if text in PRESETS:
        print(f"notice: {text} is a preset name, not a run folder: its weights are random", file=sys.stderr)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = ImageClassifier(classifier_config(text)).eval()
        return FeatureEncoder(lambda x: pooled_features(net.backbone, (net.fit_input(x) - net.mean) / net.std),
                              net.image_size, net.in_chans, {"model": text, "kind": "random init"})
    raise UserError(f"{text}: neither a run folder nor a model preset (see `cvformers models`)")


def evaluate_features(model: str | Path, data: str = "fashion-mnist", k: int = 20, temperature: float = 0.07,
                      train_limit: int | None = None, test_limit: int | None = None, probe: bool = True,
                      student: bool = False, batch_size: int = 256) -> dict[str, Any]:
    """``cvformers eval knn``: weighted k-NN (and linear-probe) top-1 of a model's frozen features,
    the train split as memory bank, the test split as queries."""
    from cvformers.data import DataConfig
    from cvformers.data.labels import classification_dataset

    encoder = feature_encoder(model, student=student)
    info = encoder.info
    data_cfg = DataConfig(name=data, image_size=encoder.image_size, channels=encoder.in_chans)
    torch_threads = torch.get_num_threads()
    start = time.perf_counter()
    train_f, train_y = extract_features(encoder, classification_dataset(data_cfg, "train"), batch_size, train_limit)
    test_f, test_y = extract_features(encoder, classification_dataset(data_cfg, "test"), batch_size, test_limit)
    result = {**info, "data": data, "train_images": len(train_y), "test_images": len(test_y), "k": k,
              "temperature": temperature,
              "knn_top1": knn_accuracy(train_f, train_y, test_f, test_y, k, temperature)}
    if probe:
        result["linear_top1"] = linear_probe(train_f, train_y, test_f, test_y)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["threads"] = torch_threads
    return result
