"""The DINO teacher and the collapse monitor: trainer hooks (Caron et al. 2021, §3.1, Algorithm 1).

``DINOTeacher`` owns what DINO trains beside the student's weights:

- the teacher network, an exponential moving average of the student, θt ← λ θt + (1 - λ) θs
  after every step, with λ following a cosine schedule from 0.996 to 1 over the run (§3.1
  "Teacher network"); it is the network evaluated (k-NN, attention, transfer), as in the paper;
- the centre c, an EMA of the teacher's batch-mean output, c ← m c + (1 - m) mean(gθt(x)),
  with its own momentum m = 0.9 (eq. 4), subtracted from the teacher's output;
- the teacher temperature τt, warmed up linearly from 0.04 to 0.07 (§3.1 / appendix: "a
  linear warm-up from 0.04 to 0.07 during the first 30 epochs"), sharpening the teacher.

Its state (teacher weights, centre, update count) is written into each checkpoint folder as
``teacher.safetensors`` and restored on ``--resume``, so a resumed run continues bit-exactly;
after each checkpoint the teacher's weights are also published in the run folder as
``teacher.safetensors`` (the DINO model's keys), which evaluation loads.

``CollapseMonitor`` reads the two measures of §5.3 / Fig. 7 that the loss logs — the teacher's
output entropy and the KL divergence from teacher to student — and says in plain words when
they show one of the two collapses: a uniform output (entropy near log K) or one dimension
taking over (entropy near 0), both with the KL falling to 0 (the student copies the teacher
whatever the image, so the loss stops carrying information).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cvformers.config import ConfigError
from cvformers.loading import TEACHER_WEIGHTS
from cvformers.train.hooks import TrainerHook


@dataclass
class TeacherConfig:
    """The ``[teacher]`` table of a dino run."""

    momentum: float = 0.996  # λ at the first step; a cosine schedule takes it to momentum_end (§3.1)
    momentum_end: float = 1.0  # λ at the last step
    center_momentum: float = 0.9  # m of the centre's EMA (eq. 4)
    temp: float = 0.07  # τt after the warm-up
    warmup_temp: float = 0.04  # τt at the first step, raised linearly to temp
    warmup_temp_steps: int = -1  # steps of the temperature warm-up (-1: 30% of the run, the paper's 30 of 100 epochs)

    def __post_init__(self) -> None:
        for name in ("momentum", "momentum_end", "center_momentum"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"teacher.{name} must be in [0, 1], got {v}")
        for name in ("temp", "warmup_temp"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"teacher.{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_temp_steps < -1:
            raise ConfigError(f"teacher.warmup_temp_steps must be >= 0 (or -1), got {self.warmup_temp_steps}")


def cosine_schedule(start: float, end: float, step: int, total: int) -> float:
    """The official code's cosine_scheduler: ``start`` at step 0, ``end`` at step ``total``."""
    t = min(max(step, 0), total) / max(total, 1)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


