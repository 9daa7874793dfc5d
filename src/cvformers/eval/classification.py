"""Classification accuracy of a trained classifier run on its held-out split.

``evaluate_classifier(run)`` reloads the run folder (``kind = "classifier"``), rebuilds its
data from the ``[data]`` table (or another spec with the same image size), and returns top-1
accuracy, mean cross-entropy (without label smoothing) and per-class accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cvformers.config import from_dict
from cvformers.errors import UserError


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset, batch_size: int = 256, limit: int | None = None,
             num_classes: int | None = None, class_names: list[str] | None = None) -> dict[str, Any]:
    """Top-1 accuracy, mean cross-entropy, per-class accuracy, the confusion matrix and images/s of
    ``model`` on ``dataset``.

    ``confusion[t][p]`` counts the images of true class t predicted as p, a square matrix of side
    ``num_classes`` (default: the model's number of outputs). ``per_class`` is keyed by ``class_names[i]`` when
    given, else by the class index.
    """
    from cvformers.data import collate
    from cvformers.utils import progress

    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    correct = total = 0
    loss_sum = 0.0
    per_class: dict[int, list[int]] = {}
    confusion: torch.Tensor | None = None
    start = time.perf_counter()
    for batch in progress(loader, desc="classifying", unit="batch"):
        images, labels = batch["image"].to(device), batch["label"].to(device)
        if limit is not None and total >= limit:
            break
        if limit is not None:
            images, labels = images[: limit - total], labels[: limit - total]
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        predicted = logits.argmax(-1)
        hits = predicted == labels
        if confusion is None:
            side = num_classes or logits.shape[-1]
            confusion = torch.zeros(side, side, dtype=torch.long)
        confusion.index_put_((labels.cpu(), predicted.cpu()), torch.ones(len(labels), dtype=torch.long),
                             accumulate=True)
        correct += int(hits.sum())
        total += len(labels)
        for y, h in zip(labels.tolist(), hits.tolist()):
            c = per_class.setdefault(y, [0, 0])
            c[0] += int(h)
            c[1] += 1
    if total == 0:
        raise UserError("the evaluation split is empty")
    seconds = time.perf_counter() - start
    names = class_names or []
    name = lambda k: names[k] if k < len(names) else k  # noqa: E731  (an output the data does not name)
    return {
        "accuracy": correct / total,
        "loss": loss_sum / total,
        "n": total,
        "per_class": {name(k): v[0] / v[1] for k, v in sorted(per_class.items())},
        "confusion": confusion.tolist(),
        "images_per_s": total / max(seconds, 1e-9),
    }


def evaluate_classifier(run: str | Path, data: str | None = None, split: str | None = None,
                        limit: int | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Accuracy of the classifier in run folder ``run`` on its eval split (or ``data``/``split``).

    Besides ``accuracy``'s keys: ``classes``, the class names in index order (the labels of the
    confusion matrix; indices as text when the data names none)."""
    from cvformers.data import DataConfig
    from cvformers.data.labels import class_names, classification_dataset
    from cvformers.loading import load_run

    model, cfg = load_run(run)
    if cfg.get("kind") != "classifier":
        raise UserError(f"{run} is a {cfg.get('kind')!r} run, not a classifier")
    data_cfg = from_dict(DataConfig, dict(cfg.get("data", {})), "data")
    if data is not None:
        data_cfg.name = data
    dataset = classification_dataset(data_cfg, split or data_cfg.eval_split)
    names = class_names(data_cfg.name, dataset)
    result = accuracy(model, dataset, batch_size=batch_size, limit=limit, class_names=names)
    side = len(result["confusion"])
    classes = (names or [])[:side] + [str(i) for i in range(len(names or []), side)]
    return {"run": str(run), "data": data_cfg.name, "split": split or data_cfg.eval_split, "classes": classes, **result}
