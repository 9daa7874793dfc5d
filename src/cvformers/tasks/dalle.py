"""``cvformers train dalle --vae RUN``: the transformer on (caption, frozen dVAE ids), DALL-E §2.2.

Stage two of DALL-E: the image tokenizer (``--vae``, a dvae or vqvae run) is frozen, so every
image's ids are computed once and cached in the run folder (``codes_<split>.safetensors``,
keyed by a hash of the tokenizer's weights and the data config) — epochs never re-encode.
Captions are BPE-encoded by a tokenizer trained on the training captions (or the one named
by ``[text] tokenizer``); the dataset yields ``{"text": [T], "codes": [h, w]}``.

The run folder is self-contained for ``TextToImage.load``: besides the trainer's files it holds
``tokenizer.json`` and ``vae/`` (a copy of the tokenizer run's config.toml + model.safetensors),
and every checkpoint writes ``samples.png``: a few fixed captions, four samples each.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cvformers.config import ConfigError, from_dict, to_dict
from cvformers.errors import UserError
from cvformers.loading import load_vae, resolve_run
from cvformers.models.dalle_sampling import SamplingConfig
from cvformers.models.dalle import DALLE, PRESETS, DalleConfig, image_inner_vocab_of
from cvformers.tasks import TaskArgs, TaskSetup, data_config_from, indexed_data, register_task
from cvformers.tasks.cache import cached_tensors

TOKENIZER_FILE = "tokenizer.json"
VAE_DIR = "vae"
SAMPLES_FILE = "samples.png"


@dataclass
class DalleTextConfig:
    """The ``[text]`` table of a dalle run: how captions become ids."""

    text_len: int = 32  # caption length in BPE tokens, per-position pads included (paper: 256)
    bpe_vocab_size: int = 1024  # BPE vocabulary learnt on the train captions (paper: 16384); may end smaller
    bpe_train_captions: int = 50_000  # at most this many train captions are used to learn the merges
    tokenizer: str = ""  # path of an existing tokenizer.json to use instead of training one


def default_train_config():
    from cvformers.train.trainer import TrainConfig

    # Appendix B.2 uses Adam β=(0.9, 0.96) and weight decay 4.5e-2 (lr 4.5e-4 at batch 1024); a short
    # CPU run at batch 64 needs a larger step (1e-3), cosine-decayed to a tenth.
    return TrainConfig(steps=3000, batch_size=64, lr=1e-3, weight_decay=4.5e-2, betas=(0.9, 0.96),
                       warmup_steps=100, checkpoint_every=500, eval_every=500, eval_batches=8)


# --- the frozen image tokenizer and its cached ids ----------------------------------------


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def encode_dataset(vae, dataset, batch_size: int = 256, desc: str = "",
                   items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``dataset`` (those of ``items``, default all) -> (ids [N', h, w] (int16 when
    the codebook fits), source index [N']).

    An item whose own image failed to decode (a folder dataset then hands over the next file's
    item, saying so in ``record["index"]``) is left out, so that row ``i`` of the ids always
    belongs to item ``index[i]`` and to its caption.
    """
    from torch.utils.data import DataLoader, Subset

    from cvformers.data import collate
    from cvformers.utils import progress

    device = next(vae.parameters()).device
    items = torch.arange(len(dataset)) if items is None else items.long()
    out, kept = [], []
    loader = DataLoader(Subset(dataset, items.tolist()), batch_size=batch_size, shuffle=False, collate_fn=collate)
    with progress(total=len(items), desc=desc or "encoding", unit="image") as bar:
        for i, batch in enumerate(loader):
            asked = items[i * batch_size: i * batch_size + len(batch["image"])]
            got = torch.tensor([r["index"] if isinstance(r, dict) and "index" in r else int(a)
                                for r, a in zip(batch["record"], asked)])
            own = got == asked
            out.append(vae.encode(batch["image"][own].to(device)).cpu())
            kept.append(asked[own])
            bar.update(len(asked))
    codes = torch.cat(out)
    codes = codes.to(torch.int16) if vae.num_tokens <= 2**15 else codes.to(torch.int32)
    return codes, torch.cat(kept)


def items_needed(n_items: int, items_drawn: int, seed: int) -> torch.Tensor | None:
    """Which items a run that draws ``items_drawn`` samples needs ids for: all (None) when it will
    see the whole set, else a fixed random subset of that size, in order (one epoch of it is what
    the run sees). A 10-step try then encodes 640 images, not 50,000."""
    if items_drawn >= n_items:
        return None
    chosen = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))[:items_drawn]
    return chosen.sort().values


