"""fp16 training as DALL-E was trained: a gradient scale per resblock, and skipped steps.

DALL-E (Ramesh et al. 2021, arXiv:2102.12092, §2.4, Figure 4 and appendix D) trained its 12-billion
parameter transformer in fp16. One loss scale for the whole model did not work: the activation
gradients' norms differ by orders of magnitude from block to block, so a scale that keeps one
block's gradients from underflowing makes another's overflow. It keeps a separate scale per
resblock instead. Each scale starts at M x 2^13 (M data-parallel processes), grows by 2^(1/1000)
after every step in which its block's gradients are finite, and is divided by sqrt(2) when they
are not; a step with any non-finite gradient is skipped (no optimizer update) and counted.

How the scales act (``PerBlockGradScaler``): the loss is multiplied by the *root* scale, which
covers every parameter outside the blocks (embeddings, heads). Around each block an identity
function rescales the gradient in backward: on the way into the block (at its output) from the
root scale to the block's scale, on the way out (at its input) back to the root scale. Every
parameter gradient is thus multiplied by its own group's scale, whatever the wiring between blocks
(residual streams, skips), and ``unscale`` divides it out group by group. Outside the blocks the
residual stream stays in fp32 under autocast, so its gradients do not underflow at the root scale;
inside a block (fp16 matmuls) the block's own scale keeps them in range.

It is a trainer hook, so the scales and the count of skipped steps are checkpointed and resumed
with the run. ``[train] amp = "fp16"`` turns it on for CUDA runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cvformers.train.hooks import TrainerHook


@dataclass
class GradScaleConfig:
    """Per-resblock gradient scaling; the defaults are DALL-E's (§2.4)."""

    init_scale: float = 2.0**13  # starting scale of every group, multiplied by the number of processes
    growth: float = 2.0 ** (1 / 1000)  # factor after a step with finite gradients in the group
    backoff: float = 2.0**-0.5  # factor after a step with inf/nan in the group's gradients
    min_scale: float = 2.0**7  # lower clamp (times the number of processes)
    max_scale: float = 2.0**24  # upper clamp (times the number of processes)

    def __post_init__(self) -> None:
        if not (0 < self.backoff < 1 <= self.growth and 0 < self.min_scale <= self.init_scale <= self.max_scale):
            raise ValueError("grad scaling needs 0 < backoff < 1 <= growth and min_scale <= init_scale <= max_scale")


class _Rescale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scales[to] / scales[frm]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: torch.Tensor, to: int, frm: int) -> torch.Tensor:
        ctx.factor = float(scales[to] / scales[frm])  # read at forward time: the scales of this step
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # in fp32, so a factor above fp16's range cannot overflow before the cast back
        return (grad.float() * ctx.factor).to(grad.dtype), None, None, None


def _rescale_tensors(value: Any, scales: torch.Tensor, to: int, frm: int) -> Any:
    if isinstance(value, torch.Tensor):
        return _Rescale.apply(value, scales, to, frm) if value.requires_grad and value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_rescale_tensors(v, scales, to, frm) for v in value)
    if isinstance(value, list):
        return [_rescale_tensors(v, scales, to, frm) for v in value]
    if isinstance(value, dict):
        return {k: _rescale_tensors(v, scales, to, frm) for k, v in value.items()}
    return value


class PerBlockGradScaler(TrainerHook):
    """Group 0 is the root (parameters outside ``blocks``), group i + 1 is ``blocks[i]``."""

    name = "grad_scales"

    def __init__(self, model: nn.Module, blocks: list[nn.Module], cfg: GradScaleConfig | None = None,
                 world_size: int = 1):
        self.cfg = cfg or GradScaleConfig()
        self.world_size = world_size
        self.scales = torch.full((len(blocks) + 1,), self.cfg.init_scale * world_size, dtype=torch.float64)
        self.skipped = 0  # optimizer steps skipped for non-finite gradients
        self.last_bad: list[int] = []  # the groups with inf/nan gradients in the last unscale
        in_block = set()
        self.groups: list[list[nn.Parameter]] = [[]]
        for block in blocks:
            params = [p for p in block.parameters() if p.requires_grad]
            in_block.update(id(p) for p in params)
            self.groups.append(params)
        self.groups[0] = [p for p in model.parameters() if p.requires_grad and id(p) not in in_block]
        self._handles = []
        for i, block in enumerate(blocks, start=1):
            # leaving the block backwards (its input): block scale -> root; entering it (its output): root -> block
            self._handles.append(block.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: (_rescale_tensors(args, self.scales, 0, i),
                                                _rescale_tensors(kwargs, self.scales, 0, i)), with_kwargs=True))
            self._handles.append(block.register_forward_hook(
                lambda mod, args, out, i=i: _rescale_tensors(out, self.scales, i, 0)))

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * float(self.scales[0])

    @torch.no_grad()
    def unscale(self) -> bool:
        """Divide each group's gradients by its scale; True when every gradient is finite."""
        self.last_bad = []
        for g, params in enumerate(self.groups):
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            inv = 1.0 / float(self.scales[g])
            finite = True
            for grad in grads:
                grad.mul_(inv)
                finite = finite and bool(torch.isfinite(grad).all())
            if not finite:
                self.last_bad.append(g)
        return not self.last_bad

    def update(self) -> None:
        """After a step: groups with inf/nan back off, the others grow; within the clamps."""
        cfg, m = self.cfg, self.world_size
        for g in range(len(self.scales)):
            factor = cfg.backoff if g in self.last_bad else cfg.growth
            self.scales[g] = min(max(float(self.scales[g]) * factor, cfg.min_scale * m), cfg.max_scale * m)

    def step(self, optimizer: torch.optim.Optimizer, before_step=None) -> bool:
        """Unscale, then step ``optimizer`` unless a gradient is not finite (the step is then skipped
        and counted); update the scales. ``before_step()`` (clipping) runs only for a real step."""
        ok = self.unscale()
        if ok:
            if before_step is not None:
                before_step()
            optimizer.step()
        else:
            self.skipped += 1
        self.update()
        return ok

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scales": self.scales.clone(), "skipped": torch.tensor(self.skipped, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            return
        if state["scales"].shape != self.scales.shape:
            raise ValueError(f"grad_scales: the checkpoint has {len(state['scales'])} scales, this model "
                             f"{len(self.scales)}")
        self.scales = state["scales"].to(torch.float64).clone()
        self.skipped = int(state["skipped"])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

