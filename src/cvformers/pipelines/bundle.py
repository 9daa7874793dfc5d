"""Export trained runs as one self-contained model folder (the shipped ``default`` is one).

A bundle has the layout ``TextToImage.load`` reads (see ``pipelines/text_to_image.py``):
the dalle run's ``config.toml``, ``tokenizer.json`` and weights, its image tokenizer under
``vae/``, and optionally a CLIP run under ``clip/`` that reranks candidates. Only what
inference needs is copied: no optimizer state, no cached codes, no metrics. Weights may be
stored in fp16 to halve the size; they are upcast to fp32 when loaded.

    cvformers bundle runs/dalle --clip runs/clip --out src/cvformers/assets/default
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from cvformers.errors import UserError
from cvformers.utils import atomic_write_bytes, fsync_dir

_RUN_FILES = ("config.toml", "model.safetensors")
# What a folder written by export_bundle holds; an existing --out with anything else is not replaced.
_BUNDLE_ENTRIES = {"config.toml", "model.safetensors", "tokenizer.json", "vae", "clip"}


def _check_run(src: Path, extra: tuple[str, ...] = ()):
    """Load the run (proving it is whole) before anything is written; return the model."""
    from cvformers.loading import load_run

    for rel in _RUN_FILES + extra:
        if not (src / rel).is_file():
            raise UserError(f"{src} cannot be bundled: {rel} is missing")
    model, _ = load_run(src)
    return model


def _write_run(model, src: Path, dst: Path, dtype: torch.dtype | None, extra: tuple[str, ...] = ()) -> None:
    from cvformers.loading import save_weights

    dst.mkdir(parents=True, exist_ok=True)
    for rel in ("config.toml",) + extra:
        atomic_write_bytes(dst / rel, (src / rel).read_bytes())
    save_weights(model, dst / "model.safetensors", dtype=dtype)


def _check_out(out: Path, inputs: list[Path]) -> None:
    """Refuse an --out that is, contains or lies inside an input, or that holds anything but a bundle."""
    real_out = out.resolve()
    for src in inputs:
        real_src = src.resolve()
        if real_out == real_src or real_out in real_src.parents or real_src in real_out.parents:
            raise UserError(f"--out {out} overlaps the input {src}: choose a folder outside every run")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} exists and is not a folder; choose a new folder")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        if entries and (not entries <= _BUNDLE_ENTRIES or "model.safetensors" not in entries):
            raise UserError(f"--out {out} exists and is not a bundle (it holds {', '.join(sorted(entries)[:4])}); "
                            "choose a new folder: bundle only replaces a folder it wrote")


def export_bundle(dalle_run: str | Path, out: str | Path, clip_run: str | Path | None = None,
                  half: bool = True) -> Path:
    """Write ``out`` = dalle run + its ``vae/`` (+ ``clip/``), weights in fp16 when ``half``.

    Every input is loaded first; the bundle is built in a temporary folder beside ``out`` and
    swapped in by renames, so a failure leaves an existing ``out`` as it was. ``out`` may only
    be new, empty, or a bundle written before.
    """
    dalle_run, out = Path(dalle_run), Path(out)
    if not (dalle_run / "vae").is_dir():
        raise UserError(f"{dalle_run} is not a dalle run folder (it has no vae/)")
    inputs = [dalle_run] + ([Path(clip_run)] if clip_run is not None else [])
    _check_out(out, inputs)
    parts = [(dalle_run, "", ("tokenizer.json",)), (dalle_run / "vae", "vae", ())]
    if clip_run is not None:
        clip_run = Path(clip_run)
        parts.append((clip_run, "clip", ("tokenizer.json",) if (clip_run / "tokenizer.json").is_file() else ()))
    models = [_check_run(src, extra) for src, _, extra in parts]

    dtype = torch.float16 if half else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        for model, (src, rel, extra) in zip(models, parts):
            _write_run(model, src, tmp / rel if rel else tmp, dtype, extra)
        os.chmod(tmp, 0o777 & ~_umask())
        if out.is_dir() and any(out.iterdir()):
            old = out.parent / f".{out.name}.{os.getpid()}.old.tmp"
            os.rename(out, old)
        os.replace(tmp, out)  # onto a missing or empty folder
        fsync_dir(out.parent)
    except BaseException:
        if old is not None and old.exists() and not out.exists():
            os.rename(old, out)  # put the previous bundle back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def bundle_size(path: str | Path) -> int:
    """Bytes on disk of every file in the bundle."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