def cached_codes(vae, dataset, path: Path, key: str, desc: str = "",
                 items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, source index) of ``dataset`` (``items`` of it, default all) from ``path`` when its key
    matches and the index fits the dataset, else encoded once and saved."""
    def fits(t: dict[str, torch.Tensor]) -> bool:
        codes, index = t["codes"], t["index"]
        return (len(codes) == len(index) and index.ndim == 1
                and (len(index) == 0 or (0 <= int(index.min()) and int(index.max()) < len(dataset))))

    def encode() -> dict[str, torch.Tensor]:
        codes, index = encode_dataset(vae, dataset, desc=desc, items=items)
        return {"codes": codes, "index": index}

    t = cached_tensors(path, key, ("codes", "index"), encode, fits, what="encoding")
    return t["codes"], t["index"].long()


class CaptionCodesDataset(Dataset):
    """(caption, cached image ids) items -> {"caption", "codes"}; the collate tokenizes captions.

    ``index[i]`` is the source item whose image gave ``codes[i]``, so each caption is read from
    the same item as its image. A source with ``caption(i)`` and ``set_epoch`` (folders with
    several captions per image) is asked each time, so each epoch can see other captions;
    otherwise captions are read once.
    """

    def __init__(self, source, codes: torch.Tensor, index: torch.Tensor | None = None):
        self.source, self.codes = source, codes
        self.index = torch.arange(len(codes)) if index is None else index.long()
        if hasattr(source, "caption") and hasattr(source, "set_epoch"):
            self._captions = None
        elif hasattr(source, "captions"):
            every = list(source.captions())
            self._captions = [every[int(i)] for i in self.index]
        else:
            self._captions = [source[int(i)]["caption"] for i in self.index]

    def __len__(self) -> int:
        return len(self.codes)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def caption(self, index: int) -> str:
        return self.source.caption(int(self.index[index])) if self._captions is None else self._captions[index]

    def captions(self, limit: int | None = None) -> list[str]:
        return [self.caption(i) for i in range(min(limit or len(self), len(self)))]

    def __getitem__(self, index: int) -> dict:
        return {"caption": self.caption(index), "codes": self.codes[index].long()}


def text_collate(tokenizer):
    from cvformers.text import CaptionTruncatedWarning

    def collate(items: list[dict]) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CaptionTruncatedWarning)  # the tail of a long caption is dropped
            text = tokenizer.encode([it["caption"] for it in items])
        return {"text": text, "codes": torch.stack([it["codes"] for it in items])}

    return collate


# --- samples at every checkpoint ------------------------------------------------------------


def sample_writer(vae, tokenizer, prompts: list[str], per_prompt: int = 4, seed: int = 0):
    """An ``on_checkpoint`` hook: ``samples.png``, one row of ``per_prompt`` samples per prompt, the
    prompt written beside its row."""

    def write(model, run_dir: Path, step: int) -> None:
        from cvformers.models.dalle_sampling import sample_codes
        from cvformers.images import labelled_grid, save_png

        model.eval()
        device = next(model.parameters()).device
        text = text_collate(tokenizer)([{"caption": p, "codes": torch.zeros(1)} for p in prompts])["text"]
        text = text.to(device).repeat_interleave(per_prompt, 0)
        g = torch.Generator(device).manual_seed(seed)
        codes = sample_codes(model, text, generator=g)
        images = vae.to(device).decode(codes).clamp(0, 1).cpu()
        meta = {"step": str(step), "prompts": json.dumps(prompts)}
        sheet = labelled_grid(images, per_prompt, min_tile=64, row_labels=prompts)
        save_png(sheet, Path(run_dir) / SAMPLES_FILE, metadata=meta)

    return write


# --- the task -------------------------------------------------------------------------------


def model_config_from(args: TaskArgs, text_len: int, num_text_tokens: int, vae) -> DalleConfig:
    """Preset (--model, default "small"), the TOML [model] table, then the sizes the tokenizers fix."""
    table = dict(args.config.get("model", {}))
    preset = args.model or table.pop("preset", None) or "small"
    if preset not in PRESETS:
        raise ConfigError(f"unknown dalle preset {preset!r}; known: {', '.join(PRESETS)}")
    fixed = dict(text_len=text_len, num_text_tokens=num_text_tokens, num_image_tokens=vae.num_tokens,
                 grid_size=vae.grid_size, image_inner_vocab=image_inner_vocab_of(vae))
    for k, v in fixed.items():
        if k in table and table[k] != v:
            raise ConfigError(f"model.{k} = {table[k]} but the tokenizers fix it to {v}; remove it from [model]")
    base = to_dict(DalleConfig(**{**PRESETS[preset], **fixed}))
    return from_dict(DalleConfig, {**base, **table, **fixed}, "model")


@register_task("dalle", tables=("text", "sampling"))
def dalle_task(args: TaskArgs) -> TaskSetup:
    """The DALL-E transformer on captions + ids of a trained image tokenizer (--vae)."""
    from cvformers.data import build_from_config
    from cvformers.text import BPETokenizer
    from cvformers.train.trainer import train_config_from

    out = Path(args.out)
    saved_vae = out / VAE_DIR
    vae_path = resolve_run(args.vae) if args.vae else (saved_vae if args.resume and saved_vae.is_dir() else None)
    if vae_path is None:
        raise UserError("training dalle needs --vae RUN: the run folder of a trained dvae or vqvae")
    device = args.device or "cpu"
    vae = load_vae(vae_path, device)

    data_cfg = data_config_from(args, image_size=vae.image_size, channels=vae.channels)
    text_cfg = from_dict(DalleTextConfig, dict(args.config.get("text", {})), "text")
    sampling_cfg = from_dict(SamplingConfig, dict(args.config.get("sampling", {})), "sampling")

    # the frozen tokenizer's ids, computed once per (weights, data, split)
    vae_hash = file_hash(vae_path / "model.safetensors")

    # only the items the run will draw are encoded: steps x global batch for training, the
    # evaluated batches for the eval split (the whole set when the run sees all of it)
    train_cfg = train_config_from(args, default_train_config())
    global_batch = train_cfg.batch_size * train_cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))

    def items_drawn(split: str) -> int:
        if split == "train":  # also when the eval split is "train": one set of ids serves both
            return train_cfg.steps * global_batch
        return (train_cfg.eval_batches * train_cfg.batch_size) or sys.maxsize

    # captions do not change the images: the wording share is left out of the cache key
    image_data = {k: v for k, v in to_dict(data_cfg).items() if k != "paraphrase"}

    def split_data(split: str):
        source = indexed_data(build_from_config(data_cfg, split), "dalle")
        items = items_needed(len(source), items_drawn(split), data_cfg.seed)
        subset = None if items is None else len(items)
        key = hashlib.sha256(json.dumps([vae_hash, image_data, split] + ([subset] if subset else []),
                                        sort_keys=True).encode()).hexdigest()
        codes, index = cached_codes(vae, source, out / f"codes_{split}.safetensors", key,
                                    desc=f"encoding {split}", items=items)
        left_out = (len(source) if items is None else len(items)) - len(index)
        if left_out:
            print(f"{split}: {left_out} unreadable image(s) left out", file=sys.stderr)
        return CaptionCodesDataset(source, codes, index)

    train_data = split_data("train")
    try:
        eval_data = split_data(data_cfg.eval_split)
    except (UserError, ConfigError, FileNotFoundError):
        eval_data = None  # a folder has a single split

    # the caption tokenizer: the run's own on resume, a given file, or trained on the train captions
    if args.resume and (out / TOKENIZER_FILE).is_file():
        tokenizer = BPETokenizer.load(out / TOKENIZER_FILE)
    elif text_cfg.tokenizer:
        tokenizer = BPETokenizer.load(text_cfg.tokenizer)
    else:
        tokenizer = BPETokenizer.train(train_data.captions(text_cfg.bpe_train_captions),
                                       vocab_size=text_cfg.bpe_vocab_size, text_len=text_cfg.text_len)
    if tokenizer.text_len != text_cfg.text_len:
        text_cfg = replace(text_cfg, text_len=tokenizer.text_len)

    cfg = model_config_from(args, tokenizer.text_len, tokenizer.num_text_tokens, vae)
    extra_files = {
        TOKENIZER_FILE: tokenizer.to_bytes(),
        f"{VAE_DIR}/config.toml": (vae_path / "config.toml").read_bytes(),
        f"{VAE_DIR}/model.safetensors": (vae_path / "model.safetensors").read_bytes(),
    }
    shown = eval_data if eval_data is not None else train_data
    prompts = shown.captions(4)
    return TaskSetup(
        kind="dalle", model=DALLE(cfg), model_config=cfg, train_config=train_cfg,
        train_data=train_data, eval_data=eval_data, collate=text_collate(tokenizer),
        extra_config={"data": to_dict(data_cfg), "text": to_dict(text_cfg), "sampling": sampling_cfg.to_table(),
                      "dalle": {"vae_source": str(args.vae or vae_path), "vae_sha256": vae_hash}},
        extra_files=extra_files,
        on_checkpoint=sample_writer(vae, tokenizer, prompts),
    )
