"""Sharded checkpoints of FSDP runs with ``torch.distributed.checkpoint`` (DCP), and their export.

An FSDP run's checkpoint folder holds, instead of one ``model.safetensors``,

    checkpoints/step-00000500/
        dcp/                 DCP files: each process writes its own shards of {"model", "optim"}
                             (``__<rank>_0.distcp``) and rank 0 the ``.metadata`` that maps them
        trainer_state.pt     step, RNG per process, data position, elapsed (weights_only-loadable);
                             "sharded": true and an empty "optimizer" (the optimizer lives in dcp/)

It is written as one unit, like every checkpoint (``checkpoint.py``): all processes write into one
temporary folder (the run folder must be on a file system they share), rank 0 then adds the
trainer state, renames the folder and switches ``checkpoints/latest``. DCP stores tensors with
their global shapes and offsets, so a checkpoint loads into any number of processes, sharded or
not (https://pytorch.org/docs/stable/distributed.checkpoint.html): a 2-process run resumes in 1
process or in 8. Loading reads plain tensors (no pickled code runs; DCP's ``.metadata`` is read
with its own loader, which PyTorch restricts to its checkpoint classes).

``export_weights`` turns the latest one into the ordinary ``model.safetensors`` that ``generate``,
``bundle`` and ``load_run`` read, in one process (``cvformers export RUN``); the trainer also writes
it at the end of a run, gathered from all processes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvformers.errors import UserError
from cvformers.loading import save_weights
from cvformers.train import checkpoint as ckpt
from cvformers.train import distributed
from cvformers.utils import atomic_save, atomic_write_bytes, fsync_dir

DCP_DIR = "dcp"


def is_sharded(folder: Path | None) -> bool:
    return folder is not None and (folder / DCP_DIR).is_dir()


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_sharded(run_dir: str | Path, model: nn.Module, optimizer, trainer_state: dict[str, Any],
                 info: distributed.DistInfo) -> None:
    """Every process calls this; the checkpoint of ``trainer_state["step"]`` switches in as one unit."""
    import torch.distributed.checkpoint as dcp

    run_dir = Path(run_dir)
    step = int(trainer_state["step"])
    folder = run_dir / ckpt.CHECKPOINTS
    tmp_name = None
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        tmp_name = tempfile.mkdtemp(dir=folder, prefix=f".step-{step:08d}.", suffix=".tmp")
    tmp = Path(distributed.broadcast_object(tmp_name, info))
    dcp.save(_states(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))  # collective; rank 0 writes .metadata last
    if info.is_main:
        final = folder / f"step-{step:08d}"
        if final.exists():
            shutil.rmtree(final)  # the rest of a save interrupted before the switch
        atomic_save(tmp / ckpt.STATE, lambda t: torch.save({**trainer_state, "optimizer": {}, "sharded": True}, t))
        for path in (tmp / DCP_DIR, tmp):
            fsync_dir(path)
        os.rename(tmp, final)
        fsync_dir(folder)
        atomic_write_bytes(folder / ckpt.LATEST, final.name.encode() + b"\n")
        fsync_dir(folder)
        ckpt.remove_stale(run_dir)
    distributed.barrier(info)


def load_sharded(where: Path, model: nn.Module, optimizer=None) -> None:
    """Load ``where/dcp`` into ``model`` (and ``optimizer``), resharding to however they are laid out now."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _states(model, optimizer)
    single = not torch.distributed.is_initialized()
    try:
        with warnings.catch_warnings():
            # one process without a process group (export, a resume on one machine) is what is meant here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(where / DCP_DIR), no_dist=single)
    except Exception as e:  # DCP raises CheckpointException with every rank's error
        raise UserError(f"{where}: the sharded checkpoint does not fit this model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def gather_full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on rank 0, on CPU; every process must call it ({} on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_weights(run_dir: str | Path) -> Path:
    """Write ``RUN/model.safetensors`` from the latest sharded checkpoint, in this one process."""
    from cvformers.config import load_toml
    from cvformers.registry import build_model

    run_dir = Path(run_dir)
    where = ckpt.checkpoint_dir(run_dir)
    if where is None:
        raise UserError(f"no checkpoint in {run_dir}")
    if not is_sharded(where):
        raise UserError(f"{where} is not a sharded checkpoint; {run_dir / ckpt.WEIGHTS} already holds its weights")
    if not (run_dir / ckpt.CONFIG).is_file():
        raise UserError(f"{run_dir / ckpt.CONFIG} is missing: the model cannot be rebuilt")
    cfg = load_toml(run_dir / ckpt.CONFIG)
    model = build_model(cfg["kind"], cfg.get("model", {}))
    load_sharded(where, model)
    step = ckpt.load_trainer_state(run_dir)["step"]
    return save_weights(model, run_dir / ckpt.WEIGHTS, metadata={"step": str(step)})
