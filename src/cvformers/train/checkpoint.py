"""The run folder on disk: weights, trainer state, config; and reading a finished run back.

A run folder (DESIGN.md) holds

    config.toml          kind, [model], [train] and the task's extra tables
    model.safetensors    the model's weights (no pickle; shared/tied tensors stored once)
    trainer_state.pt     {"step", "optimizer", "rng", "data", "elapsed"} — plain tensors and
                         numbers, loadable with ``torch.load(weights_only=True)``
    metrics.jsonl        one JSON object a line (train and eval)

Every file is written to a temporary name and renamed over the old one, so a crash while
saving leaves the previous checkpoint whole. Both checkpoint files carry the step; a resume
refuses a pair whose steps disagree.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cvformers.config import load_toml, save_toml
from cvformers.errors import UserError
from cvformers.utils import atomic_save, atomic_write_bytes

CONFIG = "config.toml"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"

_ALIASES = "cvformers.aliases"  # safetensors metadata key: {dropped name: stored name}


# --- weights ------------------------------------------------------------------------------

def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def save_weights(
    model: nn.Module | dict[str, torch.Tensor],
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a state dict as safetensors, atomically.

    Tied weights (two names, one tensor — e.g. an embedding shared with the output layer)
    are stored once and the other name is recorded in the metadata, so ``load_weights``
    restores both. ``dtype`` (e.g. ``torch.float16`` for a shipped bundle) casts the
    floating-point tensors; integer buffers keep their type.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    stored: dict[str, torch.Tensor] = {}
    first_name: dict[Any, str] = {}
    aliases: dict[str, str] = {}
    seen_storage: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        if t.numel() > 0:
            key = _storage_key(t)
            if key in first_name:
                aliases[name] = first_name[key]
                continue
            first_name[key] = name
        shares = t.numel() > 0 and t.untyped_storage().data_ptr() in seen_storage
        if t.numel() > 0:
            seen_storage.add(t.untyped_storage().data_ptr())
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        if shares:  # a view into a tensor already stored: safetensors wants its own memory
            t = t.clone()
        stored[name] = t
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta[_ALIASES] = json.dumps(aliases, sort_keys=True)
    path = Path(path)
    atomic_save(path, lambda tmp: save_file(stored, tmp, metadata=meta))
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with tied names restored, metadata) from a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                state[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    for alias, name in json.loads(meta.get(_ALIASES, "{}")).items():
        state[alias] = state[name]
    return state, meta


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> dict[str, str]:
    """Load ``path`` into ``model`` (cast to each parameter's own dtype); return the metadata.

    ``strict``: every key of the model must be in the file and nothing else; a mismatch is a
    ``UserError`` naming the file and the first keys that differ.
    """
    state, meta = read_weights(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        raise UserError(
            f"{path}: weights do not match the model "
            f"(missing: {missing[:5]}{' …' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{' …' if len(unexpected) > 5 else ''})"
        )
    for k, t in state.items():
        if k in expected and tuple(t.shape) != tuple(expected[k].shape):
            raise UserError(f"{path}: {k} has shape {tuple(t.shape)}, the model wants {tuple(expected[k].shape)}")
    cast = {k: t.to(expected[k].dtype) if t.is_floating_point() else t for k, t in state.items() if k in expected}
    model.load_state_dict(cast, strict=strict)
    return meta


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
        raise UserError(f"--resume: no checkpoint in {run_dir} ({STATE} is missing)")
    if not resume and has_checkpoint(run_dir):
        raise UserError(f"{run_dir} already holds a checkpoint; pass --resume to continue that run or choose another --out")


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
    """On resume, drop the lines logged after the checkpoint's step: those steps run again."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())


# --- trainer state ----------------------------------------------------------------------

def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / STATE).is_file()


def save_checkpoint(run_dir: str | Path, model: nn.Module, trainer_state: dict[str, Any]) -> None:
    """Weights first, trainer state last: ``trainer_state.pt`` marks a complete checkpoint."""
    run_dir = Path(run_dir)
    step = int(trainer_state["step"])
    save_weights(model, run_dir / WEIGHTS, metadata={"step": str(step)})
    atomic_save(run_dir / STATE, lambda tmp: torch.save(trainer_state, tmp))


def load_trainer_state(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise UserError(f"no checkpoint to resume in {run_dir}: {STATE} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read the trainer state ({e})") from e


def load_checkpoint(run_dir: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load the weights into ``model`` and return the trainer state; check they belong together."""
    run_dir = Path(run_dir)
    state = load_trainer_state(run_dir)
    meta = load_weights(model, run_dir / WEIGHTS)
    if "step" in meta and int(meta["step"]) != int(state["step"]):
        raise UserError(
            f"{run_dir}: {WEIGHTS} is from step {meta['step']} but {STATE} from step {state['step']} "
            "(the run was stopped while saving); this checkpoint cannot be resumed exactly"
        )
    return state


# --- reading a run back -----------------------------------------------------------------

def load_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A trained model from its run folder, in eval mode, and the run's config as a dict.

    Reads ``config.toml`` (``kind`` + ``[model]``), rebuilds the module with
    ``cvformers.registry.build_model`` and loads ``model.safetensors`` strictly. Nothing is
    unpickled.
    """
    from cvformers.registry import build_model

    run_dir = Path(path)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    for name in (CONFIG, WEIGHTS):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir} is not a finished run: {name} is missing")
    cfg = load_toml(run_dir / CONFIG)
    if "kind" not in cfg:
        raise UserError(f"{run_dir / CONFIG} has no 'kind' (which model to build)")
    model = build_model(cfg["kind"], cfg.get("model", {}))
    load_weights(model, run_dir / WEIGHTS)
    return model.to(device).eval(), cfg
