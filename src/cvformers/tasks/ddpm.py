"""``cvformers train ddpm``: a denoising diffusion model on images, unconditional, class- or caption-conditional.

    cvformers train ddpm --data fashion-mnist --out runs/ddpm        # class-conditional (the data has labels)
    cvformers sample ddpm --model runs/ddpm --label 3 --guidance 3 --out grid.png
    cvformers train ddpm --data shapes --config caption.toml --out runs/ddpm-text   # [ddpm] conditional = "caption"
    cvformers sample ddpm --model runs/ddpm-text --prompt "a red circle above a blue square" --guidance 3

The U-Net is sized for a CPU (``SMALL`` below; ``[model.unet]`` overrides any key) and follows
the data's image size and channels. ``[ddpm] conditional = "class"`` (the default) trains on the
labels the data has (MNIST / Fashion-MNIST classes, the shape of single-object ``shapes`` scenes,
the sub-folder of a folder's images) with label dropout for classifier-free guidance; ``"none"``
ignores them; ``"caption"`` reads each image's caption through a caption BPE learnt on the
training captions (saved in the run as ``tokenizer.json``) and a small transformer text encoder
(``cvformers.diffusion.caption``, GLIDE §2.3), with caption dropout for guidance. An EMA of the
weights is kept by a trainer hook (saved and resumed with every checkpoint, published as
``ema.safetensors``) and every checkpoint writes ``samples.png`` from it with 25 DDIM steps: DDPM §4 reports samples from the EMA, decay 0.9999; a short CPU run
averages over fewer steps (``ema_decay`` 0.999 by default).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cvformers.config import ConfigError, from_dict, to_dict
from cvformers.data import DataConfig, build_from_config, collate
from cvformers.data.labels import class_names, classification_dataset, count_classes
from cvformers.diffusion.caption import CaptionDDPM, CaptionDDPMConfig
from cvformers.diffusion.model import DDPM, EMA_FILE, DDPMConfig
from cvformers.diffusion.samplers import DiffusionSamplingConfig
from cvformers.loading import TOKENIZER_FILE
from cvformers.tasks import TaskArgs, TaskSetup, data_config_from, register_task
from cvformers.train.hooks import EMA, EMAConfig

SAMPLES_FILE = "samples.png"

# A CPU-sized U-Net: 32 -> 16 -> 8 feature maps, attention at 8 (DDPM used 16 on 32x32 CIFAR at 35.7M).
SMALL = dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, heads=4, dropout=0.1)


@dataclass
class DDPMTaskConfig:
    """The ``[ddpm]`` table: what the task does around the model."""

    conditional: Literal["class", "none", "caption"] = "class"  # the data's labels, nothing, or the captions
    ema_decay: float = 0.999  # decay of the weight average that samples are drawn from (0: no average)
    sample_steps: int = 25  # DDIM steps of the sample grid written at each checkpoint
    bpe_vocab_size: int = 1000  # "caption": target vocabulary of the caption BPE learnt on the train captions
    bpe_train_captions: int = 20000  # "caption": at most this many train captions teach the BPE its merges

    def __post_init__(self) -> None:
        if self.conditional not in ("class", "none", "caption"):
            raise ConfigError(f"ddpm.conditional must be class, none or caption, got {self.conditional!r}")
        if self.bpe_vocab_size < 257 or self.bpe_train_captions < 1:
            raise ConfigError("ddpm.bpe_vocab_size must be >= 257 (the bytes and one merge) and "
                              "ddpm.bpe_train_captions >= 1")


def default_train_config():
    from cvformers.train.trainer import TrainConfig

    # DDPM §4 / Appendix B: Adam, lr 2e-4, no weight decay, warmup 5000 steps, gradient clipping at 1.
    return TrainConfig(steps=4000, batch_size=64, lr=2e-4, weight_decay=0.0, warmup_steps=200,
                       grad_clip=1.0, checkpoint_every=500, eval_every=500, eval_batches=4)


def encode_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    """BPE ids [B, text_len] of training captions; a caption's overlong tail is dropped quietly."""
    from cvformers.text import CaptionTruncatedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptionTruncatedWarning)
        return tokenizer.encode(captions)


def caption_collate(tokenizer):
    """The data's collate plus ``text``: the captions' BPE ids."""

    def collate_captions(items: list[dict]) -> dict:
        batch = collate(items)
        batch["text"] = encode_captions(tokenizer, batch["caption"])
        return batch

    return collate_captions


def sample_writer(task_cfg: DDPMTaskConfig, ema: EMA | None, per_row: int = 8, names: list[str] | None = None,
                  prompts: torch.Tensor | None = None, captions: list[str] | None = None):
    """An ``on_checkpoint`` hook: ``samples.png`` from the EMA weights, one row per class (labelled
    with ``names``, else its index), per caption of ``prompts`` (ids [rows, text_len], labelled with
    ``captions``), or two unconditional rows."""

    def write(model: DDPM, run_dir: Path, step: int) -> None:
        from cvformers.images import labelled_grid, save_png

        sampler = model if ema is None else ema.averaged(model)
        sampler.eval()
        sampling = DiffusionSamplingConfig(sampler="ddim", steps=task_cfg.sample_steps, seed=0)
        row_labels = None
        if prompts is not None:
            rows = len(prompts)
            images = sampler.sample(prompts.repeat_interleave(per_row, 0), sampling=sampling).cpu()
            row_labels = captions
        else:
            rows = min(model.num_classes, 10) if model.num_classes else 2
            labels = torch.arange(rows).repeat_interleave(per_row) if model.num_classes else None
            images = sampler.sample(rows * per_row, sampling, labels=labels).cpu()
            if model.num_classes:
                row_labels = [names[k] if names and k < len(names) else f"class {k}" for k in range(rows)]
        sheet = labelled_grid(images, per_row, min_tile=64, row_labels=row_labels, label_width=100)
        save_png(sheet, Path(run_dir) / SAMPLES_FILE, metadata={"step": str(step)})

    return write


