"""open_clip's factory names for cvformers' CLIP: ``create_model_and_transforms`` and ``get_tokenizer``.

    model, preprocess_train, preprocess = cvformers.create_model_and_transforms("default/clip")
    tokenizer = cvformers.get_tokenizer("default/clip")
    image = preprocess(Image.open("circle.png"))[None]            # [1, C, S, S] in [0, 1]
    text = tokenizer(["a red circle", "a blue square"])
    with torch.no_grad():
        probs = (model.scale() * model.encode_image(image, normalize=True)
                 @ model.encode_text(text, normalize=True).T).softmax(dim=-1)

``name_or_run`` is what ``load_clip`` reads: a shipped part (``default/clip``, ``unclip/clip``), a
CLIP run folder, or an OpenAI / open_clip weight file. One departure from open_clip: the per-channel
mean / std normalisation is inside ``encode_image`` (the model's ``image_mean`` / ``image_std``),
so the transforms return images in [0, 1] — the form every image takes inside cvformers.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from cvformers.config import from_dict, load_toml
from cvformers.errors import UserError
from cvformers.images import load_image, pil_to_tensor, read_image, resize_center_crop
from cvformers.loading import CONFIG, SHIPPED, load_clip, load_text_tokenizer, resolve_run


class ClipImageTransform:
    """A PIL image (or a path) -> ``[channels, size, size]`` in [0, 1], as the model takes it.

    Evaluation: the shorter side scaled to ``size`` and the centred square cut (``images.py``'s rule,
    the one cvformers' training and zero-shot paths use). Training (``train=True``): first a random
    crop of 90-100% of the area with an aspect ratio in [3/4, 4/3], as open_clip's default training
    transform (``RandomResizedCrop(scale=(0.9, 1.0))``), then the same rule.
    """

    def __init__(self, size: int, channels: int = 3, train: bool = False, scale: tuple[float, float] = (0.9, 1.0),
                 seed: int | None = None):
        self.size, self.channels, self.train, self.scale = size, channels, train, scale
        self.rng = random.Random(seed)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """A random (left, top, right, bottom) of ``scale`` of the area, ratio in [3/4, 4/3]; after ten
        misses the whole image (torchvision's RandomResizedCrop draws the same way)."""
        area = width * height
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            ratio = math.exp(self.rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left, top = self.rng.randint(0, width - w), self.rng.randint(0, height - h)
                return left, top, left + w, top + h
        return 0, 0, width, height

    def __call__(self, image: Any) -> torch.Tensor:
        if not self.train:
            return load_image(image, self.size, self.channels)
        if isinstance(image, (str, Path)):
            image = read_image(image, self.channels)
        else:
            image = image.convert("RGB" if self.channels == 3 else "L")
        image = image.crop(self.crop_box(*image.size))
        return pil_to_tensor(resize_center_crop(image, self.size))

    def __repr__(self) -> str:
        return f"ClipImageTransform(size={self.size}, channels={self.channels}, train={self.train})"


class ClipTextTokenizer:
    """open_clip's tokenizer call: ``tokenizer(texts) -> LongTensor[B, context_length]``; the
    wrapped tokenizer's own methods (``encode``, ``decode`` …) stay available."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise UserError("no texts to tokenize")
        return self.tokenizer.encode(texts)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def create_model_and_transforms(name_or_run: str | Path, device: str | torch.device = "cpu",
                                vocab: str | Path | None = None, quick_gelu: bool = True):
    """(CLIP in eval mode, training transform, evaluation transform), as open_clip's function.

    ``vocab`` and ``quick_gelu`` matter only for OpenAI / open_clip weight files (see ``load_clip``).
    """
    model, _ = load_clip(name_or_run, vocab=vocab, quick_gelu=quick_gelu, device=device)
    cfg = model.cfg
    return (model, ClipImageTransform(cfg.image_size, cfg.in_channels, train=True),
            ClipImageTransform(cfg.image_size, cfg.in_channels))


def get_tokenizer(name_or_run: str | Path, vocab: str | Path | None = None) -> ClipTextTokenizer:
    """The caption tokenizer of a CLIP, as open_clip's ``get_tokenizer``: from a run folder or shipped
    part its config alone is read (no weights); a weight file uses CLIP's own BPE."""
    from cvformers.models.clip import CLIPConfig

    text = str(name_or_run)
    path = resolve_run(text) if text.split("/")[0] in SHIPPED else Path(name_or_run)
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise UserError(f"{path} is not a CLIP run folder: {CONFIG} is missing")
        cfg = load_toml(path / CONFIG)
        if cfg.get("kind") != "clip":
            raise UserError(f"{path} holds a {cfg.get('kind')!r} model, not a CLIP")
        return ClipTextTokenizer(load_text_tokenizer(from_dict(CLIPConfig, dict(cfg.get("model", {})), "model"),
                                                     path, vocab))
    if not path.is_file():
        raise UserError(f"CLIP run folder or checkpoint not found: {path}")
    return ClipTextTokenizer(load_clip(path, vocab=vocab)[1])


__all__ = ["ClipImageTransform", "ClipTextTokenizer", "create_model_and_transforms", "get_tokenizer"]
