"""``cvformers train unclip-prior | unclip-decoder | unclip-upsampler``: the three diffusion stages
of DALL-E 2 (unCLIP, Ramesh et al. 2022), each its own run, all reading one frozen CLIP.

    cvformers train unclip-decoder   --data shapes --clip default --out runs/unclip/decoder
    cvformers train unclip-prior     --data shapes --clip default --out runs/unclip/prior
    cvformers train unclip-upsampler --data shapes --out runs/unclip/upsampler
    cvformers bundle --unclip runs/unclip --out my-unclip   # prior/ decoder/ [upsampler/] + the CLIP

``--vae`` (decoder only) is a VQ-VAE run folder: the decoder then draws that tokenizer's latent
grid instead of pixels (``LatentDecoder``, a departure from the paper said there); the tokenizer
is copied into the run under ``vae/`` and its code ids of the training set are cached beside it
(``vae_ids_<split>.safetensors``).

``--clip`` is a CLIP run folder (default: the shipped model's, ``default/clip``); it is copied
into the prior's and the decoder's run folders under ``clip/``, so that each run says which
embedding space it was trained in. The CLIP image and text embeddings of the training set are
computed once and cached beside the run (``clip_embeddings_<split>.safetensors``, keyed by the
CLIP weights and the data), not recomputed every epoch. The upsampler needs no CLIP: it learns
to enlarge ``low_res`` images of the data to the data's image size.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cvformers.config import ConfigError, from_dict, to_dict
from cvformers.data import DataConfig, build_from_config
from cvformers.diffusion.decoder import (DecoderConfig, LatentDecoder, LatentDecoderConfig, UnCLIPDecoder,
                                         Upsampler, UpsamplerConfig, latent_channels)
from cvformers.diffusion.model import EMA_FILE
from cvformers.diffusion.prior import DiffusionPrior, PriorConfig
from cvformers.diffusion.samplers import DiffusionSamplingConfig
from cvformers.errors import UserError
from cvformers.loading import TOKENIZER_FILE, load_clip, load_vae, resolve_run
from cvformers.tasks import TaskArgs, TaskSetup, data_config_from, indexed_data, register_task
from cvformers.tasks.cache import cached_tensors
from cvformers.train.hooks import EMA, EMAConfig
from cvformers.vae.vqvae import VQVAE

CLIP_DIR = "clip"  # the frozen CLIP a prior / decoder run was trained with, copied into the run
VAE_DIR = "vae"  # the frozen VQ-VAE whose latent grid a latent decoder draws, copied into the run
DEFAULT_CLIP = "default/clip"
SAMPLES_FILE = "samples.png"

# CPU-sized U-Nets. Decoder: 32 -> 16 -> 8 px, attention (with the context) at 16 and 8.
DECODER_UNET = dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, heads=4, dropout=0.0)
# Latent decoder: the tokenizer's 8x8 grid -> 4x4, attention at both; wider, as each step is cheap.
LATENT_DECODER_UNET = dict(base_channels=64, channel_mults=(1, 1), num_res_blocks=2, heads=4, dropout=0.0)
# Upsampler: 64 -> 32 -> 16 -> 8 px, attention only at 8 (it sharpens; the layout comes from its input).
UPSAMPLER_UNET = dict(base_channels=32, channel_mults=(1, 1, 2, 2), num_res_blocks=1, heads=4, dropout=0.0,
                      attention_resolutions=(8,))


@dataclass
class UnCLIPTaskConfig:
    """The ``[unclip]`` table: what the task does around the model."""

    ema_decay: float = 0.999  # decay of the weight average that sampling reads (0: none)
    sample_steps: int = 25  # DDIM steps of the sample grid written at each checkpoint
    sample_guidance: float = 3.0  # decoder guidance of that grid


def default_train_config(stage: str):
    from cvformers.train.trainer import TrainConfig

    if stage == "prior":  # a small transformer on 64-d vectors: many cheap steps, AdamW as the paper
        return TrainConfig(steps=6000, batch_size=256, lr=3e-4, weight_decay=0.05, warmup_steps=200,
                           grad_clip=1.0, checkpoint_every=1000, eval_every=1000, eval_batches=4)
    # DDPM's recipe (Adam, 2e-4, clipping at 1), as the ddpm task
    return TrainConfig(steps=3000, batch_size=64, lr=2e-4, weight_decay=0.0, warmup_steps=200,
                       grad_clip=1.0, checkpoint_every=500, eval_every=500, eval_batches=4)


# --- the frozen CLIP and its cached embeddings ------------------------------------------------


def _clip_source(args: TaskArgs) -> Path:
    saved = Path(args.out) / CLIP_DIR
    if args.resume and saved.is_dir():
        return saved  # the run's own copy: the embedding space it was trained in
    return resolve_run(args.clip or DEFAULT_CLIP)


def _vae_source(args: TaskArgs) -> Path | None:
    """The VQ-VAE a latent decoder draws for (None: a pixel decoder)."""
    saved = Path(args.out) / VAE_DIR
    if args.resume:
        if saved.is_dir():
            if args.vae:
                raise UserError(f"--vae: a resumed run keeps its own tokenizer ({saved}); remove --vae")
            return saved
        if args.vae:
            raise UserError("--vae: the run being resumed draws pixels; a latent decoder is a new run (another --out)")
        return None
    return resolve_run(args.vae) if args.vae else None


def _latent_vae(path: Path, data_cfg: DataConfig, device: str | None) -> VQVAE:
    vae = load_vae(path, device=device or "cpu")
    if not isinstance(vae, VQVAE):
        raise UserError(f"--vae {path}: a latent decoder needs a VQ-VAE (its code vectors are the latent), "
                        f"not a {type(vae).__name__}")
    if (vae.image_size, vae.channels) != (data_cfg.image_size, data_cfg.channels):
        raise UserError(f"--vae {path} reads {vae.image_size}-px images with {vae.channels} channel(s); "
                        f"the data has {data_cfg.image_size} px and {data_cfg.channels}: set [data] to match")
    return vae


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def embed_dataset(clip, tokenizer, dataset, batch_size: int = 256, desc: str = "") -> dict[str, torch.Tensor]:
    """CLIP image and text embeddings (unit length) of every item, the caption ids, and the source
    index (an item whose image failed to decode is left out, as for DALL-E's cached ids)."""
    from torch.utils.data import DataLoader

    from cvformers.data import collate
    from cvformers.images import fit_images
    from cvformers.utils import progress

    device = next(clip.parameters()).device
    images, texts, ids, kept = [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for i, batch in enumerate(progress(loader, desc=desc or "embedding", unit="batch")):
        asked = torch.arange(i * batch_size, i * batch_size + len(batch["image"]))
        got = torch.tensor([r["index"] if isinstance(r, dict) and "index" in r else int(a)
                            for r, a in zip(batch["record"], asked)])
        own = (got == asked).tolist()
        captions = [c for c, keep in zip(batch["caption"], own) if keep]
        if not captions:
            continue
        text = tokenizer.encode(captions)
        pixels = fit_images(batch["image"][torch.tensor(own)], clip.cfg.image_size)  # CLIP reads its own size
        images.append(clip.encode_image(pixels.to(device), normalize=True).cpu())
        texts.append(clip.encode_text(text.to(device), normalize=True).cpu())
        ids.append(text.to(torch.int32))
        kept.append(asked[torch.tensor(own)])
    if not kept:
        raise UserError("no readable image in the data: nothing to embed")
    return {"image": torch.cat(images), "text": torch.cat(texts), "ids": torch.cat(ids), "index": torch.cat(kept)}


def cached_embeddings(clip, tokenizer, dataset, path: Path, key: str, desc: str = "") -> dict[str, torch.Tensor]:
    """``embed_dataset`` read from ``path`` when its key matches, else computed once and saved."""
    return cached_tensors(path, key, ("image", "text", "ids", "index"),
                          lambda: embed_dataset(clip, tokenizer, dataset, desc=desc), what="embedding")


class EmbeddedDataset(Dataset):
    """Items of a dataset with their cached CLIP embeddings and caption ids:
    {"clip_image", "clip_text", "text"} (+ "image" when ``with_images``, for the decoder; or
    "image_ids", the cached tokenizer ids [h, w] of the image, once ``image_ids`` is set)."""

    def __init__(self, source, cache: dict[str, torch.Tensor], with_images: bool):
        self.source, self.cache, self.with_images = source, cache, with_images
        self.image_ids: torch.Tensor | None = None  # [len, h, w], row i the image of item i

    def __len__(self) -> int:
        return len(self.cache["index"])

    def __getitem__(self, i: int) -> dict:
        item = {"clip_image": self.cache["image"][i].float(), "clip_text": self.cache["text"][i].float(),
                "text": self.cache["ids"][i].long()}
        if self.image_ids is not None:
            item["image_ids"] = self.image_ids[i].long()
        elif self.with_images:
            item["image"] = self.image(i)
        return item

    def image(self, i: int) -> torch.Tensor:
        return self.source[int(self.cache["index"][i])]["image"]

    def caption(self, i: int) -> str:
        return self.source[int(self.cache["index"][i])]["caption"]


@torch.no_grad()
def tokenize_images(vae, data: EmbeddedDataset, batch_size: int = 256, desc: str = "") -> dict[str, torch.Tensor]:
    """The tokenizer's code ids [len, h, w] of every image of ``data``, in its order."""
    from cvformers.utils import progress

    device = next(vae.parameters()).device
    out = []
    for start in progress(range(0, len(data), batch_size), desc=desc or "tokenizing", unit="batch"):
        images = torch.stack([data.image(i) for i in range(start, min(start + batch_size, len(data)))])
        out.append(vae.encode(images.to(device)).to(torch.int16).cpu())
    return {"ids": torch.cat(out), "index": data.cache["index"]}


def attach_image_ids(vae, vae_path: Path, data: EmbeddedDataset, data_cfg: DataConfig, out: Path, name: str) -> None:
    """Give ``data`` its images' tokenizer ids, read from (or computed once into) ``vae_ids_<name>``,
    keyed like the CLIP embeddings by the weights, the data and the split."""
    key = hashlib.sha256(json.dumps([_file_hash(vae_path / "model.safetensors"), to_dict(data_cfg), name],
                                    sort_keys=True).encode()).hexdigest()
    ids = cached_tensors(out / f"vae_ids_{name}.safetensors", key, ("ids", "index"),
                         lambda: tokenize_images(vae, data, desc=f"tokenizing {name}"),
                         fits=lambda t: torch.equal(t["index"], data.cache["index"]), what="tokenizing")
    data.image_ids = ids["ids"]


def _stack(items: list[dict]) -> dict:
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def _embedded_splits(args: TaskArgs, data_cfg: DataConfig, clip_path: Path, with_images: bool):
    clip, tokenizer = load_clip(clip_path, device=args.device or "cpu")
    clip_hash = _file_hash(clip_path / "model.safetensors")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def split(name: str) -> EmbeddedDataset:
        source = indexed_data(build_from_config(data_cfg, name), "the unCLIP prior and decoder")
        key = hashlib.sha256(json.dumps([clip_hash, to_dict(data_cfg), name], sort_keys=True).encode()).hexdigest()
        cache = cached_embeddings(clip, tokenizer, source, out / f"clip_embeddings_{name}.safetensors", key,
                                  desc=f"CLIP-embedding {name}")
        if len(cache["index"]) < len(source):
            print(f"{name}: {len(source) - len(cache['index'])} unreadable image(s) left out", file=sys.stderr)
        return EmbeddedDataset(source, cache, with_images)

    train = split("train")
    try:
        evaluation = split(data_cfg.eval_split)
    except (UserError, ConfigError, FileNotFoundError):
        evaluation = None  # a folder has a single split
    return clip, tokenizer, train, evaluation


def _clip_files(clip_path: Path) -> dict[str, bytes]:
    return {f"{CLIP_DIR}/{name}": (clip_path / name).read_bytes()
            for name in ("config.toml", "model.safetensors", TOKENIZER_FILE) if (clip_path / name).is_file()}


def _task_config(args: TaskArgs) -> UnCLIPTaskConfig:
    return from_dict(UnCLIPTaskConfig, dict(args.config.get("unclip", {})), "unclip")


def _ema(task_cfg: UnCLIPTaskConfig) -> EMA | None:
    return EMA(EMAConfig(decay=task_cfg.ema_decay), publish=EMA_FILE) if task_cfg.ema_decay > 0 else None


def _image_data_config(args: TaskArgs, default_size: int = 32) -> DataConfig:
    model = args.config.get("model", {}) if args.resume else {}
    # a resumed run's images: the sizes its U-Net draws, or the ones its tokenizer reads
    saved = dict(model.get("vae") or model.get("unet") or {})
    size, channels = saved.get("image_size"), saved.get("channels") or saved.get("in_channels")
    table = args.config.get("data", {})
    return data_config_from(args, image_size=size or table.get("image_size") or default_size,
                            channels=channels or table.get("channels") or 3)


def _unet_table(args: TaskArgs, preset: dict, data_cfg: DataConfig) -> tuple[dict, dict]:
    """([model] with the diffusion defaults of these tasks, [model.unet] with the preset and the data's sizes).

    Defaults: v-prediction on the cosine schedule. With ε-prediction on the linear schedule, a
    CPU-sized budget left the decoder's global colour wrong: it is decided at high noise, where
    ε's errors reach x̂_0 multiplied by sqrt((1-ᾱ)/ᾱ) (about 160 at t = T)."""
    table = {"schedule": "cosine", "prediction": "v", **dict(args.config.get("model", {}))}
    unet = {"attention_resolutions": (data_cfg.image_size // 2, data_cfg.image_size // 4), **preset,
            "image_size": data_cfg.image_size, "in_channels": data_cfg.channels, **dict(table.pop("unet", {}) or {})}
    return table, unet


def _clip_fixed(clip) -> dict:
    """What the CLIP run fixes in a prior's or a decoder's [model]."""
    return {"clip_dim": clip.cfg.embed_dim, "vocab_size": clip.cfg.vocab_size, "text_len": clip.cfg.context_length}


def _refuse_conflicts(table: dict, fixed: dict) -> None:
    for key, value in fixed.items():
        if key in table and table[key] != value:
            raise ConfigError(f"model.{key} = {table[key]} but the CLIP run fixes it to {value}; remove it from [model]")


# --- the three stages ----------------------------------------------------------------------------


@register_task("unclip-decoder", tables=("unclip",))
def decoder_task(args: TaskArgs) -> TaskSetup:
    """unCLIP's decoder: a diffusion U-Net drawing an image from its CLIP image embedding and caption."""
    from cvformers.train.trainer import train_config_from

    task_cfg = _task_config(args)
    data_cfg = _image_data_config(args)
    vae_path = _vae_source(args)
    vae = None if vae_path is None else _latent_vae(vae_path, data_cfg, args.device)  # refused before any work
    clip_path = _clip_source(args)
    clip, tokenizer, train_data, eval_data = _embedded_splits(args, data_cfg, clip_path, with_images=True)
    if clip.cfg.image_size != data_cfg.image_size:
        print(f"note: CLIP reads {clip.cfg.image_size}-px images; the decoder draws {data_cfg.image_size} px",
              file=sys.stderr)
    if vae is None:
        table, unet = _unet_table(args, DECODER_UNET, data_cfg)
    else:
        grid = vae.cfg.grid_size
        table, unet = _unet_table(args, {**LATENT_DECODER_UNET, "attention_resolutions": (grid, grid // 2)}, data_cfg)
        table.pop("vae", None)  # a resumed run's own copy: the tokenizer in vae/ is the one used
        unet.update(image_size=grid, in_channels=latent_channels(vae.cfg))  # the U-Net draws the latent grid
        for split_data, name in ((train_data, "train"), (eval_data, data_cfg.eval_split)):
            if split_data is not None:
                attach_image_ids(vae, vae_path, split_data, data_cfg, Path(args.out), name)
    fixed = _clip_fixed(clip)
    _refuse_conflicts(table, fixed)
    if vae is None:
        cfg = from_dict(DecoderConfig, {**table, **fixed, "unet": unet}, "model")
        model = UnCLIPDecoder(cfg)
    else:
        cfg = from_dict(LatentDecoderConfig, {**table, **fixed, "unet": unet, "vae": to_dict(vae.cfg)}, "model")
        model = LatentDecoder(cfg)
        model.vae.load_state_dict(vae.state_dict())
    ema = _ema(task_cfg)
    shown = eval_data if eval_data is not None else train_data

    def write_samples(model: UnCLIPDecoder, run_dir: Path, step: int) -> None:
        from cvformers.images import labelled_grid, save_png

        sampler = (model if ema is None else ema.averaged(model)).eval()
        n = min(8, len(shown))
        batch = _stack([shown[i] for i in range(n)])
        sampling = DiffusionSamplingConfig(steps=task_cfg.sample_steps, guidance=task_cfg.sample_guidance, seed=0)
        drawn = sampler.sample(batch["clip_image"], batch["text"], sampling).cpu()
        images = torch.stack([shown.image(i) for i in range(n)])
        # each column is one item: its caption under the decoded image, which was drawn from it
        sheet = labelled_grid(torch.cat([images, drawn]), n, min_tile=64, row_labels=["data", "decoded"],
                              tile_labels=[""] * n + [shown.caption(i) for i in range(n)], label_width=60)
        save_png(sheet, Path(run_dir) / SAMPLES_FILE,
                 metadata={"step": str(step), "rows": "data, decoded from its CLIP image embedding"})

    files = _clip_files(clip_path)
    if vae_path is not None:
        files.update({f"{VAE_DIR}/{name}": (vae_path / name).read_bytes() for name in ("config.toml", "model.safetensors")})
    return TaskSetup(
        kind="unclip_decoder" if vae is None else "unclip_latent_decoder", model=model, model_config=cfg,
        train_config=train_config_from(args, default_train_config("decoder")),
        train_data=train_data, eval_data=eval_data, collate=_stack,
        extra_config={"data": to_dict(data_cfg), "unclip": to_dict(task_cfg)},
        extra_files=files, hooks=[ema] if ema else [], on_checkpoint=write_samples,
    )


@register_task("unclip-prior", tables=("unclip",))
def prior_task(args: TaskArgs) -> TaskSetup:
    """unCLIP's diffusion prior: a caption's CLIP text embedding -> a CLIP image embedding."""
    from cvformers.train.trainer import train_config_from

    task_cfg = _task_config(args)
    data_cfg = _image_data_config(args)
    clip_path = _clip_source(args)
    clip, tokenizer, train_data, eval_data = _embedded_splits(args, data_cfg, clip_path, with_images=False)
    table = dict(args.config.get("model", {}))
    fixed = _clip_fixed(clip)
    _refuse_conflicts(table, fixed)
    cfg = from_dict(PriorConfig, {**table, **fixed}, "model")
    ema = _ema(task_cfg)
    return TaskSetup(
        kind="unclip_prior", model=DiffusionPrior(cfg), model_config=cfg,
        train_config=train_config_from(args, default_train_config("prior")),
        train_data=train_data, eval_data=eval_data, collate=_stack,
        extra_config={"data": to_dict(data_cfg), "unclip": to_dict(task_cfg)},
        extra_files=_clip_files(clip_path), hooks=[ema] if ema else [],
    )


class _Images(Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.source[i]["image"]}


@register_task("unclip-upsampler", tables=("unclip",))
def upsampler_task(args: TaskArgs) -> TaskSetup:
    """unCLIP's upsampler: a diffusion U-Net enlarging low_res images (blur-corrupted in training)."""
    from cvformers.train.trainer import train_config_from

    task_cfg = _task_config(args)
    data_cfg = _image_data_config(args, default_size=64)
    table, unet = _unet_table(args, UPSAMPLER_UNET, data_cfg)
    table.setdefault("low_res", data_cfg.image_size // 2)
    cfg = from_dict(UpsamplerConfig, {**table, "unet": unet}, "model")
    train_data = _Images(indexed_data(build_from_config(data_cfg, "train"), "unclip-upsampler"))
    try:
        eval_data = _Images(build_from_config(data_cfg, data_cfg.eval_split))
    except (UserError, ConfigError, FileNotFoundError):
        eval_data = None
    ema = _ema(task_cfg)

    def write_samples(model: Upsampler, run_dir: Path, step: int) -> None:
        import torch.nn.functional as F

        from cvformers.images import labelled_grid, save_png

        sampler = (model if ema is None else ema.averaged(model)).eval()
        shown = eval_data if eval_data is not None else train_data
        high = torch.stack([shown[i]["image"] for i in range(min(8, len(shown)))])
        low = F.interpolate(high, size=(cfg.low_res,) * 2, mode="area")
        drawn = sampler.sample(low, DiffusionSamplingConfig(steps=task_cfg.sample_steps, seed=0)).cpu()
        nearest = F.interpolate(low, size=high.shape[-2:], mode="nearest")
        sheet = labelled_grid(torch.cat([nearest, drawn, high]), len(high), min_tile=64,
                              row_labels=["low res", "upsampled", "original"], label_width=60)
        save_png(sheet, Path(run_dir) / SAMPLES_FILE,
                 metadata={"step": str(step), "rows": "low resolution, upsampled, original"})

    return TaskSetup(
        kind="unclip_upsampler", model=Upsampler(cfg), model_config=cfg,
        train_config=train_config_from(args, default_train_config("upsampler")),
        train_data=train_data, eval_data=eval_data, collate=_stack,
        extra_config={"data": to_dict(data_cfg), "unclip": to_dict(task_cfg)},
        hooks=[ema] if ema else [], on_checkpoint=write_samples,
    )
