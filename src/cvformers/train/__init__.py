"""One training loop for every model: ``Trainer``, ``TrainConfig``, run folders (``load_run``)."""

from cvformers.train.checkpoint import load_run, load_weights, save_weights
from cvformers.train.schedule import lr_at
from cvformers.train.trainer import TrainConfig, Trainer, param_groups, train_config_from

__all__ = ["TrainConfig", "Trainer", "load_run", "load_weights", "lr_at", "param_groups", "save_weights", "train_config_from"]
