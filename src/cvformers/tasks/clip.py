"""``cvformers train clip``: CLIP on (image, caption) pairs.

The run folder holds, besides the trainer's files, the text tokenizer the model was trained
with (``tokenizer.json``, cvformers' own BPE) — or, for ``tokenizer = "clip"``, nothing: CLIP's
BPE vocabulary comes from an installed open_clip (see clip_tokenizer.py).

A trained CLIP is read back by ``cvformers.loading.load_clip``.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cvformers.config import ConfigError, from_dict, to_dict
from cvformers.models.clip import CLIP, CLIPConfig, PRESETS
from cvformers.tasks import TaskArgs, TaskSetup, data_config_from, register_task, train_and_eval_data

from cvformers.loading import TOKENIZER_FILE, load_text_tokenizer


@dataclass
class ClipTextConfig:
    """The ``[text]`` table of a CLIP run: how the caption tokenizer is made."""

    bpe_vocab_size: int = 1000  # target vocabulary of cvformers' BPE trained on the train captions
    bpe_train_captions: int = 20000  # at most this many train captions are used to learn the merges
    # Each image is also scored against a caption wrong in one detail (NegCLIP; only `shapes`,
    # whose records say what a scene is): teaches colour-to-object binding and relations.
    hard_negatives: bool = False
    # Each caption is also scored against a picture of its scene wrong in one detail (colour or
    # shape replaced, or the two objects' swapped; only `shapes`, whose renderer draws it): teaches
    # the caption-to-picture ranking among near-identical pictures that reranking candidates needs.
    hard_negative_images: bool = False
    # Share of training captions replaced by a true caption that leaves out object colours
    # (only `shapes`; cvformers.data.shapes.colourless_caption): shape features that cannot lean
    # on the colours a shape was seen in, so unseen colour-shape pairs are read by their shape.
    colourless_captions: float = 0.0
    # Prompt templates `zero-shot` uses with this CLIP when none are given: its own training
    # wording. Empty: filled in from the data (shapes: "a {size} {colour} {}" for every size and
    # colour), else "a photo of a {}.".
    zero_shot_templates: list[str] = field(default_factory=list)


# --- tokenizers -------------------------------------------------------------------------
def train_bpe(captions: list[str], vocab_size: int, context_length: int):
    """cvformers' own BPE (cvformers.text), learnt on the training captions."""
    from cvformers.text import BPETokenizer

    return BPETokenizer.train(captions, vocab_size=vocab_size, text_len=context_length)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Captions -> ids with either tokenizer; long captions are cut silently, as CLIP does
    (the text tower then reads the caption at its last position)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="caption truncated")
        return tokenizer.encode(list(texts))


# --- the training task --------------------------------------------------------------------
def model_config_from(args: TaskArgs) -> CLIPConfig:
    """Preset (--model, default "tiny"), then the TOML [model] table on top (strictly checked)."""
    table = dict(args.config.get("model", {}))
    preset = args.model or table.pop("preset", None) or "tiny"
    if preset not in PRESETS:
        raise ConfigError(f"unknown CLIP preset {preset!r}; known: {', '.join(PRESETS)}")
    return from_dict(CLIPConfig, {**to_dict(replace(CLIPConfig(), **PRESETS[preset])), **table}, "model")


def default_train_config():
    from cvformers.train.trainer import TrainConfig

    # CLIP §2.5 / table 19: AdamW, decoupled weight decay 0.2, beta2 0.98, eps 1e-6 for ViTs,
    # warmup then cosine decay. Batch and steps are sized for a CPU run on `shapes`.
    return TrainConfig(steps=2000, batch_size=128, lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98),
                       eps=1e-6, warmup_steps=100, checkpoint_every=500, eval_every=500, eval_batches=4)


