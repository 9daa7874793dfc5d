"""Training tasks: what ``cvformers train TASK`` builds before handing it to the one loop.

A task turns the command line (data spec, TOML config, overrides) into a ``TaskSetup``
(``cvformers.train.setup``): the model, its datasets, trainer hooks, and what the run folder's
``config.toml`` must record so that the run can be reloaded (``kind`` + ``[model]``) and
resumed. Each module of this package holds one task (or a family: dvae and vqvae) and registers
it with ``@register_task("name")``; the list of tasks is whatever the modules register.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from cvformers.config import ConfigError, from_dict, load_toml
from cvformers.errors import UserError
from cvformers.train.setup import TaskSetup

__all__ = ["TaskArgs", "TaskSetup", "data_config_from", "get_task", "indexed_data", "register_task", "run_task",
           "tasks", "train_and_eval_data"]

_TASKS: dict[str, Callable[["TaskArgs"], "TaskSetup"]] = {}
_TABLES: dict[str, tuple[str, ...]] = {}  # task name -> the TOML tables it reads beyond COMMON_TABLES
COMMON_TABLES = ("model", "train", "data")  # what every task reads (and config.toml's `kind`)


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
    clip: str | None = None  # unclip-prior / unclip-decoder: run folder of the frozen CLIP
    model: str | None = None  # classifier / clip: preset name
    device: str | None = None
    resume: bool = False


def register_task(name: str, tables: tuple[str, ...] = ()):
    """Register ``fn(TaskArgs) -> TaskSetup`` as ``cvformers train NAME``; its docstring's first
    line is the task's help text. ``tables`` names the TOML tables it reads besides
    ``[model]``, ``[train]`` and ``[data]``: any other table in a config is refused."""

    def deco(fn: Callable[[TaskArgs], TaskSetup]):
        if name in _TASKS and _TASKS[name].__qualname__ != fn.__qualname__:
            raise ValueError(f"training task {name!r} is registered twice")
        _TASKS[name] = fn
        _TABLES[name] = tuple(tables)
        return fn

    return deco


def _import_task_modules() -> None:
    """Import every module of this package: each registers its tasks (complete by construction)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def tasks() -> dict[str, Callable[[TaskArgs], TaskSetup]]:
    """Every registered training task, by name."""
    _import_task_modules()
    return dict(sorted(_TASKS.items()))


def task_help(name: str) -> str:
    doc = (tasks()[name].__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


def get_task(name: str) -> Callable[[TaskArgs], TaskSetup]:
    if name not in _TASKS:
        _import_task_modules()
    if name not in _TASKS:
        raise ConfigError(f"unknown training task {name!r}; known: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def check_tables(config: dict[str, Any], task: str) -> None:
    """Refuse a table the task does not read (a misspelt ``[trian]`` would silently train the
    defaults), naming the nearest known one, and a value where a table belongs."""
    import difflib

    known = (*COMMON_TABLES, *_TABLES.get(task, ()))
    for key, value in config.items():
        if key == "kind":
            continue
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean [{near[0]}]? " if near else ""
            raise ConfigError(f"unknown table [{key}] for task {task}; {hint}known tables: "
                              + ", ".join(f"[{k}]" for k in known))
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table of settings, got {type(value).__name__} {value!r}")


def task_args_from_cli(args) -> TaskArgs:
    saved = Path(args.out) / "config.toml"
    if not args.resume:
        from cvformers.train.checkpoint import has_checkpoint
        from cvformers.train.distributed import elastic_restart

        if elastic_restart() and has_checkpoint(args.out):
            # torchrun --max-restarts started this worker again after a failure: continue, as with --resume
            args.resume = True
            if os.environ.get("RANK", "0") == "0":
                import sys

                print(f"restart {os.environ.get('TORCHELASTIC_RESTART_COUNT')} by torchrun: resuming {args.out} "
                      "from its last checkpoint", file=sys.stderr)
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
        batch_size=args.batch_size, lr=args.lr, vae=args.vae, clip=getattr(args, "clip", None), model=args.model,
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


def indexed_data(dataset, task: str):
    """``dataset`` itself, refusing a stream (``wds:`` shards) where a task keeps per-item results
    (cached image ids, CLIP embeddings) that must stay paired with each item's caption."""
    from torch.utils.data import IterableDataset

    if isinstance(dataset, IterableDataset):
        raise UserError(f"{task} caches a result per item and needs indexed data (shapes, folder:PATH, mnist); "
                        "wds: shards are streamed (docs/scale.md)")
    return dataset


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

    from cvformers.train.checkpoint import RunLock
    from cvformers.train.trainer import Trainer

    get_task(args.task)  # an unknown task name first, then the config it would read
    task_args = task_args_from_cli(args)
    check_tables(task_args.config, args.task)
    # One writer per run folder, from before the task writes its caches into it (rank 0 only:
    # under torchrun the other ranks share the folder with it).
    main = os.environ.get("RANK", "0") == "0"
    with RunLock(task_args.out) if main else contextlib.nullcontext():
        # The task builds the model: seed first so that the same config gives the same initial weights.
        seed = task_args.config.get("train", {}).get("seed", 0)
        torch.manual_seed(seed if isinstance(seed, int) else 0)
        setup = get_task(args.task)(task_args)
        Trainer.from_setup(setup, task_args).fit(until=getattr(args, "until", None))
