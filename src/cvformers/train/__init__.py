"""One training loop for every model: ``Trainer``, ``TrainConfig``, hooks, run-folder checkpoints."""

from cvformers.train.hooks import EMA, EMAConfig, TrainerHook
from cvformers.train.schedule import lr_at
from cvformers.train.setup import TaskSetup
from cvformers.train.trainer import TrainConfig, Trainer, param_groups, train_config_from

__all__ = ["EMA", "EMAConfig", "TaskSetup", "TrainConfig", "Trainer", "TrainerHook", "lr_at", "param_groups",
           "train_config_from"]
