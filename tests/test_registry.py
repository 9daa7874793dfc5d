"""Registration is complete by construction: a new model kind and task need one file, no list."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cvformers import cli
from cvformers.loading import load_run
from cvformers.registry import kinds, register_kind
from cvformers.tasks import TaskArgs, TaskSetup, register_task, tasks
from cvformers.train.checkpoint import load_trainer_state
from cvformers.train.trainer import TrainConfig, train_config_from


@dataclass
class LineConfig:
    """y = a x + b, fitted by least squares."""

    scale: float = 1.0  # initial slope


@register_kind("test-line", LineConfig)
class Line(nn.Module):
    def __init__(self, cfg: LineConfig):
        super().__init__()
        self.cfg = cfg
        self.a = nn.Parameter(torch.tensor(cfg.scale))
        self.b = nn.Parameter(torch.zeros(()))

    def loss(self, batch):
        loss = F.mse_loss(self.a * batch["x"] + self.b, batch["y"])
        return loss, {}


class Points(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        x = torch.tensor(i / 16.0)
        return {"x": x, "y": 3 * x - 1}


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in ("x", "y")}


@register_task("test-line")
def line_task(args: TaskArgs) -> TaskSetup:
    """A straight line through points."""
    cfg = LineConfig()
    train = train_config_from(args, TrainConfig(steps=3, batch_size=4, lr=0.1, warmup_steps=0, eval_every=0))
    return TaskSetup(kind="test-line", model=Line(cfg), model_config=cfg, train_config=train,
                     train_data=Points(), collate=collate)


def test_a_kind_and_a_task_defined_here_train_through_the_cli(tmp_path, capsys):
    assert "test-line" in kinds() and "test-line" in tasks()
    assert {"dalle", "clip", "classifier", "dvae", "vqvae"} <= set(tasks())  # the package's own, found by import
    run = tmp_path / "line"
    assert cli.main(["train", "test-line", "--out", str(run)]) == 0
    assert load_trainer_state(run)["step"] == 3
    model, cfg = load_run(run)
    assert isinstance(model, Line) and cfg["kind"] == "test-line"
    assert model.a.item() != 1.0  # it trained

    capsys.readouterr()
    try:
        cli.main(["train", "--help"])
    except SystemExit as e:
        assert e.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "test-line = A straight line through points" in help_text
