"""The run folder on disk: weights, trainer state, config; and reading a finished run back.

A run folder (docs/design.md) holds

    config.toml          kind, [model], [train] and the task's extra tables
    model.safetensors    the latest checkpoint's weights (a hard link into checkpoints/), what
                         ``load_run`` reads (no pickle; shared/tied tensors stored once)
    checkpoints/latest   the name of the newest complete checkpoint folder
    checkpoints/step-00000500/
        model.safetensors    weights at that step
        trainer_state.pt     {"step", "optimizer", "rng", "data", "elapsed"} — plain tensors and
                             numbers, loadable with ``torch.load(weights_only=True)``
        *.safetensors        state owned by trainer hooks (an EMA of weights, a teacher)
    metrics.jsonl        one JSON object a line (train and eval)
    .lock                held by the one process that trains into the folder

A checkpoint is one unit: its folder is written completely under a temporary name, renamed,
and only then does ``checkpoints/latest`` switch to it (an atomic file replace); the previous
folder is deleted after the switch. A kill at any point leaves either the old checkpoint or
the new one as ``latest``, whole; leftovers of an interrupted save are removed by the next
save or resume. Folders written before this layout (``trainer_state.pt`` beside
``model.safetensors``) still resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cvformers.config import save_toml
from cvformers.errors import UserError
from cvformers.loading import load_weights, read_weights, save_weights
from cvformers.utils import atomic_save, atomic_write_bytes, fsync_dir

CONFIG = "config.toml"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
LOCK = ".lock"



# --- RNG --------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """Every RNG a training step may draw from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state(
        ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the run folder -------------------------------------------------------------------

def check_run_folder(run_dir: str | Path, resume: bool) -> None:
    """A new run never overwrites a checkpoint; a resume needs one."""
    if resume and not has_checkpoint(run_dir):
        raise UserError(f"--resume: no checkpoint in {run_dir} (no {CHECKPOINTS}/{LATEST} and no {STATE})")
    if not resume and has_checkpoint(run_dir):
        raise UserError(f"{run_dir} already holds a checkpoint; pass --resume to continue that run or choose another --out")


_HELD_LOCKS: dict[Path, int] = {}  # run folder -> open lock file descriptor of this process


class RunLock:
    """The run folder's ``.lock``, held (``flock``) while one process trains into it.

    A second ``cvformers train --out`` on the same folder is refused instead of writing its
    config beside the other run's weights. The lock is re-entrant within a process (the CLI
    takes it before the task builds its caches, the trainer again); the OS drops it when the
    process dies, so a killed run never leaves a stale lock.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).resolve()
        self.owner = False

    def __enter__(self) -> "RunLock":
        if self.run_dir in _HELD_LOCKS:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"{self.run_dir} is in use by another training process; "
                                "wait for it to finish or choose another --out") from e
            raise
        _HELD_LOCKS[self.run_dir] = fd
        self.owner = True
        return self

    def __exit__(self, *exc) -> None:
        if self.owner:
            os.close(_HELD_LOCKS.pop(self.run_dir))
            self.owner = False


def write_run_files(run_dir: str | Path, run_config: dict[str, Any], extra_files: dict[str, bytes]) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_toml(run_config, run_dir / CONFIG)
    for name, data in extra_files.items():
        atomic_write_bytes(run_dir / name, data)


def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(run_dir: str | Path, step: int) -> None:
    """On resume, drop the lines logged after the checkpoint's step (those steps run again) and
    any line a crash cut short (not JSON)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())


# --- checkpoints --------------------------------------------------------------------------

def _latest_dir(run_dir: Path) -> Path | None:
    """The folder ``checkpoints/latest`` names, or None in a folder without one."""
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    folder = run_dir / CHECKPOINTS / name
    if not name.startswith("step-") or "/" in name or not folder.is_dir():
        raise UserError(f"{pointer} names {name!r}, which is not a checkpoint folder; "
                        f"the run cannot be resumed (delete {pointer} to fall back to an older layout)")
    return folder


def checkpoint_dir(run_dir: str | Path) -> Path | None:
    """Where the newest complete checkpoint of ``run_dir`` lives (the run folder itself for the
    older flat layout), or None."""
    run_dir = Path(run_dir)
    latest = _latest_dir(run_dir)
    if latest is not None:
        return latest
    return run_dir if (run_dir / STATE).is_file() else None


def has_checkpoint(run_dir: str | Path) -> bool:
    return checkpoint_dir(run_dir) is not None


def _link_or_copy(src: Path, dst: Path) -> None:
    """Replace ``dst`` by a hard link to ``src`` (a copy where links are not possible), atomically."""
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link.tmp"
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        atomic_save(dst, lambda t: shutil.copyfile(src, t))
        return
    os.replace(tmp, dst)


def remove_stale(run_dir: str | Path) -> None:
    """Delete what interrupted saves leave: temporary files and folders, checkpoint folders
    that are not ``latest``. Never touches the latest checkpoint."""
    run_dir = Path(run_dir)
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return
    latest = _latest_dir(run_dir)
    for entry in folder.iterdir():
        if entry == latest or entry.name == LATEST:
            continue
        if entry.is_dir() and (entry.name.startswith("step-") or entry.name.startswith(".step-")):
            shutil.rmtree(entry)
        elif entry.name.startswith(".") and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)


