"""What the trainer does at step ``s``, as pure functions of ``s``: the learning rate and the data.

Because nothing here keeps hidden state, a run resumed at step ``s`` sees exactly the
learning rate and the batches that an uninterrupted run would have seen at ``s``.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup rises linearly to ``lr`` over the first ``warmup_steps`` steps (step 0 already gets
    ``lr / warmup_steps``, never 0, so no step is wasted); the cosine then falls from ``lr`` to
    ``lr * min_lr_ratio`` and reaches it at the last step, ``total_steps - 1``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class EpochBatchSampler(Sampler[list[int]]):
    """The micro-batches of one epoch for one process, starting at a given optimizer step.

    The epoch's order is ``torch.randperm(n)`` drawn from a generator seeded with
    ``seed + epoch``: the same on every process and in every resumed run. The permutation is
    cut into optimizer steps of ``world_size * batch_size * grad_accum`` items (the tail that
    does not fill a step is dropped, so every process sees the same number of batches); step
    ``k`` takes ``perm[k*G : (k+1)*G]``, its micro-batch ``m`` is the next
    ``world_size * batch_size`` items, and process ``r`` takes its ``r``-th ``batch_size`` slice.
    So one process with ``batch_size * world_size * grad_accum`` sees exactly the items that
    the sharded, accumulated run sees in one step — which is what makes them comparable.
    """

    def __init__(
        self,
        num_items: int,
        *,
        batch_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ):
        self.num_items, self.batch_size, self.grad_accum = num_items, batch_size, grad_accum
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.start_step = start_step
        self.steps = steps_per_epoch(num_items, batch_size * grad_accum * world_size)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed((self.seed + self.epoch) % 2**63)
        perm = torch.randperm(self.num_items, generator=g).tolist()
        per_micro = self.batch_size * self.world_size
        per_step = per_micro * self.grad_accum
        for step in range(self.start_step, self.steps):
            for micro in range(self.grad_accum):
                start = step * per_step + micro * per_micro + self.rank * self.batch_size
                yield perm[start : start + self.batch_size]


def steps_per_epoch(num_items: int, items_per_step: int) -> int:
    steps = num_items // items_per_step
    if steps == 0:
        from cvformers.errors import UserError

        raise UserError(
            f"the dataset has {num_items} items, fewer than one optimizer step needs "
            f"({items_per_step} = processes x batch_size x grad_accum); lower --batch-size"
        )
    return steps
