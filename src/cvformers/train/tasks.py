"""Training tasks: what ``cvformers train TASK`` builds before handing it to the one loop.

A task turns the command line (data spec, TOML config, overrides) into a ``TaskSetup``:
the model, its datasets, and what the run folder's ``config.toml`` must record so that the
run can be reloaded (``kind`` + ``[model]``) and resumed. Task modules register themselves
with ``@register_task("name")``; ``TASK_MODULES`` says where each lives so that importing
the CLI stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from cvformers.config import ConfigError, from_dict, load_toml
from cvformers.errors import UserError

# task name -> module that registers it
TASK_MODULES: dict[str, str] = {
    "dvae": "cvformers.vae.tasks",
    "vqvae": "cvformers.vae.tasks",
    "dalle": "cvformers.models.dalle_task",
    "clip": "cvformers.models.clip_task",
    "classifier": "cvformers.models.vision_task",
}

_TASKS: dict[str, Callable[["TaskArgs"], "TaskSetup"]] = {}


@dataclass
class TaskArgs:
    """What the user asked for; every field may be None = take the config / default."""

    out: Path  # run folder
    data: str | None = None  # dataset spec: shapes | mnist | fashion-mnist | folder:PATH
    config: dict[str, Any] = field(default_factory=dict)  # parsed TOML: [model], [train], [data] …
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    vae: str | None = None  # dalle: run folder of the frozen image tokenizer
    model: str | None = None  # classifier / clip: preset name
    device: str | None = None
    resume: bool = False


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


def register_task(name: str):
    def deco(fn: Callable[[TaskArgs], TaskSetup]):
        _TASKS[name] = fn
        return fn

    return deco


def get_task(name: str) -> Callable[[TaskArgs], TaskSetup]:
    if name not in TASK_MODULES:
        raise ConfigError(f"unknown training task {name!r}; known: {', '.join(TASK_MODULES)}")
    importlib.import_module(TASK_MODULES[name])
    return _TASKS[name]


def task_args_from_cli(args) -> TaskArgs:
    saved = Path(args.out) / "config.toml"
    if args.resume:
        from cvformers.train.checkpoint import check_run_folder

        check_run_folder(args.out, resume=True)
        # A resumed run rebuilds exactly what it saved; a new --config would change the model,
        # and task defaults in place of a lost config.toml would train something else.
        if not saved.is_file():
            raise UserError(f"--resume: {saved} is missing, so the run cannot be rebuilt as it was; "
                            "restore it or start a new run with another --out")
        config = load_toml(saved)
    else:
        config = load_toml(args.config) if args.config else {}
    return TaskArgs(
        out=Path(args.out), data=args.data, config=config, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, vae=args.vae, model=args.model,
        device=args.device, resume=args.resume,
    )


def data_config_from(args: TaskArgs, **fixed: Any):
    """The run's ``[data]`` table: TOML ``[data]``, then ``--data``, with what the model fixes
    (``image_size``, ``channels``) as defaults; a table that contradicts the model is refused."""
    from cvformers.data import DataConfig

    table = dict(args.config.get("data", {}))
    if args.data:
        table["name"] = args.data
    for key, value in fixed.items():
        table.setdefault(key, value)
    cfg = from_dict(DataConfig, table, "data")
    for key, value in fixed.items():
        if getattr(cfg, key) != value:
            raise ConfigError(f"data.{key} is {getattr(cfg, key)} but the model takes {value}; "
                              f"remove it from [data] or change the model")
    return cfg


def train_and_eval_data(data_cfg) -> tuple[Dataset, Dataset | None]:
    """The train split and the evaluation split (None where the data has no second split)."""
    from cvformers.data import build_from_config

    train = build_from_config(data_cfg, "train")
    try:
        return train, build_from_config(data_cfg, data_cfg.eval_split)
    except (UserError, ConfigError, FileNotFoundError):
        return train, None


def run_task(args) -> None:
    """Entry point of ``cvformers train TASK``: build the setup, then run the one loop."""
    import torch

    from cvformers.train.trainer import Trainer

    from cvformers.train.checkpoint import RunLock

    task_args = task_args_from_cli(args)
    # One writer per run folder, from before the task writes its caches into it (rank 0 only:
    # under torchrun the other ranks share the folder with it).
    main = os.environ.get("RANK", "0") == "0"
    with RunLock(task_args.out) if main else contextlib.nullcontext():
        # The task builds the model: seed first so that the same config gives the same initial weights.
        seed = task_args.config.get("train", {}).get("seed", 0)
        torch.manual_seed(seed if isinstance(seed, int) else 0)
        setup = get_task(args.task)(task_args)
        Trainer.from_setup(setup, task_args).fit(until=getattr(args, "until", None))