class DINOTeacher(TrainerHook):
    """Teacher network, centre and schedules of DINO; the student's ``loss`` calls ``targets``."""

    name = "teacher"

    def __init__(self, config: TeacherConfig, total_steps: int, out_dim: int, publish: bool = True):
        self.config = config
        self.total_steps = total_steps
        self.publish = publish
        self.teacher: nn.Module | None = None
        self.center = torch.zeros(1, out_dim)
        self.updates = 0  # steps done, which set the schedules
        self._batch_mean: torch.Tensor | None = None  # this step's teacher mean output, for the centre
        self._loaded: dict[str, torch.Tensor] | None = None

    # --- schedules ---------------------------------------------------------------------
    def momentum(self, step: int) -> float:
        return cosine_schedule(self.config.momentum, self.config.momentum_end, step, self.total_steps)

    def temperature(self, step: int) -> float:
        c = self.config
        warmup = c.warmup_temp_steps if c.warmup_temp_steps >= 0 else round(0.3 * self.total_steps)
        if warmup == 0 or step >= warmup:
            return c.temp
        return c.warmup_temp + (c.temp - c.warmup_temp) * step / warmup

    # --- the trainer's calls -------------------------------------------------------------
    def on_fit_start(self, model: nn.Module) -> None:
        if self.teacher is None:
            model.attach_teacher(None)  # copy the network, not the hook it points to
            self.teacher = copy.deepcopy(model)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            if self._loaded is not None:
                weights = {k[len("teacher."):]: v for k, v in self._loaded.items() if k.startswith("teacher.")}
                self.teacher.load_state_dict(weights)
        self.teacher.eval()  # no dropout / drop path in the teacher (the official teacher has none)
        self.center = self.center.to(next(model.parameters()).device)
        model.attach_teacher(self)

    @torch.no_grad()
    def targets(self, global_views: list[torch.Tensor], training: bool = True) -> list[torch.Tensor]:
        """Algorithm 1: softmax((gθt(x) - c) / τt) of each global view, [B, K] each. In training,
        the views' mean output is kept for the centre update after the step."""
        logits = self.teacher.forward_views(global_views)
        if training:
            mean = torch.cat(logits).mean(dim=0, keepdim=True)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(mean)  # under torchrun: the mean over every process's batch
                mean /= torch.distributed.get_world_size()
            self._batch_mean = mean
        tau = self.temperature(self.updates)
        return [((t - self.center) / tau).softmax(dim=-1) for t in logits]

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Algorithm 1, after the student's update: the teacher's EMA, then the centre's."""
        lam = self.momentum(step)
        for p_t, p_s in zip(self.teacher.parameters(), model.parameters()):
            p_t.mul_(lam).add_(p_s.detach(), alpha=1 - lam)
        if self._batch_mean is not None:
            m = self.config.center_momentum
            self.center.mul_(m).add_(self._batch_mean, alpha=1 - m)
            self._batch_mean = None
        self.updates = step + 1

    def on_checkpoint(self, model: nn.Module, run_dir: Path, step: int) -> None:
        if self.publish:
            from cvformers.loading import save_weights

            save_weights(self.teacher, Path(run_dir) / TEACHER_WEIGHTS,
                         metadata={"step": str(step), "what": "DINO teacher (EMA of the student)"})

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()} if self.teacher is not None else {}
        return {**state, "center": self.center, "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            return  # a checkpoint without a teacher: on_fit_start copies the student
        self.updates = int(state["updates"])
        self.center = state["center"].clone()
        self._loaded = state
        if self.teacher is not None:
            self.teacher.load_state_dict({k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")})


@dataclass
class CollapseConfig:
    """When ``CollapseMonitor`` speaks (the ``[collapse]`` table of a dino run)."""

    uniform_entropy: float = 0.9  # teacher entropy at or above this fraction of log K: uniform collapse
    peaked_entropy: float = 0.02  # teacher entropy at or below this fraction of log K: one dimension dominates
    kl_floor: float = 1e-3  # KL(teacher || student) in nats below which the student copies the teacher
    after_steps: int = 0  # say nothing before this step (an untrained network can look collapsed)


class CollapseMonitor(TrainerHook):
    """Warns when the logged teacher entropy / KL show a collapse (§5.3, Fig. 7)."""

    name = "collapse-monitor"

    def __init__(self, out_dim: int, config: CollapseConfig | None = None):
        self.config = config or CollapseConfig()
        self.max_entropy = math.log(out_dim)
        self.active: set[str] = set()

    def diagnose(self, metrics: dict[str, float]) -> list[tuple[str, str]]:
        """(kind, plain-words message) of each collapse the metrics show."""
        c = self.config
        found = []
        h, kl = metrics.get("teacher_entropy"), metrics.get("kl")
        if h is not None and h >= c.uniform_entropy * self.max_entropy:
            found.append(("uniform", (
                f"collapse: the teacher's output is nearly uniform (entropy {h:.3f} of at most log K = "
                f"{self.max_entropy:.3f}), so it says nothing about the image; sharpen more (lower "
                "teacher.temp / teacher.warmup_temp) or centre less (raise teacher.center_momentum)")))
        if h is not None and h <= c.peaked_entropy * self.max_entropy:
            found.append(("peaked", (
                f"collapse: one output dimension dominates the teacher (entropy {h:.3f} of log K = "
                f"{self.max_entropy:.3f}), whatever the image; centre more (lower teacher.center_momentum) "
                "or sharpen less (raise teacher.temp)")))
        if kl is not None and kl < c.kl_floor:
            found.append(("copy", (
                f"collapse: the student matches the teacher exactly (KL {kl:.2e} nats), so the loss "
                "teaches nothing; this follows either collapse (check the entropy), or a learning rate too low to move")))
        return found

    def on_log(self, model: nn.Module, step: int, metrics: dict[str, float]) -> list[str]:
        if step < self.config.after_steps:
            return []
        found = self.diagnose(metrics)
        kinds = {kind for kind, _ in found}
        lines = [f"step {step}: {msg}" for kind, msg in found if kind not in self.active]  # once per episode
        self.active = kinds
        return lines
