"""Export trained runs as one self-contained model folder (the shipped ``default`` is one).

A bundle has the layout ``TextToImage.load`` reads (see ``pipelines/text_to_image.py``):
the dalle run's ``config.toml``, ``tokenizer.json`` and weights, its image tokenizer under
``vae/``, and optionally a CLIP run under ``clip/`` that reranks candidates. Only what
inference needs is copied: no optimizer state, no cached codes, no metrics. Weights may be
stored in fp16 to halve the size; they are upcast to fp32 when loaded.

    cvformers bundle runs/dalle --clip runs/clip --out src/cvformers/assets/default

A DALL-E 2 (unCLIP) bundle gathers a folder of stage runs (``prior/``, ``decoder/``, optional
``upsampler/``) and the CLIP they were trained with into the layout ``UnCLIP.load`` reads, each
stage's weights being its moving average (``ema.safetensors``) when the run has one:

    cvformers bundle --unclip runs/unclip --out src/cvformers/assets/unclip

Both commands and the pipelines' ``save_pretrained`` describe what to write as a list of
``BundlePart`` and hand it to ``write_bundle``: one writer, one set of safety rules.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvformers.errors import UserError
from cvformers.utils import atomic_write_bytes, fsync_dir

_RUN_FILES = ("config.toml", "model.safetensors")
METRICS = "metrics.jsonl"  # a training run's log (train/): its last "eval" line is the run's own figure
LAST_EVAL_KEY = "cvformers.last_eval"  # safetensors metadata: that line, carried into a bundle's weights
# What a folder written by export_bundle (export_unclip_bundle) holds, and the entry it always has;
# an existing --out with anything else is not replaced.
# README.md is the model card that ``save_pretrained`` writes.
_BUNDLE_ENTRIES = {"config.toml", "model.safetensors", "tokenizer.json", "vae", "clip", "README.md"}
_UNCLIP_ENTRIES = {"config.toml", "prior", "decoder", "upsampler", "clip", "reranker", "README.md"}
# What each kind of bundle may hold at its root, and the entry that proves a folder is one.
BUNDLE_LAYOUTS = {"dalle": (_BUNDLE_ENTRIES, "model.safetensors"), "unclip": (_UNCLIP_ENTRIES, "prior")}


@dataclass
class BundlePart:
    """One folder of a bundle: its model (written as ``model.safetensors``) and files beside it."""

    rel: str  # folder inside the bundle; "" is the bundle's root
    model: nn.Module | None = None  # None: a part without weights (an unCLIP bundle's root)
    files: dict[str, bytes] = field(default_factory=dict)  # name -> content: config.toml, tokenizer.json …
    metadata: dict[str, str] = field(default_factory=dict)  # stored in the safetensors header


def _check_run(src: Path, extra: tuple[str, ...] = ()):
    """Load the run (proving it is whole) before anything is written; return the model."""
    from cvformers.loading import load_run

    for rel in _RUN_FILES + extra:
        if not (src / rel).is_file():
            raise UserError(f"{src} cannot be bundled: {rel} is missing")
    model, _ = load_run(src)
    return model


def last_evaluation(folder: Path) -> dict[str, Any] | None:
    """The last evaluation a part's training logged: from its run's ``metrics.jsonl``, or from the
    weights' metadata where a bundle carries it. None when neither holds one."""
    log = folder / METRICS
    if log.is_file():
        last = None
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash: the lines before it still count
                continue
            if isinstance(record, dict) and record.get("split") == "eval":
                last = record
        if last is not None:
            return last
    weights = folder / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt", device="cpu") as f:
                stored = (f.metadata() or {}).get(LAST_EVAL_KEY)
            return json.loads(stored) if stored else None
        except Exception:  # an unreadable header: loading the weights reports it; the card just lacks it
            return None
    return None


def _run_part(model, src: Path, rel: str, extra: tuple[str, ...] = ()) -> BundlePart:
    """A part copied from run folder ``src``: its config.toml and ``extra`` files as they are, and
    its last logged evaluation in the weights' metadata (the model card of ``save_pretrained`` shows it)."""
    evaluation = last_evaluation(src)
    metadata = {LAST_EVAL_KEY: json.dumps(evaluation, sort_keys=True)} if evaluation else {}
    files = {name: (src / name).read_bytes() for name in ("config.toml",) + extra}
    if "tokenizer.json" in files:
        files["tokenizer.json"] = _tokenizer_as_written_now(files["tokenizer.json"])
    return BundlePart(rel, model, files, metadata)


def _tokenizer_as_written_now(data: bytes) -> bytes:
    """A run's caption BPE in today's file layout (one Hugging Face ``tokenizers`` reads), whatever
    layout the run wrote; a file that is not ours is copied as it is."""
    from cvformers.text import BPETokenizer

    try:
        return BPETokenizer.from_bytes(data).to_bytes()
    except UserError:
        return data


