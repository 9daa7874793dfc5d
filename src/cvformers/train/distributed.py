"""Running the same training command under ``torchrun``: process group, device, DDP.

One process needs none of this: ``setup()`` returns rank 0 of 1 and the trainer uses the
model as it is. Under ``torchrun`` (which sets RANK / WORLD_SIZE / LOCAL_RANK) it joins the
process group — gloo on CPU, nccl on CUDA — and the trainer wraps the model in
``DistributedDataParallel``, which averages gradients across processes during backward.
Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def elastic_restart() -> bool:
    """True in workers that ``torchrun --max-restarts N`` started again after a worker failed: they
    should resume from the run's last checkpoint rather than start over (torchelastic sets
    TORCHELASTIC_RESTART_COUNT, https://pytorch.org/docs/stable/elastic/run.html)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def setup(device: str | torch.device | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun; pick this process's device.

    ``device``: "cpu", "cuda", "cuda:1" … or None (cuda when available). Under torchrun a
    CUDA device becomes ``cuda:LOCAL_RANK``.
    """
    wanted = torch.device(device) if device is not None else None
    if wanted is None:
        wanted = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.type == "cuda" and not torch.cuda.is_available():
        from cvformers.errors import UserError

        raise UserError("--device cuda was asked for but torch sees no CUDA device")
    if not launched_by_torchrun():
        return DistInfo(), wanted
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if wanted.type == "cuda":
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if wanted.type == "cuda" else "gloo"
        store = _restart_store(world_size)
        if store is not None:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend)
        created = True
    return DistInfo(rank, world_size, local_rank, created), wanted


def _restart_store(world_size: int):
    """After an elastic restart, the agent's key-value store under a prefix of its own, or None.

    The workers of a restart meet in the same store as the attempt before; without a fresh prefix
    a restarted worker may read the connection address a dead worker published and fail to
    connect (seen with gloo: "connectFullMesh failed ... Connection refused").
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart in ("", "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"/cvformers/restart-{restart}", store)


def teardown(info: DistInfo) -> None:
    if info.created_group and dist.is_initialized():
        # A DDP wrapper sits in reference cycles, so it can outlive the training frame and have its
        # reducer freed by a later GC pass against a destroyed gloo group (a suspect for the rare
        # worker abort at exit seen on a loaded machine): collect it while the group still exists.
        import gc

        gc.collect()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap_ddp(
    module: torch.nn.Module,
    info: DistInfo,
    device: torch.device,
    find_unused: bool = False,
    powersgd: tuple[int, int] | None = None,
):
    """DDP around ``module`` (the module itself in a single process).

    ``powersgd=(rank, start_step)`` replaces the gradient all-reduce with PowerSGD low-rank
    compression (Vogels et al. 2019) after ``start_step`` plain steps, with error feedback.
    Its error-feedback memory is not checkpointed, so a resumed PowerSGD run is close to, not
    bit-identical with, an uninterrupted one.
    """
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)
    if powersgd is not None:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        rank, start = powersgd
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=max(2, start)
        )
        ddp.register_comm_hook(state, _powersgd_with_scalars)
    return ddp


def _powersgd_with_scalars(state, bucket):
    """torch's PowerSGD hook, except for a bucket holding a 0-dim gradient (CLIP's temperature):
    the hook views every gradient as a matrix and fails on those, so such a bucket is all-reduced
    whole. The step counter that starts compression moves on as the hook would move it."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if any(grad.dim() == 0 for grad in bucket.gradients()):
        state.maybe_increase_iter(bucket)
        return default_hooks.allreduce_hook(state.process_group, bucket)
    return powerSGD_hook.powerSGD_hook(state, bucket)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` in rank order (one-element list in a single process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. an error found only by rank 0)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