def _model_config(args: TaskArgs, data_cfg: DataConfig, num_classes: int, tokenizer=None) -> DDPMConfig:
    """``[model]`` over the CPU defaults; the data fixes the image size and channels, the labels the
    class count, the tokenizer the caption ids and length."""
    table = dict(args.config.get("model", {}))
    unet = {**SMALL, "image_size": data_cfg.image_size, "in_channels": data_cfg.channels,
            "attention_resolutions": (data_cfg.image_size // 4,), **dict(table.pop("unet", {}) or {})}
    if tokenizer is None:
        unet["num_classes"] = num_classes
        return from_dict(DDPMConfig, {**table, "unet": unet}, "model")
    fixed = {"vocab_size": tokenizer.num_text_tokens, "text_len": tokenizer.text_len}
    for key, value in fixed.items():
        if key in table and table[key] != value:
            raise ConfigError(f"model.{key} = {table[key]} but the caption tokenizer fixes it to {value}; "
                              "remove it from [model]")
    return from_dict(CaptionDDPMConfig, {**table, **fixed, "unet": unet}, "model")


def _caption_tokenizer(args: TaskArgs, task_cfg: DDPMTaskConfig, train_data):
    """The run's own caption BPE on resume, else one learnt on the training captions."""
    from cvformers.text import BPETokenizer, dataset_captions

    saved = Path(args.out) / TOKENIZER_FILE
    if args.resume and saved.is_file():
        return BPETokenizer.load(saved)
    captions = [c for c in dataset_captions(train_data, task_cfg.bpe_train_captions) if c and c.strip()]
    if not captions:
        raise ConfigError("[ddpm] conditional = \"caption\" needs captioned images; this data has no captions")
    text_len = int(args.config.get("model", {}).get("text_len", CaptionDDPMConfig.text_len))
    return BPETokenizer.train(captions, vocab_size=task_cfg.bpe_vocab_size, text_len=text_len)


@register_task("ddpm", tables=("ddpm",))
def ddpm_task(args: TaskArgs) -> TaskSetup:
    """A denoising diffusion model (DDPM / DDIM sampling, classifier-free guidance) on images."""
    from cvformers.train.trainer import train_config_from

    task_cfg = from_dict(DDPMTaskConfig, dict(args.config.get("ddpm", {})), "ddpm")
    saved = dict(args.config.get("model", {}).get("unet", {})) if args.resume else {}
    data_table = args.config.get("data", {})
    digits = (args.data or data_table.get("name") or "").partition(":")[0] in ("mnist", "fashion-mnist")
    # grey 28-px digits and clothes stay grey and 28 px; everything else is 32-px RGB unless [data] says otherwise
    image_size = saved.get("image_size") or data_table.get("image_size") or (28 if digits else 32)
    channels = saved.get("in_channels") or data_table.get("channels") or (1 if digits else 3)
    data_cfg = data_config_from(args, image_size=image_size, channels=channels)
    if task_cfg.conditional == "class":
        train_data = classification_dataset(data_cfg, "train")
        eval_data = classification_dataset(data_cfg, data_cfg.eval_split)
        num_classes = count_classes(data_cfg.name, train_data)
        names = class_names(data_cfg.name, train_data)
    else:
        train_data = build_from_config(data_cfg, "train")
        eval_data = build_from_config(data_cfg, data_cfg.eval_split)
        num_classes, names = 0, None
    if len(train_data) == 0:
        raise ConfigError(f"{data_cfg.name}: the training split is empty")
    tokenizer = _caption_tokenizer(args, task_cfg, train_data) if task_cfg.conditional == "caption" else None
    cfg = _model_config(args, data_cfg, num_classes, tokenizer)
    ema = EMA(EMAConfig(decay=task_cfg.ema_decay), publish=EMA_FILE) if task_cfg.ema_decay > 0 else None
    extra_files, collate_fn, prompts, captions = {}, None, None, None
    if tokenizer is not None:
        from cvformers.text import dataset_captions

        extra_files = {TOKENIZER_FILE: tokenizer.to_bytes()}
        collate_fn = caption_collate(tokenizer)
        shown = eval_data if len(eval_data) else train_data
        captions = dataset_captions(shown, 4)
        prompts = encode_captions(tokenizer, captions)
    model = CaptionDDPM(cfg) if tokenizer is not None else DDPM(cfg)
    return TaskSetup(
        kind="ddpm_caption" if tokenizer is not None else "ddpm", model=model, model_config=cfg,
        train_config=train_config_from(args, default_train_config()),
        train_data=train_data, eval_data=eval_data if len(eval_data) else None, collate=collate_fn,
        extra_config={"data": to_dict(data_cfg), "ddpm": to_dict(task_cfg)}, extra_files=extra_files,
        hooks=[ema] if ema is not None else [],
        on_checkpoint=sample_writer(task_cfg, ema, names=names, prompts=prompts, captions=captions),
    )