@register_task("clip", tables=("text",))
def clip_task(args: TaskArgs) -> TaskSetup:
    """CLIP on image-caption pairs."""
    from cvformers.data import collate
    from cvformers.train.trainer import train_config_from

    cfg = model_config_from(args)
    data_cfg = data_config_from(args, image_size=cfg.image_size)
    text_cfg = from_dict(ClipTextConfig, dict(args.config.get("text", {})), "text")
    for name in ("hard_negatives", "hard_negative_images"):
        if getattr(text_cfg, name) and data_cfg.name != "shapes":
            raise ConfigError(f"text.{name} needs the shapes data (its scenes say what a wrong caption or picture "
                              f"is), not {data_cfg.name!r}: set {name} = false")
    if not 0.0 <= text_cfg.colourless_captions <= 1.0:
        raise ConfigError(f"text.colourless_captions is a share between 0 and 1, got {text_cfg.colourless_captions}")
    if text_cfg.colourless_captions and data_cfg.name != "shapes":
        raise ConfigError(f"text.colourless_captions needs the shapes data (its scenes say what each object is), "
                          f"not {data_cfg.name!r}: set colourless_captions = 0")
    if not text_cfg.zero_shot_templates and data_cfg.name == "shapes":
        from cvformers.data.shapes import zero_shot_templates

        text_cfg = replace(text_cfg, zero_shot_templates=zero_shot_templates())
    train_data, eval_data = train_and_eval_data(data_cfg)
    bpe_data = train_data  # merges are learnt from the full captions (a colourless one uses no new word)
    if text_cfg.colourless_captions:
        train_data = ColourlessCaptions(train_data, text_cfg.colourless_captions)

    extra_files: dict[str, bytes] = {}
    if cfg.tokenizer == "clip":
        tokenizer = load_text_tokenizer(cfg)
        cfg = replace(cfg, vocab_size=tokenizer.vocab_size, real_vocab_size=0, text_pool="argmax")
    else:
        saved = Path(args.out) / TOKENIZER_FILE
        if args.resume and saved.is_file():
            tokenizer = load_text_tokenizer(cfg, args.out)
        else:
            tokenizer = train_bpe(_captions(bpe_data, text_cfg.bpe_train_captions),
                                  text_cfg.bpe_vocab_size, cfg.context_length)
        # per-position pad ids vocab_size + i live in the same embedding table (DALL-E §2.2)
        cfg = replace(cfg, vocab_size=tokenizer.vocab_size + cfg.context_length,
                      real_vocab_size=tokenizer.vocab_size, text_pool="first_pad")
        extra_files[TOKENIZER_FILE] = tokenizer.to_bytes()

    def clip_collate(items: list[dict]) -> dict:
        batch = collate(items)
        batch["text"] = tokenize(tokenizer, batch["caption"])
        if text_cfg.hard_negatives:
            from cvformers.data.shapes import hard_negative_caption

            # seeded by the caption: the same item gets the same negative in every epoch and on resume
            batch["negative_text"] = tokenize(tokenizer, [hard_negative_caption(r, random.Random(c))
                                                          for r, c in zip(batch["record"], batch["caption"])])
        if text_cfg.hard_negative_images:
            from cvformers.data.shapes import hard_negative_image

            # seeded by the caption, as the negative caption; grey like the batch's images when they are
            pictures = torch.stack([hard_negative_image(r, random.Random(f"image/{c}"))
                                    for r, c in zip(batch["record"], batch["caption"])])
            batch["negative_image"] = pictures.mean(1, keepdim=True) if batch["image"].shape[1] == 1 else pictures
        return batch

    defaults = default_train_config()
    model = CLIP(cfg)
    if cfg.init_from and not args.resume:  # a resumed run has its own weights
        from cvformers.tasks.transfer import init_backbone_from

        if cfg.image_encoder == "vit":
            raise ConfigError("model.init_from needs a registry image tower (image_encoder = a preset name such as "
                              "'vit_nano_patch4_32'); CLIP's own 'vit' keeps OpenAI's layout")
        from cvformers.models.vision import PRESETS

        init_backbone_from(model.visual.trunk, PRESETS[cfg.image_encoder][0], cfg.init_from)
    return TaskSetup(
        kind="clip", model=model, model_config=cfg, train_config=train_config_from(args, defaults),
        train_data=train_data, eval_data=eval_data, collate=clip_collate,
        extra_config={"data": to_dict(data_cfg), "text": to_dict(text_cfg)}, extra_files=extra_files,
    )


class ColourlessCaptions(torch.utils.data.Dataset):
    """Training items of which a fixed ``share`` (chosen per index, the same in every epoch and on
    resume) carry a caption without object colours in place of their own."""

    def __init__(self, data, share: float):
        self.data, self.share = data, share

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        from cvformers.data.shapes import colourless_caption

        item = self.data[index]
        rng = random.Random(f"colourless/{index}")
        if rng.random() < self.share:
            item = {**item, "caption": colourless_caption(item["record"], rng)}
        return item


def _captions(dataset, limit: int) -> list[str]:
    if hasattr(dataset, "captions"):
        return list(dataset.captions(limit))
    return [dataset[i]["caption"] for i in range(min(limit, len(dataset)))]

