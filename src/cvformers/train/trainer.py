"""The one training loop. Every model exposes ``loss(batch) -> (loss, metrics)``; this trains it.

AdamW (no weight decay on biases, norms, embeddings, codebooks), linear warmup + cosine
decay, gradient clipping, gradient accumulation, optional bf16 autocast, a progress bar,
``metrics.jsonl``, atomic checkpoints every N steps, and ``resume`` that continues exactly
where the run stopped: same weights, optimizer, learning rate, RNG and data order — a run
of 2N steps and a run of N steps resumed for N more end with bit-identical weights. Under
``torchrun`` the same code runs data-parallel (DDP, ``distributed.py``) or sharded (FSDP2,
``fsdp.py``, with ``sharded_checkpoint.py``), and streams WebDataset shards (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from cvformers.config import from_dict, to_dict
from cvformers.errors import UserError
from cvformers.loading import save_weights
from cvformers.train import checkpoint as ckpt
from cvformers.train import distributed, fsdp
from cvformers.train import sharded_checkpoint as sharded
from cvformers.train.hooks import CheckpointCallback, TrainerHook
from cvformers.train.loggers import build_loggers
from cvformers.train.schedule import EpochBatchSampler, lr_at, steps_per_epoch


@dataclass
class TrainConfig:
    """The ``[train]`` table of a run. Batch sizes are per process."""

    steps: int = 1000  # optimizer steps in the whole run
    batch_size: int = 32  # items per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = processes x batch_size x grad_accum)
    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.01  # AdamW decoupled decay; not applied to biases/norms/embeddings (see param_groups)
    weight_decay_end: float | None = None  # if set, weight decay follows a cosine from weight_decay to this at the last step (DINO)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW denominator epsilon
    warmup_steps: int = 100  # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 disables clipping
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast of the forward pass (CUDA); fp16 adds DALL-E's per-block gradient scales
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    eval_every: int = 500  # steps between evaluations on the eval split (0: never; also at the end)
    eval_batches: int = 0  # eval batches per evaluation (0: the whole eval set)
    log_every: int = 10  # steps between metrics.jsonl lines
    seed: int = 0  # seeds data order and the training RNG (dropout, sampling)
    num_workers: int = 0  # DataLoader worker processes
    ddp_find_unused: bool = False  # DDP find_unused_parameters, for models that skip parameters in some steps
    ddp_comm: Literal["allreduce", "powersgd"] = "allreduce"  # gradient exchange under torchrun; powersgd compresses it
    powersgd_rank: int = 2  # PowerSGD low-rank approximation rank (higher: closer to allreduce, more traffic)
    powersgd_start: int = 10  # steps of plain allreduce before PowerSGD starts (its paper's warm start)
    loggers: tuple[Literal["tensorboard"], ...] = ()  # also log to these (RUN/tensorboard/); metrics.jsonl always
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: ddp replicates the model; fsdp shards it per block (FSDP2, docs/scale.md)
    fsdp_mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"  # fsdp: auto = bf16 params with fp32 reduce on CUDA, fp32 on CPU
    activation_checkpointing: bool = False  # recompute each block's forward in backward: less memory, ~1/3 more compute

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "powersgd_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        # AdamW's own checks come as tracebacks at step 0, and a NaN lr only as a NaN loss at step 1
        if self.weight_decay_end is not None and not (math.isfinite(self.weight_decay_end) and self.weight_decay_end >= 0):
            raise ValueError(f"train.weight_decay_end must be a finite number >= 0, got {self.weight_decay_end}")
        for name in ("lr", "weight_decay", "eps", "grad_clip", "min_lr_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"train.{name} must be a finite number, got {getattr(self, name)}")
        if not 0.0 < self.lr <= 10.0:
            raise ValueError(f"train.lr must be in (0, 10], got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ValueError(f"train.weight_decay and train.grad_clip must be >= 0 and train.eps > 0, "
                             f"got {self.weight_decay}, {self.grad_clip}, {self.eps}")
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"train.seed must be in [0, 2^63), got {self.seed}")


def train_config_from(args: Any, defaults: TrainConfig | None = None) -> TrainConfig:
    """Task defaults, then the TOML ``[train]`` table, then ``--steps/--batch-size/--lr``.

    ``args`` is a ``TaskArgs`` (anything with ``config``, ``steps``, ``batch_size``, ``lr``).
    Unknown keys or wrong types in ``[train]`` are refused naming the key.
    """
    merged = to_dict(defaults if defaults is not None else TrainConfig())
    merged.update((getattr(args, "config", None) or {}).get("train", {}))
    for key in ("steps", "batch_size", "lr"):
        value = getattr(args, key, None)
        if value is not None:
            merged[key] = value
    return from_dict(TrainConfig, merged, "train")


def weight_decay_at(step: int, start: float, end: float, total_steps: int) -> float:
    """Cosine from ``start`` at step 0 to ``end`` at the last step (DINO's weight-decay schedule)."""
    t = step / max(total_steps - 1, 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed and not decayed.

    Not decayed: every parameter with fewer than 2 dimensions (biases, norm gains, scalars
    such as CLIP's logit scale), every parameter whose name contains "embed" or "codebook"
    or ends in "_token" (token/position embeddings, VQ codebooks, ViT's cls_token), and the
    names a model lists in ``no_weight_decay()`` (timm's convention). Decaying these pulls
    lookup tables and scales towards 0 for no benefit (as in GPT-2/nanoGPT, timm, CLIP).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lname = name.lower()
        if p.ndim < 2 or "embed" in lname or "codebook" in lname or lname.endswith("_token") or name in skip:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    # "names" travels in the optimizer's state dict, so a checkpoint's moments find their
    # parameters by name on resume even if the model now registers them in another order
    groups = [{"params": decay, "weight_decay": weight_decay, "decayed": True, "names": decay_names},
              {"params": no_decay, "weight_decay": 0.0, "decayed": False, "names": no_decay_names}]
    return [g for g in groups if g["params"]]


class _LossForward(nn.Module):
    """``forward(batch) = model.loss(batch)``, so DDP's gradient hooks see the loss call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]):
        return self.model.loss(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return batch


def _seed_worker(worker_id: int) -> None:
    # torch gives each worker base_seed + id (and seeds `random` from it); numpy too.
    np.random.seed(torch.initial_seed() % 2**32)


def _default_collate():
    from cvformers.data import collate

    return collate


def _is_stream(data: Any) -> bool:
    """A streamed dataset (``cvformers.data.shards.ShardDataset``): iterable, positioned by epoch and
    batches consumed rather than by index."""
    return isinstance(data, IterableDataset) and hasattr(data, "set_epoch") and hasattr(data, "resume_from")


def _float(v: Any) -> float:
    return float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)


class _MetricsWindow:
    """Sums of step metrics since the last log line, and the time they took."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def flush(self, items_per_step: int) -> tuple[dict[str, float], float]:
        """(mean of each metric, items per second) over the window; starts a new window."""
        now = time.perf_counter()
        means = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        speed = self.steps * items_per_step / max(now - self.start, 1e-9)
        self.sums, self.steps, self.start = {}, 0, now
        return means, speed


class Trainer:
    """Trains ``setup.model`` into the run folder ``out``; ``fit()`` runs to ``steps``."""

    def __init__(self, setup, out: str | Path, *, resume: bool = False, device: str | None = None):
        self.setup = setup
        self.model: nn.Module = setup.model
        self.config: TrainConfig = setup.train_config
        self.out = Path(out)
        # a worker restarted by torchrun --max-restarts continues the run it belongs to
        self.resume = resume or (distributed.elastic_restart() and ckpt.has_checkpoint(self.out))
        self.device_name = device
        self._loggers: list = []  # [train] loggers, started by fit on the main process
        self.hooks: list[TrainerHook] = list(getattr(setup, "hooks", []))
        if setup.on_checkpoint is not None:
            self.hooks.append(CheckpointCallback(setup.on_checkpoint))
        names = [h.name for h in self.hooks]
        if len(set(names)) != len(names):
            raise ValueError(f"trainer hooks need distinct names (their checkpoint files), got {names}")

    @classmethod
    def from_setup(cls, setup, task_args) -> "Trainer":
        """As called by ``cvformers train TASK``. The task has already merged its defaults, the TOML
        ``[train]`` table and ``--steps/--batch-size/--lr`` (``train_config_from``), once."""
        if setup.train_config is None:
            setup.train_config = train_config_from(task_args)
        return cls(setup, task_args.out, resume=task_args.resume, device=task_args.device)

    def _run_config(self) -> dict[str, Any]:
        """What config.toml records: enough to rebuild the model (kind, [model]) and the run."""
        model_cfg = self.setup.model_config
        return {
            "kind": self.setup.kind,
            "model": dict(model_cfg) if isinstance(model_cfg, dict) else to_dict(model_cfg),
            "train": to_dict(self.config),
            **self.setup.extra_config,
        }

    # --- data -----------------------------------------------------------------------------

    def _micro_batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        """Micro-batches from optimizer step ``start_step`` on, epoch after epoch, without end."""
        cfg, data = self.config, self.setup.train_data
        if _is_stream(data):
            yield from self._stream_batches()
            return
        per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size
        epoch, offset = divmod(start_step, steps_per_epoch(len(data), per_step))
        collate = self.setup.collate or _default_collate()
        while True:
            if hasattr(data, "set_epoch"):
                data.set_epoch(epoch)
            sampler = EpochBatchSampler(
                len(data), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed,
                epoch=epoch, rank=self.dist.rank, world_size=self.dist.world_size, start_step=offset,
            )
            # An explicit generator keeps the loader from drawing its worker base seed from the
            # global RNG, which would shift dropout after a resume; it also fixes worker seeds.
            worker_seed = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch * 1_009 + self.dist.rank) % 2**63)
            loader = DataLoader(
                data, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                generator=worker_seed, worker_init_fn=_seed_worker, pin_memory=self.device.type == "cuda",
            )
            for batch in loader:
                yield _to_device(batch, self.device)
            epoch, offset = epoch + 1, 0

    def _stream_batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches of a streamed dataset (WebDataset shards), this process's epochs one after another.

        Processes read different shards, so their epochs end at different steps; each simply starts
        its next epoch, which keeps every process stepping together. ``self._stream_position``
        (epoch, batches handed out in it) is what a checkpoint records and a resume starts from.
        """
        cfg, data = self.config, self.setup.train_data
        collate = self.setup.collate or _default_collate()
        epoch, done = self._stream_position
        while True:
            data.set_epoch(epoch)
            data.resume_from(done, cfg.batch_size)
            loader = DataLoader(
                data, batch_size=cfg.batch_size, drop_last=True, collate_fn=collate, num_workers=cfg.num_workers,
                generator=torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch * 1_009 + self.dist.rank) % 2**63),
                worker_init_fn=_seed_worker, pin_memory=self.device.type == "cuda",
            )
            got = 0
            for batch in loader:
                got += 1
                self._stream_position = (epoch, done + got)  # counted when handed out: a checkpoint follows its step
                yield _to_device(batch, self.device)
            if got == 0 and done == 0:
                raise UserError(f"process {self.dist.rank} read no full batch of {cfg.batch_size} from its shards; "
                                "write more or smaller shards, or lower --batch-size / train.num_workers")
            epoch, done = epoch + 1, 0

    # --- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of ``model.loss`` metrics over the eval set (eval mode, no grad, RNG untouched)."""
        data, cfg = self.setup.eval_data, self.config
        collate = self.setup.collate or _default_collate()
        loader = DataLoader(
            data, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate, num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=_seed_worker,
        )
        sums: dict[str, float] = {}
        count = 0
        was_training = self.model.training
        self.model.eval()
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                for i, batch in enumerate(loader):
                    if cfg.eval_batches and i >= cfg.eval_batches:
                        break
                    batch = _to_device(batch, self.device)
                    n = next((len(v) for v in batch.values() if isinstance(v, torch.Tensor)), 1)
                    with self._autocast():
                        # under fsdp through the sharded root, whose hooks gather the parameters
                        loss, metrics = self._forward(batch) if getattr(self, "_fsdp", False) else self.model.loss(batch)
                    for k, v in {"loss": loss, **metrics}.items():
                        sums[k] = sums.get(k, 0.0) + _float(v) * n
                    count += n
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            self.model.train(was_training)
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _autocast(self):
        if self.config.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.config.amp == "fp16":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    # --- the loop -------------------------------------------------------------------------

    def fit(self, until: int | None = None) -> dict[str, float]:
        """Train to ``config.steps`` (or stop after step ``until``, checkpointing there).

        Returns the last logged train metrics and, prefixed ``eval_``, the last evaluation.
        """
        self.dist, self.device = distributed.setup(self.device_name)
        try:
            with ckpt.RunLock(self.out) if self.dist.is_main else contextlib.nullcontext():
                return self._fit(until)
        finally:
            distributed.teardown(self.dist)

    def _fit(self, until: int | None) -> dict[str, float]:
        cfg, setup, is_main = self.config, self.setup, self.dist.is_main
        if not hasattr(self.model, "loss"):
            raise TypeError(f"{type(self.model).__name__} has no loss(batch) method")
        if _is_stream(setup.train_data):
            self._check_stream(setup.train_data)
        elif isinstance(setup.train_data, IterableDataset) or not hasattr(setup.train_data, "__len__"):
            raise UserError("the trainer needs a map-style training dataset (__len__ and __getitem__), whose data "
                            "order is a seeded permutation of indices, or a stream with set_epoch and resume_from")
        self._stream_position = (0, 0)
        ckpt.check_run_folder(self.out, self.resume)
        model = self.model.to(self.device)
        model.train()
        self._fsdp = cfg.parallel == "fsdp"
        blocks = fsdp.find_blocks(model) if self._fsdp or cfg.activation_checkpointing else []
        if self._fsdp:
            self._check_fsdp(blocks)
        if cfg.activation_checkpointing:
            fsdp.checkpoint_activations(blocks)
        self._scaler = self._fp16_scaler(model) if cfg.amp == "fp16" else None
        forward = _LossForward(model)
        if self._fsdp:  # before the optimizer: fully_shard turns the parameters into DTensor shards in place
            self._replicated = fsdp.shard(forward, blocks, self.device, cfg.fsdp_mixed_precision)
        self._forward = forward
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        start, elapsed_before = self._restore(model, optimizer) if self.resume else (0, 0.0)
        # before the run folder is written: a logger that cannot start stops the run at once
        self._loggers = build_loggers(cfg.loggers, self.out, start) if is_main and start < cfg.steps else []
        if not self.resume:
            self._seed(cfg.seed)
        for hook in self.hooks:
            hook.on_fit_start(model)
        if is_main:
            ckpt.write_run_files(self.out, self._run_config(), setup.extra_files)
            if self.resume:
                ckpt.trim_metrics(self.out, start)
                ckpt.remove_stale(self.out)
        distributed.barrier(self.dist)
        if is_main and cfg.warmup_steps >= cfg.steps:
            print(f"warning: warmup_steps ({cfg.warmup_steps}) >= steps ({cfg.steps}): the learning rate "
                  f"never reaches train.lr; lower train.warmup_steps", file=sys.stderr)
        end = cfg.steps if until is None else min(until, cfg.steps)
        if start >= end:
            for logger in self._loggers:
                logger.close()
            return {"step": float(start)}

        if not self._fsdp:
            forward = distributed.wrap_ddp(
                forward, self.dist, self.device, cfg.ddp_find_unused,
                powersgd=(cfg.powersgd_rank, cfg.powersgd_start) if cfg.ddp_comm == "powersgd" else None,
            )
        params = [p for g in optimizer.param_groups for p in g["params"]]
        batches = self._micro_batches(start)
        self._bar = self._progress_bar(start)
        self._window = _MetricsWindow()
        result: dict[str, float] = {}
        t0 = time.perf_counter()
        on_train_step = getattr(model, "on_train_step", None)
        for step in range(start, end):
            if on_train_step is not None:
                on_train_step(step, cfg.steps)
            lr = lr_at(step, lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.weight_decay_end is not None:  # DINO's cosine schedule of the decay (appendix: 0.04 -> 0.4)
                wd = weight_decay_at(step, cfg.weight_decay, cfg.weight_decay_end, cfg.steps)
                for group in optimizer.param_groups:
                    if group.get("decayed", group["weight_decay"] > 0):
                        group["weight_decay"] = wd
            self._window.add(self._train_step(forward, optimizer, params, batches, step))
            for hook in self.hooks:
                hook.after_step(model, step)
            done = step + 1
            if self._bar is not None:
                self._bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                result = self._log_train(done, lr, elapsed_before + time.perf_counter() - t0)
            if setup.eval_data is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                result.update(self._evaluate_and_log(model, done))
            if done % cfg.checkpoint_every == 0 or done == end:
                self._checkpoint(model, optimizer, done, elapsed_before + time.perf_counter() - t0, final=done == end)
        if self._bar is not None:
            self._bar.close()
        for logger in self._loggers:
            logger.close()
        result["step"] = end
        return {k: v for k, v in result.items() if k != "split"}

    def _say(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def _log_train(self, done: int, lr: float, elapsed: float) -> dict[str, float]:
        """The mean metrics since the last log line -> metrics.jsonl and the progress bar."""
        cfg = self.config
        items_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size
        means, speed = self._window.flush(items_per_step)
        result = {"step": done, "split": "train", **means, "lr": lr, "items_per_s": speed, "elapsed": elapsed}
        if self.dist.is_main:
            ckpt.append_metrics(self.out, result)
            for logger in self._loggers:
                logger.log("train", done, result)
            # a model names metrics worth watching live (DINO: teacher entropy and KL, which show collapse)
            shown = {k: f"{result[k]:.4g}" for k in getattr(self.model, "progress_metrics", ()) if k in result}
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{result['loss']:.4f}", **shown, lr=f"{lr:.2e}", items_s=f"{speed:.1f}")
            else:  # no terminal (a log file, a job scheduler): one line per log step
                extra = "".join(f" {k} {v}" for k, v in shown.items())
                self._say(f"step {done}/{cfg.steps} loss {result['loss']:.4f}{extra} lr {lr:.2e} items/s {speed:.1f}")
            for hook in self.hooks:
                for line in hook.on_log(self.model, done, result):
                    self._say(f"warning: {line}")
        return result

    def _evaluate_and_log(self, model: nn.Module, done: int) -> dict[str, float]:
        """Evaluate on the main process (plus what hooks measure); the others wait."""
        result: dict[str, float] = {}
        if self._fsdp:  # a sharded forward needs every process: all evaluate, rank 0 records
            ev = self.evaluate()
        if self.dist.is_main:
            if not self._fsdp:
                ev = self.evaluate()
            for hook in self.hooks:
                ev.update(hook.on_evaluate(model, done))
            ckpt.append_metrics(self.out, {"step": done, "split": "eval", **ev})
            for logger in self._loggers:
                logger.log("eval", done, ev)
            self._say(f"eval step {done}: " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            result = {f"eval_{k}": v for k, v in ev.items()}
        distributed.barrier(self.dist)
        return result

    def _train_step(self, forward, optimizer, params, batches, step: int) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns their mean metrics."""
        cfg = self.config
        step_metrics: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            last = micro == cfg.grad_accum - 1
            # DDP all-reduces gradients in backward; skip that until the last micro-batch
            if self._fsdp:  # FSDP2's form of no_sync: keep unsharded grads until the last micro-batch
                forward.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if last or not self.dist.enabled else forward.no_sync()
            with sync:
                with self._autocast():
                    loss, metrics = forward(batch)
                # mean over micro-batches: with a mean-reduced loss, k batches of b == one of k*b
                scaled = self._scaler.scale_loss(loss) if self._scaler is not None else loss
                (scaled / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **metrics}.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + _float(v) / cfg.grad_accum
        if not math.isfinite(step_metrics["loss"]):
            raise FloatingPointError(f"loss is {step_metrics['loss']} at step {step}; lower the lr or check the data")
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure the norm, scale by 1
        if self._scaler is not None:  # fp16: a step with inf/nan gradients is skipped and counted
            def clip() -> None:
                step_metrics["grad_norm"] = _float(torch.nn.utils.clip_grad_norm_(params, max_norm))

            step_metrics["grad_norm"] = float("nan")
            self._scaler.step(optimizer, before_step=clip)
            step_metrics["skipped_steps"] = float(self._scaler.skipped)
            optimizer.zero_grad(set_to_none=True)
            return step_metrics
        if self._fsdp:
            fsdp.average_replicated_grads(self._replicated)
            step_metrics["grad_norm"] = _float(fsdp.clip_grad_norm(params, max_norm))
        else:
            step_metrics["grad_norm"] = _float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return step_metrics

    def _restore(self, model: nn.Module, optimizer) -> tuple[int, float]:
        """Load the checkpoint in the run folder: weights, optimizer, this process's RNG."""
        cfg = self.config
        where = ckpt.checkpoint_dir(self.out)
        if sharded.is_sharded(where):  # written by an fsdp run, with any number of processes
            state, hook_state = ckpt.load_trainer_state(self.out), {}
            sharded.load_sharded(where, model, optimizer)
        elif self._fsdp:
            raise UserError(f"{self.out}: an fsdp run resumes from sharded checkpoints; this one was written by a "
                            "ddp or single-process run (resume it with parallel = \"ddp\")")
        else:
            state, hook_state = ckpt.load_checkpoint(self.out, model)
            try:
                optimizer.load_state_dict(ckpt.align_optimizer_state(state["optimizer"], optimizer, self.out))
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{self.out}: the checkpoint's optimizer state does not fit this model ({e})") from e
        for hook in self.hooks:
            hook.load_state_dict(hook_state.get(hook.name))
        start = int(state["step"])
        saved_per_step = state.get("data", {}).get("items_per_step")
        per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size
        if saved_per_step is not None and saved_per_step != per_step and self.dist.is_main:
            print(f"warning: the checkpoint took {saved_per_step} items a step, this run takes {per_step}; "
                  "the data order will differ from an uninterrupted run", file=sys.stderr)
        streams = state.get("data", {}).get("stream")
        if streams is not None:
            if len(streams) == self.dist.world_size:
                self._stream_position = (int(streams[self.dist.rank][0]), int(streams[self.dist.rank][1]))
            else:  # shards are dealt to processes anew: each starts the furthest epoch afresh
                self._stream_position = (max(int(e) for e, _ in streams) + 1, 0)
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            ckpt.restore_rng(rngs[self.dist.rank])
        else:  # a different number of processes cannot replay the same RNG streams
            print(f"warning: checkpoint has RNG for {len(rngs)} processes, running {self.dist.world_size}; "
                  "reseeding", file=sys.stderr)
            self._seed(cfg.seed + start)
        return start, float(state.get("elapsed", 0.0))

    def _fp16_scaler(self, model: nn.Module):
        """DALL-E's per-resblock gradient scaling (train/grad_scaling.py), as a hook so it is checkpointed."""
        from cvformers.train.grad_scaling import PerBlockGradScaler

        if self.device.type != "cuda":
            raise UserError("[train] amp = \"fp16\" is for CUDA GPUs; use amp = \"none\" (or \"bf16\") on this device")
        if self.config.parallel == "fsdp":
            raise UserError("[train] amp = \"fp16\" goes with parallel = \"ddp\"; fsdp has its own mixed precision "
                            "(fsdp_mixed_precision)")
        scaler = PerBlockGradScaler(model, fsdp.find_blocks(model), world_size=self.dist.world_size)
        self.hooks.append(scaler)
        return scaler

    def _check_fsdp(self, blocks: list[nn.Module]) -> None:
        fsdp.fsdp2()  # torch too old: one line, before anything is sharded
        if not self.dist.enabled:
            raise UserError("[train] parallel = \"fsdp\" shards the model across processes: launch with torchrun "
                            "and 2 or more processes (docs/scale.md), or use parallel = \"ddp\"")
        stateful = [h.name for h in self.hooks if not isinstance(h, CheckpointCallback)]
        if stateful:
            raise UserError(f"parallel = \"fsdp\" does not yet carry trainer hooks ({', '.join(stateful)}: an EMA or a "
                            "teacher would need sharding too); use parallel = \"ddp\"")
        if not blocks and self.dist.is_main:
            print(f"warning: {type(self.model).__name__} has no block list (nn.ModuleList); fsdp shards it as one unit, "
                  "which gathers the whole model at once", file=sys.stderr)
        if any(isinstance(h, CheckpointCallback) for h in self.hooks) and self.dist.is_main:
            print("note: under fsdp no samples are drawn at checkpoints; draw them from the exported "
                  "model.safetensors (cvformers export RUN)", file=sys.stderr)

    def _check_stream(self, data: Any) -> None:
        """Every process and DataLoader worker needs a shard of its own (``split_by_node``, ``split_by_worker``)."""
        readers = self.dist.world_size * max(1, self.config.num_workers)
        urls = getattr(data, "urls", None)
        if urls is not None and len(urls) < readers:
            raise UserError(f"{len(urls)} training shard(s) for {self.dist.world_size} process(es) x "
                            f"{max(1, self.config.num_workers)} worker(s): each reader needs a shard of its own; "
                            "write more, smaller shards (cvformers data shards --shard-size)")

    def _seed(self, seed: int) -> None:
        # each process its own stream (different dropout masks per shard), reproducible
        seed = seed + self.dist.rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def _progress_bar(self, start: int):
        if not self.dist.is_main or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.steps, initial=start, unit="step", dynamic_ncols=True)

    def _checkpoint(self, model: nn.Module, optimizer, step: int, elapsed: float, final: bool = False) -> None:
        cfg = self.config
        per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size
        if _is_stream(self.setup.train_data):
            # one (epoch, batches) per process, in rank order: streams are positioned per process
            streams = distributed.gather_objects(list(self._stream_position), self.dist)
            data_state: dict[str, Any] = {"stream": streams, "items_per_step": per_step}
        else:
            epoch, offset = divmod(step, steps_per_epoch(len(self.setup.train_data), per_step))
            data_state = {"epoch": epoch, "offset": offset, "items_per_step": per_step}
        rngs = distributed.gather_objects(ckpt.capture_rng(), self.dist)
        if self._fsdp:
            state = {"step": step, "rng": rngs, "data": data_state, "elapsed": elapsed}
            sharded.save_sharded(self.out, model, optimizer, state, self.dist)
            if final:  # the ordinary single file for generate / bundle / load_run, gathered from every process
                full = sharded.gather_full_weights(model)
                if self.dist.is_main:
                    save_weights(full, self.out / ckpt.WEIGHTS, metadata={"step": str(step)})
                distributed.barrier(self.dist)
            return
        if self.dist.is_main:
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "rng": rngs,  # one entry per process, in rank order
                "data": data_state,
                "elapsed": elapsed,
            }
            hook_state = {h.name: sd for h in self.hooks if (sd := h.state_dict())}
            ckpt.save_checkpoint(self.out, model, state, hook_state)
            for logger in self._loggers:  # what a checkpoint holds, TensorBoard shows
                logger.flush()
            was_training = model.training
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                for hook in self.hooks:
                    hook.on_checkpoint(model, self.out, step)
            model.train(was_training)
        distributed.barrier(self.dist)
