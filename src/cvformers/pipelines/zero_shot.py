"""Zero-shot classification with CLIP (CLIP §3.1.2, §3.1.4).

Each class name is put into one or more prompt templates ("a photo of a {}."); the text
tower embeds every prompt, and a class is represented by the mean of its prompts' normalised
embeddings, normalised again — CLIP's prompt ensembling, computed once per label set. An
image's class probabilities are the softmax of its scaled cosine similarities to the classes.

    clf = ZeroShotClassifier.load("runs/clip", ["circle", "square"], ["a photo of a {}."])
    probs = clf.predict_proba(images)          # [B, K], rows sum to 1
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from cvformers.errors import UserError
from cvformers.images import fit_images, load_images

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def run_templates(source: str | Path) -> list[str]:
    """The templates a CLIP run was trained to read: its ``[text] zero_shot_templates``; for a
    shapes run that does not list them, the shapes wording; otherwise ``DEFAULT_TEMPLATES``
    (weight files, runs on other data)."""
    from cvformers.config import load_toml
    from cvformers.loading import resolve_run

    try:
        config = load_toml(resolve_run(source) / "config.toml")
    except Exception:  # a weight file or a folder without a config: the paper's template
        return list(DEFAULT_TEMPLATES)
    listed = config.get("text", {}).get("zero_shot_templates")
    if listed:
        return check_templates(listed)
    if config.get("data", {}).get("name") == "shapes":
        from cvformers.data.shapes import zero_shot_templates

        return zero_shot_templates()
    return list(DEFAULT_TEMPLATES)


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """"circle, square" or ["circle", "square"] -> ["circle", "square"]; refuses an empty list."""
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    items = [str(s).strip() for s in items if str(s).strip()]
    if not items:
        raise UserError("the label list is empty; give at least one label, e.g. --labels 'circle,square'")
    return items


def check_templates(templates: str | Sequence[str] | None) -> list[str]:
    templates = list(DEFAULT_TEMPLATES) if templates is None else (
        [templates] if isinstance(templates, str) else list(templates))
    if not templates:
        raise UserError("no prompt template; give one such as 'a photo of a {}.'")
    for t in templates:
        if "{}" not in t:
            raise UserError(f"template {t!r} has no '{{}}' where the label goes")
    return templates


# --- images at the edge -----------------------------------------------------------------------
def check_images(paths: Sequence[str | Path]) -> None:
    """Refuse (UserError naming it) the first file that is not a readable image."""
    from PIL import Image

    if not paths:
        raise UserError("no images given")
    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # PIL raises many kinds for a bad file
            raise UserError(f"cannot read image {path}: {type(e).__name__}") from e


# --- the classifier ---------------------------------------------------------------------------
@torch.no_grad()
def class_embeddings(model, tokenizer, labels: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256) -> torch.Tensor:
    """[K, D] unit vectors: per label, the renormalised mean of its prompts' unit embeddings."""
    labels, templates = parse_labels(labels), check_templates(templates)
    prompts = [t.format(label) for label in labels for t in templates]
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(prompts), batch_size):
        text = tokenizer.encode(prompts[i:i + batch_size]).to(device)
        parts.append(model.encode_text(text, normalize=True))
    per_prompt = torch.cat(parts).view(len(labels), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


class ZeroShotClassifier:
    """CLIP + a fixed label set and template ensemble -> class probabilities for images."""

    def __init__(self, model, tokenizer, labels: Sequence[str] | str,
                 templates: Sequence[str] | str | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.labels, self.templates = parse_labels(labels), check_templates(templates)
        self.class_embeddings = class_embeddings(model, tokenizer, self.labels, self.templates)

    @classmethod
    def load(cls, source: str | Path, labels, templates=None, vocab=None, quick_gelu: bool = True,
             device: str = "cpu") -> "ZeroShotClassifier":
        """From a CLIP run folder or an OpenAI / open_clip weight file (see ``load_clip``)."""
        from cvformers.loading import load_clip

        labels = parse_labels(labels)
        templates = run_templates(source) if templates is None else check_templates(templates)  # fail before loading
        model, tokenizer = load_clip(source, vocab=vocab, quick_gelu=quick_gelu, device=device)
        return cls(model, tokenizer, labels, templates)

    @torch.no_grad()
    def logits(self, images: torch.Tensor | Sequence[str | Path]) -> torch.Tensor:
        cfg = self.model.cfg
        if not isinstance(images, torch.Tensor):
            images = load_images(images, cfg.image_size, cfg.in_channels)
        images = fit_images(images, cfg.image_size).to(self.class_embeddings.device)
        features = self.model.encode_image(images, normalize=True)
        return self.model.scale() * features @ self.class_embeddings.t()

    def predict_proba(self, images) -> torch.Tensor:
        """[B, K] probabilities over ``self.labels`` (images: tensor in [0,1] or file paths)."""
        return self.logits(images).softmax(dim=-1)

    def predict(self, images) -> list[str]:
        return [self.labels[i] for i in self.logits(images).argmax(dim=-1).tolist()]


def zero_shot_classify(source: str | Path, labels, images, templates=None, vocab=None,
                       quick_gelu: bool = True) -> tuple[list[str], torch.Tensor]:
    """One call for the CLI: (labels, [B, K] probabilities). Bad input fails before loading."""
    labels = parse_labels(labels)
    templates = None if templates is None else check_templates(templates)  # None: the run's own
    if not isinstance(images, torch.Tensor):
        check_images(images)
    clf = ZeroShotClassifier.load(source, labels, templates, vocab=vocab, quick_gelu=quick_gelu)
    return clf.labels, clf.predict_proba(images)
