"""What the one loop trains: a ``TaskSetup``, built by a training task (``cvformers.tasks``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset


@dataclass
class TaskSetup:
    """Everything the trainer needs; built by a task function."""

    kind: str  # model kind (cvformers.registry) written to config.toml
    model: nn.Module  # exposes loss(batch) -> (loss, metrics)
    model_config: Any  # the model's Config dataclass, written as [model]
    train_config: Any  # cvformers.train.trainer.TrainConfig, written as [train]
    train_data: Dataset
    eval_data: Dataset | None = None  # evaluated every train_config.eval_every steps
    collate: Callable | None = None  # None: cvformers.data.collate
    extra_config: dict[str, Any] = field(default_factory=dict)  # more tables for config.toml ([data], …)
    extra_files: dict[str, bytes] = field(default_factory=dict)  # e.g. {"tokenizer.json": b"..."}
    # called by rank 0 after each checkpoint, e.g. to write a reconstruction / sample grid
    on_checkpoint: Callable[[nn.Module, Path, int], None] | None = None
    hooks: list = field(default_factory=list)  # cvformers.train.hooks.TrainerHook: EMA, teachers, ...
