"""Export trained runs as one self-contained model folder (the shipped ``default`` is one).

A bundle has the layout ``TextToImage.load`` reads (see ``pipelines/text_to_image.py``):
the dalle run's ``config.toml``, ``tokenizer.json`` and weights, its image tokenizer under
``vae/``, and optionally a CLIP run under ``clip/`` that reranks candidates. Only what
inference needs is copied: no optimizer state, no cached codes, no metrics. Weights may be
stored in fp16 to halve the size; they are upcast to fp32 when loaded.

    cvformers bundle runs/dalle --clip runs/clip --out src/cvformers/assets/default
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from cvformers.errors import UserError
from cvformers.utils import atomic_write_bytes

_RUN_FILES = ("config.toml", "model.safetensors")


def _copy_run(src: Path, dst: Path, dtype: torch.dtype | None, extra: tuple[str, ...] = ()) -> None:
    from cvformers.train.checkpoint import load_run, save_weights

    for rel in _RUN_FILES + extra:
        if not (src / rel).is_file():
            raise UserError(f"{src} cannot be bundled: {rel} is missing")
    model, _ = load_run(src)  # proves the run loads before anything is written
    dst.mkdir(parents=True, exist_ok=True)
    for rel in ("config.toml",) + extra:
        atomic_write_bytes(dst / rel, (src / rel).read_bytes())
    save_weights(model, dst / "model.safetensors", dtype=dtype)


def export_bundle(dalle_run: str | Path, out: str | Path, clip_run: str | Path | None = None,
                  half: bool = True) -> Path:
    """Write ``out`` = dalle run + its ``vae/`` (+ ``clip/``), weights in fp16 when ``half``."""
    dalle_run, out = Path(dalle_run), Path(out)
    if not (dalle_run / "vae").is_dir():
        raise UserError(f"{dalle_run} is not a dalle run folder (it has no vae/)")
    dtype = torch.float16 if half else None
    if out.exists():
        shutil.rmtree(out)
    _copy_run(dalle_run, out, dtype, extra=("tokenizer.json",))
    _copy_run(dalle_run / "vae", out / "vae", dtype)
    if clip_run is not None:
        clip_run = Path(clip_run)
        extra = ("tokenizer.json",) if (clip_run / "tokenizer.json").is_file() else ()
        _copy_run(clip_run, out / "clip", dtype, extra=extra)
    return out


def bundle_size(path: str | Path) -> int:
    """Bytes on disk of every file in the bundle."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
