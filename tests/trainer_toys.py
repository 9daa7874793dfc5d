"""Tiny models and datasets for the trainer tests (not a test module itself)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cvformers.registry import register_kind


@dataclass
class ToyConfig:
    dim: int = 8  # input features
    hidden: int = 16  # hidden width
    dropout: float = 0.0  # dropout after the hidden layer (exercises the RNG on resume)


@register_kind("toy-regressor", ToyConfig)
class ToyRegressor(nn.Module):
    """x -> MLP -> scalar; mean squared error against y. Has a tied pair to test saving."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.dim, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, 1)
        self.drop = nn.Dropout(cfg.dropout)
        self.steps_seen: list[int] = []

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.norm(self.embed(x))))).squeeze(-1)

    def loss(self, batch):
        pred = self(batch["x"])
        loss = F.mse_loss(pred, batch["y"])
        return loss, {"abs_err": (pred - batch["y"]).abs().mean().item()}

    def on_train_step(self, step, total_steps):
        self.steps_seen.append(step)


@dataclass
class ToyBlocksConfig:
    dim: int = 8  # input features
    width: int = 16  # residual stream width
    depth: int = 3  # residual blocks (the units fsdp shards one by one)


class ToyResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.fc(self.norm(h)))


@register_kind("toy-blocks", ToyBlocksConfig)
class ToyBlocks(nn.Module):
    """ToyRegressor's problem through a stack of residual blocks held in an nn.ModuleList (a transformer's shape)."""

    def __init__(self, cfg: ToyBlocksConfig):
        super().__init__()
        self.embed = nn.Linear(cfg.dim, cfg.width)
        self.blocks = nn.ModuleList(ToyResidualBlock(cfg.width) for _ in range(cfg.depth))
        self.head = nn.Linear(cfg.width, 1)
        self.scale = nn.Parameter(torch.tensor(1.0))  # a 0-dim parameter, as CLIP's temperature (fsdp keeps it whole)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.scale * self.head(h).squeeze(-1)

    def loss(self, batch):
        pred = self(batch["x"])
        return F.mse_loss(pred, batch["y"]), {}


def toy_blocks_setup(train_config, n=64, seed=0):
    from cvformers.train.setup import TaskSetup

    torch.manual_seed(seed)
    cfg = ToyBlocksConfig()
    return TaskSetup(kind="toy-blocks", model=ToyBlocks(cfg), model_config=cfg, train_config=train_config,
                     train_data=ToyData(n), eval_data=ToyData(16, seed=1), collate=toy_collate)


class ToyData(Dataset):
    """A fixed random regression problem: y = tanh(x @ w)."""

    def __init__(self, n: int = 64, dim: int = 8, seed: int = 0):
        w = torch.randn(dim, generator=torch.Generator().manual_seed(1234))  # one problem for all splits
        self.x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
        self.y = torch.tanh(self.x @ w)
        self.epochs: list[int] = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "index": i}

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def toy_collate(items):
    return {
        "x": torch.stack([it["x"] for it in items]),
        "y": torch.stack([it["y"] for it in items]),
        "index": [it["index"] for it in items],
    }


def toy_setup(train_config, n=64, dropout=0.0, eval_data=True, seed=0, **extra):
    from cvformers.train.setup import TaskSetup

    torch.manual_seed(seed)
    cfg = ToyConfig(dropout=dropout)
    return TaskSetup(
        kind="toy-regressor", model=ToyRegressor(cfg), model_config=cfg, train_config=train_config,
        train_data=ToyData(n), eval_data=ToyData(16, seed=1) if eval_data else None, collate=toy_collate, **extra,
    )


def _register_toy_task():
    from cvformers.tasks import TaskSetup, register_task
    from cvformers.train.trainer import TrainConfig, train_config_from

    @register_task("toy")
    def toy_task(args):
        """A task in the shape the real ones have: defaults, then TOML, then CLI overrides."""
        from cvformers.config import from_dict

        cfg = from_dict(ToyConfig, args.config.get("model", {}), "model")
        train = train_config_from(args, TrainConfig(steps=6, batch_size=8, warmup_steps=1, eval_every=0, log_every=2))
        return TaskSetup(kind="toy-regressor", model=ToyRegressor(cfg), model_config=cfg, train_config=train,
                         train_data=ToyData(32), collate=toy_collate, extra_config={"data": {"spec": str(args.data)}})


_register_toy_task()


# --- crash tests: training in a child process that is killed with SIGKILL -----------------------

CRASH_OPS = ("rename", "replace", "link", "unlink", "fsync", "mkdir", "rmdir")


def crash_config(steps: int = 6, checkpoint_every: int = 2):
    from cvformers.train.trainer import TrainConfig

    return TrainConfig(steps=steps, batch_size=8, checkpoint_every=checkpoint_every, eval_every=0,
                       log_every=1, warmup_steps=1)


def count_checkpoint_ops(run_dir, train_config, kill_at: int | None = None, step: int = 4) -> int:
    """Train (resuming if there is a checkpoint); inside the save of checkpoint ``step`` count the
    file operations in ``CRASH_OPS`` and, when ``kill_at`` is given, SIGKILL this process just
    before operation number ``kill_at`` (1-based). Returns the count when not killed."""
    import os
    import signal

    import cvformers.train.checkpoint as ckpt
    from cvformers.train.checkpoint import has_checkpoint
    from cvformers.train.trainer import Trainer

    torch.set_num_threads(1)  # as the test process (conftest): the same reduction order, the same bits
    count = [0]
    armed = [False]
    originals = {name: getattr(os, name) for name in CRASH_OPS}

    def counting(name):
        def op(*args, **kwargs):
            if armed[0]:
                count[0] += 1
                if kill_at is not None and count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return originals[name](*args, **kwargs)
        return op

    save = ckpt.save_checkpoint

    def watched_save(run, model, state, *rest):
        armed[0] = state["step"] == step
        try:
            return save(run, model, state, *rest)
        finally:
            armed[0] = False

    for name in CRASH_OPS:
        setattr(os, name, counting(name))
    ckpt.save_checkpoint = watched_save
    try:
        Trainer(toy_setup(train_config), run_dir, resume=has_checkpoint(run_dir)).fit()
    finally:
        for name, fn in originals.items():
            setattr(os, name, fn)
        ckpt.save_checkpoint = save
    return count[0]


def train_killed_after(run_dir, train_config, delay: float) -> None:
    """Train (resuming if there is a checkpoint) and SIGKILL this process ``delay`` s after the
    trainer starts (never, for a negative delay)."""
    import os
    import signal
    import threading

    from cvformers.train.checkpoint import has_checkpoint
    from cvformers.train.trainer import Trainer

    torch.set_num_threads(1)
    if delay >= 0:
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    Trainer(toy_setup(train_config), run_dir, resume=has_checkpoint(run_dir)).fit()