def _write_parts(root: Path, parts: list[BundlePart], dtype: torch.dtype | None) -> None:
    from cvformers.loading import save_weights

    for part in parts:
        dst = root / part.rel if part.rel else root
        dst.mkdir(parents=True, exist_ok=True)
        for name, data in part.files.items():
            atomic_write_bytes(dst / name, data)
        if part.model is not None:
            save_weights(part.model, dst / "model.safetensors", dtype=dtype, metadata=part.metadata)


def write_bundle(out: str | Path, parts: list[BundlePart], layout: str, half: bool = False) -> Path:
    """Write ``parts`` as the bundle ``out`` (``layout``: "dalle" or "unclip"), weights in fp16 when
    ``half``. The same rules as ``cvformers bundle``: ``out`` may only be new, empty or a bundle
    of that layout; it is built beside ``out`` and swapped in, so a failure leaves ``out`` as it was."""
    out = Path(out)
    entries, required = BUNDLE_LAYOUTS[layout]
    _check_out(out, [], entries, required)
    dtype = torch.float16 if half else None
    return _swap_in(out, lambda tmp: _write_parts(tmp, parts, dtype))


def _check_out(out: Path, inputs: list[Path], entries_allowed: set[str] = _BUNDLE_ENTRIES,
               entry_required: str = "model.safetensors") -> None:
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
        if entries and (not entries <= entries_allowed or entry_required not in entries):
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
    sources = [(dalle_run, "", ("tokenizer.json",)), (dalle_run / "vae", "vae", ())]
    if clip_run is not None:
        clip_run = Path(clip_run)
        sources.append((clip_run, "clip", ("tokenizer.json",) if (clip_run / "tokenizer.json").is_file() else ()))
    parts = [_run_part(_check_run(src, extra), src, rel, extra) for src, rel, extra in sources]
    dtype = torch.float16 if half else None
    return _swap_in(out, lambda tmp: _write_parts(tmp, parts, dtype))


def _swap_in(out: Path, write) -> Path:
    """Build the bundle by ``write(tmp)`` in a temporary folder beside ``out``, then put it in
    place by renames; on any failure a previous ``out`` is left (or put back) as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        write(tmp)
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


def export_unclip_bundle(runs: str | Path, out: str | Path, half: bool = True,
                         sampling: dict | None = None) -> Path:
    """Write ``out`` from a folder of unCLIP stage runs: ``prior/`` and ``decoder/`` (and
    ``upsampler/`` when present) with their averaged weights, the decoder's ``clip/``, a CLIP run
    ``reranker/`` that scores the candidates when present, and a ``config.toml`` (kind "unclip",
    optional ``[sampling]`` defaults). Safe as ``export_bundle``."""
    from cvformers.config import dumps_toml, from_dict, to_dict
    from cvformers.diffusion.model import EMA_FILE
    from cvformers.loading import load_weights
    from cvformers.pipelines.unclip import UnCLIPSamplingConfig
    from cvformers.registry import kind_of

    runs, out = Path(runs), Path(out)
    stages = [name for name in ("prior", "decoder", "upsampler") if (runs / name).is_dir()]
    for name in ("prior", "decoder"):
        if name not in stages:
            raise UserError(f"{runs} cannot be bundled as unCLIP: it has no {name}/ run")
    clip = runs / "decoder" / "clip"
    if not (clip / "config.toml").is_file():
        raise UserError(f"{runs / 'decoder'} has no clip/: it was not written by `cvformers train unclip-decoder`")
    _check_out(out, [runs], _UNCLIP_ENTRIES, "prior")
    table = to_dict(from_dict(UnCLIPSamplingConfig, dict(sampling or {}), "sampling"))  # checked before writing
    parts = [BundlePart("", None, {"config.toml": dumps_toml({"kind": "unclip", "sampling": table}).encode()})]
    for name in stages:
        model = _check_run(runs / name)
        if (runs / name / EMA_FILE).is_file():
            load_weights(model, runs / name / EMA_FILE)
        parts.append(_run_part(model, runs / name, name))
    for rel, folder in (("clip", clip), ("reranker", runs / "reranker")):
        if rel == "reranker" and not folder.is_dir():
            continue
        extra = ("tokenizer.json",) if (folder / "tokenizer.json").is_file() else ()
        model = _check_run(folder, extra)
        if rel == "reranker" and kind_of(model) != "clip":
            raise UserError(f"{folder} holds a {kind_of(model)!r} model where a CLIP reranker belongs")
        parts.append(_run_part(model, folder, rel, extra))
    dtype = torch.float16 if half else None
    return _swap_in(out, lambda tmp: _write_parts(tmp, parts, dtype))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def bundle_size(path: str | Path) -> int:
    """Bytes on disk of every file in the bundle."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
