"""What each tab does, without Gradio: check the inputs against the ``ServeConfig`` limits, call
the library, hand back plain values (PIL images, captions, file paths, table rows).

A refused input raises ``UserError`` (or the library's ``ConfigError``) with the sentence the page
shows. Loaded models are kept in one ``Models`` object so each is read from disk once.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cvformers.config import load_toml
from cvformers.errors import UserError
from cvformers.loading import resolve_run
from cvformers.serve.config import GENERATOR_KINDS, UPLOAD_SUFFIXES, ServeConfig

Progress = Callable[[int, int], None]  # (steps done, steps in total)


def generator_class(model: str) -> type:
    """The pipeline class that draws with run ``model``, chosen by the ``kind`` of its config."""
    run = resolve_run(model)
    config = run / "config.toml"
    if not config.is_file():
        raise UserError(f"{model}: no config.toml, so not a run folder or bundle")
    kind = load_toml(config).get("kind")
    if kind not in GENERATOR_KINDS:
        raise UserError(f"{model} holds a {kind!r} model; the text-to-image tab draws with: "
                        f"{', '.join(GENERATOR_KINDS)}")
    module, name = GENERATOR_KINDS[kind]
    return getattr(importlib.import_module(module), name)


class Models:
    """The models the page uses, each loaded on first use and then kept (one lock: two requests
    never load the same model twice)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str], Any] = {}
        self.kinds = {model: generator_class(model) for model in cfg.models}  # a bad --model fails at start

    def _get(self, role: str, name: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            if (role, name) not in self._loaded:
                self._loaded[role, name] = load()
            return self._loaded[role, name]

    def generator(self, model: str):
        if model not in self.kinds:
            raise UserError(f"unknown model {model!r}; this page serves: {', '.join(self.kinds)}")
        return self._get("generator", model, lambda: self.kinds[model].load(model))

    def clip(self):
        from cvformers.loading import load_clip

        return self._get("clip", self.cfg.clip, lambda: load_clip(self.cfg.clip))

    def classifier(self, run: str):
        from cvformers.pipelines.attention import load_classifier

        if run not in self.cfg.classifiers:
            raise UserError(f"unknown classifier {run!r}; this page serves: {', '.join(self.cfg.classifiers)}")
        return self._get("classifier", run, lambda: load_classifier(run))


def image_rows(pipe) -> int:
    """Rows of image ids a generator samples (the range of the image-prompt tab's slider): a
    DALL-E's grid side; 8, the shipped model's, for a generator that does not say."""
    cfg = getattr(getattr(pipe, "model", None), "cfg", None)
    return int(getattr(cfg, "grid_size", 8))


# --- parsing the form's values ------------------------------------------------------------------


def whole_number(value: Any, name: str, low: int, high: int | None = None) -> int:
    """A form number (Gradio sends floats) as an int in [low, high], or a UserError naming the field."""
    if isinstance(value, bool) or value is None or value == "":
        raise UserError(f"{name} must be a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond any float
        raise UserError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if number < low or (high is not None and number > high):
        raise UserError(f"{name} must be between {low} and {high}, got {int(number)}" if high is not None
                        else f"{name} must be at least {low}, got {int(number)}")
    return int(number)


def real_number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{name} must be a number, got {value!r}") from None


def check_prompt(prompt: Any, cfg: ServeConfig) -> str:
    if not isinstance(prompt, str):
        raise UserError("the prompt must be text")
    if len(prompt) > cfg.max_prompt_chars:
        raise UserError(f"the prompt is {len(prompt)} characters long; the limit is {cfg.max_prompt_chars}")
    return prompt  # an empty one is refused by the pipeline, in its own words


def check_upload(path: Any, cfg: ServeConfig) -> Path:
    """An uploaded file: an image of an accepted type, size and pixel count, or a UserError."""
    from PIL import Image

    if path is None or path == "":
        raise UserError("upload an image first")
    path = Path(path if isinstance(path, (str, Path)) else getattr(path, "name", path))  # a path or a temp-file object
    shown = path.name
    if path.suffix.lower() not in UPLOAD_SUFFIXES:
        raise UserError(f"{shown}: not an accepted image type ({', '.join(UPLOAD_SUFFIXES)})")
    if not path.is_file():
        raise UserError(f"{shown}: the upload did not arrive")
    if path.stat().st_size > cfg.max_upload_bytes:
        raise UserError(f"{shown} is {path.stat().st_size / 2**20:.1f} MB; the limit is {cfg.max_upload_mb:g} MB")
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as e:  # PIL raises many kinds for a bad file
        raise UserError(f"{shown} is not a readable image ({type(e).__name__})") from None
    if max(size) > cfg.max_image_side:
        raise UserError(f"{shown} is {size[0]}x{size[1]} pixels; the limit is {cfg.max_image_side} a side")
    return path


# --- the tabs -------------------------------------------------------------------------------------


@dataclass
class Drawn:
    """What the text-to-image and image-prompt tabs show: the images with a caption each, and the
    grid PNG offered for download (prompt and settings in its metadata)."""

    images: list  # PIL images, best first
    captions: list[str]  # under each image: its CLIP score when reranked
    grid: Path  # the picture of all of them


class Outputs:
    """The folder of downloadable grids; files older than ``keep_outputs_minutes`` are removed as
    new ones arrive, so a long-running server does not fill its disk."""

    def __init__(self, folder: Path, cfg: ServeConfig):
        self.folder, self.cfg = Path(folder), cfg
        self.folder.mkdir(parents=True, exist_ok=True)

    def new_path(self, stem: str) -> Path:
        cutoff = time.time() - 60 * self.cfg.keep_outputs_minutes
        for old in self.folder.iterdir():
            if old.is_file() and old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        return self.folder / f"{stem}-{uuid.uuid4().hex[:8]}.png"


def _drawn(result, cfg: ServeConfig, outputs: Outputs) -> Drawn:
    from cvformers.images import to_pil, upscale
    from cvformers.pipelines.text_to_image import prompt_slug

    tiles = upscale(result.images, cfg.tile_size)
    if result.scores is None:
        captions = [f"#{i + 1}" for i in range(len(tiles))]
    else:
        captions = [f"#{i + 1}  CLIP {float(s):.3f}" for i, s in enumerate(result.scores)]
    grid = result.save_grid(outputs.new_path(prompt_slug(result.prompt)), min_tile=cfg.tile_size)
    return Drawn([to_pil(t) for t in tiles], captions, grid)


def text_to_image(models: Models, outputs: Outputs, prompt: Any, model: str, num_images: Any, candidates: Any,
                  seed: Any, temperature: Any, top_k: Any, top_p: Any, guidance: Any,
                  progress: Progress | None = None) -> Drawn:
    """The text-to-image tab: ``num_images`` of ``candidates`` (0: no reranking) for one prompt."""
    cfg = models.cfg
    prompt = check_prompt(prompt, cfg)
    num_images = whole_number(num_images, "number of images", 1, cfg.max_images)
    candidates = whole_number(candidates, "candidates", 0, cfg.max_candidates)
    seed = None if seed is None or seed == "" else whole_number(seed, "seed", 0, 2**63 - 1)
    pipe = models.generator(model)
    settings = {"candidates": candidates, "seed": seed, "temperature": real_number(temperature, "temperature"),
                "top_k": whole_number(top_k, "top-k", 0), "top_p": real_number(top_p, "top-p"),
                "guidance": real_number(guidance, "guidance")}
    # each generator takes the settings its sampling config has (unCLIP: no temperature / top-k / top-p)
    known = {f.name for f in dataclasses.fields(pipe.sampling)}
    if "progress" in inspect.signature(pipe.generate).parameters:
        settings["progress"], known = progress, known | {"progress"}
    result = pipe.generate(prompt, num_images=num_images, **{k: v for k, v in settings.items() if k in known})
    return _drawn(result, cfg, outputs)


def image_prompt(models: Models, outputs: Outputs, image: Any, prompt: Any, model: str, rows: Any,
                 num_images: Any, seed: Any, progress: Progress | None = None) -> Drawn:
    """The image-prompt tab (DALL-E §3.3): keep the top ``rows`` rows of the image's ids, sample the rest."""
    cfg = models.cfg
    path = check_upload(image, cfg)
    prompt = check_prompt(prompt, cfg)
    num_images = whole_number(num_images, "number of images", 1, cfg.max_images)
    seed = None if seed is None or seed == "" else whole_number(seed, "seed", 0, 2**63 - 1)
    pipe = models.generator(model)
    result = pipe.generate(prompt, num_images=num_images, image_prompt=path,
                           prompt_rows=whole_number(rows, "rows kept", 0), seed=seed, progress=progress)
    return _drawn(result, cfg, outputs)


def zero_shot(models: Models, files: Any, labels: Any, templates: Any) -> list[dict]:
    """The zero-shot tab: one row per (image, label) with CLIP's probability, images in upload order."""
    from cvformers.pipelines.zero_shot import ZeroShotClassifier, parse_labels

    cfg = models.cfg
    files = [files] if isinstance(files, (str, Path)) else list(files or [])
    if not files:
        raise UserError("upload at least one image")
    if len(files) > cfg.max_uploads:
        raise UserError(f"{len(files)} images; the limit is {cfg.max_uploads} per request")
    paths = [check_upload(f, cfg) for f in files]
    labels = parse_labels(labels if isinstance(labels, str) else "")
    if len(labels) > cfg.max_labels:
        raise UserError(f"{len(labels)} labels; the limit is {cfg.max_labels}")
    lines = [t.strip() for t in (templates or "").splitlines() if t.strip()]
    if not lines:
        raise UserError("give a template such as 'a picture of a {}' (one a line for an ensemble)")
    model, tokenizer = models.clip()
    classifier = ZeroShotClassifier(model, tokenizer, labels, lines)
    probabilities = classifier.predict_proba(paths)
    return [{"image": f"{i + 1}: {p.name}", "label": label, "probability": float(probabilities[i, k])}
            for i, p in enumerate(paths) for k, label in enumerate(classifier.labels)]


def attention(models: Models, image: Any, classifier: str):
    """The attention tab: per-head maps, the patch-to-patch matrices and the rollout, as one PIL image."""
    from cvformers.pipelines.attention import attention_picture

    model = models.classifier(classifier)
    path = check_upload(image, models.cfg) if model.cfg.family == "vit" or image else None
    return attention_picture(model, path).render()
