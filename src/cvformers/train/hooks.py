"""Trainer hooks: what a task adds to the one loop without touching it.

A hook is called after every optimizer step (an EMA of weights, a DINO teacher), after each
evaluation and after each checkpoint (sample grids). State a hook owns is returned by
``state_dict()`` as plain tensors, written into the checkpoint folder as ``<name>.safetensors``
beside the weights, and handed back to ``load_state_dict`` on ``--resume``, so a resumed run
continues bit-exactly.

    class Counter(TrainerHook):
        name = "counter"
        def after_step(self, model, step):
            ...
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class TrainerHook:
    """Override what is needed; every method has a do-nothing default."""

    name: str = "hook"  # file stem of the hook's state in a checkpoint folder; unique per run

    def on_fit_start(self, model: nn.Module) -> None:
        """Once, after the model is on its device and before the first step (after a resume's load)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (0-based) has updated ``model``."""

    def on_log(self, model: nn.Module, step: int, metrics: dict[str, float]) -> list[str]:
        """After the train metrics of ``step`` are logged (means since the last log line): warnings
        to show the user, one line each (e.g. a collapse the metrics show)."""
        return []

    def on_evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """After an evaluation at ``step`` (1-based count of steps done); extra metrics to log."""
        return {}

    def on_checkpoint(self, model: nn.Module, run_dir: Path, step: int) -> None:
        """On the main process, after the checkpoint of ``step`` is complete."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save with each checkpoint ({} for a stateless hook)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        """Restore what ``state_dict`` returned; ``None`` when the checkpoint has none for this hook."""


class CheckpointCallback(TrainerHook):
    """A function called after each checkpoint, e.g. writing a reconstruction or sample grid."""

    name = "checkpoint-callback"

    def __init__(self, fn: Callable[[nn.Module, Path, int], None]):
        self.fn = fn

    def on_checkpoint(self, model: nn.Module, run_dir: Path, step: int) -> None:
        self.fn(model, run_dir, step)


@dataclass
class EMAConfig:
    """An exponential moving average of the weights (DDPM §4 samples from one, decay 0.9999)."""

    decay: float = 0.9999  # weight of the old average per step; 0 disables the average
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) at update n, so early averages are not the init

    def __post_init__(self) -> None:
        if not (math.isfinite(self.decay) and 0.0 <= self.decay < 1.0):
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")


class EMA(TrainerHook):
    """Keeps ``shadow`` = EMA of the model's floating-point parameters and buffers.

    The average lives on the model's device in fp32; ``copy_to(model)`` loads it (for sampling),
    and the run's checkpoint carries it as ``ema.safetensors``.
    """

    name = "ema"

    def __init__(self, config: EMAConfig | None = None, publish: str | None = None):
        """``publish``: a file name in the run folder that receives the averaged weights, under the
        model's own keys, after every checkpoint (what sampling loads: the papers sample from the EMA)."""
        self.config = config or EMAConfig()
        self.publish = publish
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0

    def _tracked(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    def on_fit_start(self, model: nn.Module) -> None:
        tracked = self._tracked(model)
        if not self.shadow:
            self.shadow = {k: v.detach().float().clone() for k, v in tracked.items()}
        elif set(self.shadow) != set(tracked):
            from cvformers.loading import upgrade_keys

            # an average saved before the model's keys moved (Swin to timm's layout) is renamed as
            # its weights are when they load
            self.shadow = upgrade_keys(model, self.shadow)

    def current_decay(self) -> float:
        d = self.config.decay
        return min(d, (1 + self.updates) / (10 + self.updates)) if self.config.warmup else d

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        decay = self.current_decay()
        for k, v in self._tracked(model).items():
            self.shadow[k].lerp_(v.detach().float(), 1.0 - decay)
        self.updates += 1

    def on_checkpoint(self, model: nn.Module, run_dir: Path, step: int) -> None:
        if self.publish:
            from cvformers.loading import save_weights

            state = model.state_dict()
            averaged = {k: self.shadow[k].to(v.dtype) if k in self.shadow else v for k, v in state.items()}
            save_weights(averaged, Path(run_dir) / self.publish, metadata={"step": str(step), "ema_decay": str(self.config.decay)})

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        state = model.state_dict()
        model.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in self.shadow.items()}})
        return model

    def averaged(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the averaged weights."""
        return self.copy_to(copy.deepcopy(model))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"shadow.{k}": v for k, v in self.shadow.items()}, "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            return  # a checkpoint without an average: on_fit_start starts one from the weights
        self.updates = int(state["updates"])
        self.shadow = {k[len("shadow."):]: v.float().clone() for k, v in state.items() if k.startswith("shadow.")}