def save_checkpoint(run_dir: str | Path, model: nn.Module, trainer_state: dict[str, Any],
                    hook_state: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the checkpoint of ``trainer_state["step"]`` as one unit; return its folder.

    ``hook_state`` maps a file stem to tensors a trainer hook owns (``{"ema": {...}}`` is
    written as ``ema.safetensors``). Order: complete folder under a temporary name -> rename ->
    switch ``latest`` -> link ``model.safetensors`` at the top -> delete the previous folder.
    """
    run_dir = Path(run_dir)
    step = int(trainer_state["step"])
    folder = run_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    if final.exists():
        if final == _latest_dir(run_dir):
            raise RuntimeError(f"checkpoint {final} is already the latest; a step is saved once")
        shutil.rmtree(final)  # the rest of a save that was interrupted before the switch
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".step-{step:08d}.", suffix=".tmp"))
    save_weights(model, tmp / WEIGHTS, metadata={"step": str(step)})
    atomic_save(tmp / STATE, lambda t: torch.save(trainer_state, t))
    for stem, tensors in (hook_state or {}).items():
        save_weights(tensors, tmp / f"{stem}.safetensors", metadata={"step": str(step)})
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(folder)
    atomic_write_bytes(folder / LATEST, final.name.encode() + b"\n")
    fsync_dir(folder)
    _link_or_copy(final / WEIGHTS, run_dir / WEIGHTS)
    if (run_dir / STATE).is_file():  # a flat-layout state would now be stale
        (run_dir / STATE).unlink()
    remove_stale(run_dir)
    return final


def _valid_state(state: Any) -> bool:
    return (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 0
            and isinstance(state.get("optimizer"), dict) and isinstance(state.get("rng"), list))


def load_trainer_state(run_dir: str | Path) -> dict[str, Any]:
    where = checkpoint_dir(run_dir)
    if where is None:
        raise UserError(f"no checkpoint to resume in {run_dir}")
    path = where / STATE
    if not path.is_file():
        raise UserError(f"{where} is not a complete checkpoint: {STATE} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read the trainer state ({e})") from e
    if not _valid_state(state):
        raise UserError(f"{path} is not a cvformers trainer state (it needs step, optimizer and rng); "
                        "the run cannot be resumed")
    return state


def load_checkpoint(run_dir: str | Path, model: nn.Module) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Load the latest checkpoint's weights into ``model``; return (trainer state, hook state).

    Checks that the weights and the state belong together, and re-links the top-level
    ``model.safetensors`` if a kill came between the switch of ``latest`` and the link.
    """
    run_dir = Path(run_dir)
    state = load_trainer_state(run_dir)
    where = checkpoint_dir(run_dir)
    meta = load_weights(model, where / WEIGHTS)
    if "step" in meta and int(meta["step"]) != int(state["step"]):
        raise UserError(
            f"{where}: {WEIGHTS} is from step {meta['step']} but {STATE} from step {state['step']} "
            "(the run was stopped while saving); this checkpoint cannot be resumed exactly"
        )
    hooks = {}
    if where != run_dir:
        for f in sorted(where.glob("*.safetensors")):
            if f.name != WEIGHTS:
                hooks[f.stem] = read_weights(f)[0]
        top = run_dir / WEIGHTS
        if not top.is_file() or not os.path.samefile(top, where / WEIGHTS):
            _link_or_copy(where / WEIGHTS, top)
    return state, hooks


def align_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer, run: Path) -> dict[str, Any]:
    """A checkpoint's optimizer state dict, renumbered so that each parameter's moments reach the
    parameter of the same name in ``optimizer`` (whose groups carry "names", see ``param_groups``).

    PyTorch numbers an optimizer's parameters by position; a model that registers its parameters
    in another order than the one that wrote the checkpoint would silently pair moments with the
    wrong tensors (or fail at the first step when their shapes differ). A checkpoint without names
    (written before they were saved) is taken as it is when every moment has its parameter's shape,
    and refused in one line otherwise."""
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups", [])
    if len(groups) != len(saved_groups):
        raise UserError(f"{run}: the checkpoint's optimizer has {len(saved_groups)} parameter groups, this model "
                        f"{len(groups)}; it was written for another model")
    if not all("names" in g for g in groups) or not all("names" in g for g in saved_groups):
        for group, saved_group in zip(groups, saved_groups):
            for p, index in zip(group["params"], saved_group["params"]):
                moments = saved["state"].get(index, {})
                if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape for v in moments.values()):
                    raise UserError(f"{run}: the checkpoint's optimizer state pairs its moments with parameters by "
                                    "position, and this model orders its parameters differently (written by an "
                                    "older cvformers); its weights load, its optimizer state does not")
        return saved
    state, new_groups, next_index = {}, [], 0
    for group, saved_group in zip(groups, saved_groups):
        by_name = dict(zip(saved_group["names"], saved_group["params"]))
        missing = [name for name in group["names"] if name not in by_name]
        if missing or len(by_name) != len(group["names"]):
            raise UserError(f"{run}: the checkpoint's optimizer state does not name the same parameters as this "
                            f"model ({'missing ' + missing[0] if missing else 'extra parameters'})")
        indices = []
        for name in group["names"]:
            if by_name[name] in saved["state"]:
                state[next_index] = saved["state"][by_name[name]]
            indices.append(next_index)
            next_index += 1
        new_groups.append({**saved_group, "params": indices, "names": list(group["names"])})
    return {"state": state, "param_groups": new_groups}
