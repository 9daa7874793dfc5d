"""The diffusers face of the generator pipelines (``TextToImage``, ``UnCLIP``).

    pipe = TextToImage.from_pretrained("default")        # a shipped name or a bundle / run folder
    out = pipe(["a red circle", "a blue square"], num_images_per_prompt=4,
               generator=torch.Generator().manual_seed(0))
    out.images                                            # 8 PIL images, prompt by prompt
    pipe.to("cpu").save_pretrained("my-bundle")           # a loadable bundle with a model card

The names and their meaning are diffusers' ``DiffusionPipeline``: ``from_pretrained``, a call that
returns an output with ``.images``, ``to(device)`` returning the pipeline, ``save_pretrained``; the
same generator state gives the same images. ``save_pretrained`` writes through the bundle writer of
``cvformers bundle`` (``pipelines/bundle.py``), so it replaces only a bundle and swaps it in whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from cvformers.config import ConfigError, dumps_toml, load_toml, to_dict
from cvformers.errors import UserError
from cvformers.nn.layers import count_parameters
from cvformers.pipelines.bundle import LAST_EVAL_KEY, BundlePart, last_evaluation, write_bundle

CARD = "README.md"  # the model card inside a saved bundle


@dataclass
class ImagePipelineOutput:
    """What a pipeline call returns (diffusers' ``ImagePipelineOutput`` plus the scores).

    It is also a sequence of its images: ``len(out)``, ``out[0]`` and ``for im in out`` work as on
    the list of images."""

    images: list  # PIL images; for a list of prompts, the first prompt's images first
    scores: torch.Tensor | None  # CLIP score of each image (best first within a prompt); None without a CLIP
    prompts: list[str]  # the prompt of each image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]

    def __iter__(self) -> Iterator:
        return iter(self.images)


@dataclass
class PartRecord:
    """What a pipeline keeps of the folder a part came from, for writing it back."""

    config: dict[str, Any]  # the part's config.toml as read (train, data … tables)
    evaluation: dict[str, Any] | None  # see ``last_evaluation``


def read_part(folder: Path) -> PartRecord:
    config: dict[str, Any] = {}
    if (folder / "config.toml").is_file():
        try:
            config = load_toml(folder / "config.toml")
        except ConfigError:  # loading the part itself has already accepted or refused this file
            config = {}
    return PartRecord(config, last_evaluation(folder))


class PretrainedPipeline:
    """The shared diffusers-style methods. A pipeline class provides ``load``,
    ``generate(prompt, num_images, sampling, generator=…, **settings) -> Generation``, ``modules()``
    (its models, by part folder) and ``bundle_parts()``."""

    bundle_layout = "dalle"  # which bundle layout save_pretrained writes (pipelines/bundle.py)
    # diffusers' keyword -> the sampling field it sets, where the pipeline has one
    diffusers_settings = {"guidance_scale": "guidance"}
    title = "cvformers pipeline"  # the model card's heading
    parts_record: dict[str, PartRecord]  # part folder -> what it came with; set by ``load``

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, device: str | torch.device = "cpu", **kwargs):
        """Load a shipped model by name or a bundle / run folder (diffusers' name for ``load``)."""
        return cls.load(path_or_name, device=device, **kwargs)

    def remember_parts(self, folders: dict[str, Path]) -> None:
        """Keep each part's config tables and last evaluation (called by ``load``)."""
        self.parts_record = {rel: read_part(folder) for rel, folder in folders.items()}

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def bundle_parts(self) -> list[BundlePart]:
        raise NotImplementedError

    def to(self, device: str | torch.device):
        """Move every model to ``device``; returns the pipeline (as diffusers' ``to``)."""
        for module in self.modules().values():
            module.to(device)
        return self

    def __call__(self, prompt: str | Sequence[str], num_images_per_prompt: int | None = None, sampling=None, *,
                 generator: torch.Generator | None = None, num_images: int | None = None,
                 return_scores: bool = False, **settings) -> ImagePipelineOutput:
        """Images for one prompt or a list of prompts, ``num_images_per_prompt`` each (default 1).

        ``generator`` (a ``torch.Generator``) draws all the noise, prompt after prompt; without it the
        sampling seed is used. ``num_images`` is the same as ``num_images_per_prompt``; ``settings``
        change single sampling fields (``guidance=2.0``, or by diffusers' names ``guidance_scale``
        and, for diffusion, ``num_inference_steps``). With ``return_scores`` the result is the pair
        (list of PIL images, scores) instead of an ``ImagePipelineOutput``.
        """
        if num_images is not None and num_images_per_prompt is not None:
            raise UserError("give num_images_per_prompt or num_images, not both")
        for name, field_name in self.diffusers_settings.items():
            if name in settings:
                if settings.get(field_name) is not None:
                    raise UserError(f"give {name} or {field_name}, not both")
                settings[field_name] = settings.pop(name)
        per_prompt = num_images_per_prompt if num_images_per_prompt is not None else num_images
        per_prompt = 1 if per_prompt is None else per_prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)):
            prompts = list(prompt)
        else:
            raise UserError(f"the prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if not prompts:
            raise UserError("the prompt list is empty; give at least one prompt")
        for i, text in enumerate(prompts):  # all refused before any is drawn
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"prompt {i + 1} of {len(prompts)} is empty: {text!r}")
        results = [self.generate(p, per_prompt, sampling, generator=generator, **settings) for p in prompts]
        images = [image for result in results for image in result.pil()]
        scores = None
        if all(result.scores is not None for result in results):
            scores = torch.cat([result.scores for result in results])
        if return_scores:
            return images, scores
        return ImagePipelineOutput(images, scores, [r.prompt for r in results for _ in range(len(r.images))])

    def part(self, rel: str, model: nn.Module, files: dict[str, bytes] | None = None,
             tables: dict[str, Any] | None = None) -> BundlePart:
        """A bundle part for ``model``: kind and ``[model]`` from the model itself, the other tables
        (train, data …) as the part was loaded, then ``tables``; its last evaluation in the weights."""
        from cvformers.registry import kind_of

        record = getattr(self, "parts_record", {}).get(rel, PartRecord({}, None))
        config = {"kind": kind_of(model), "model": to_dict(model.cfg)}
        config.update({k: v for k, v in record.config.items() if k not in config})
        config.update(tables or {})
        metadata = {LAST_EVAL_KEY: json.dumps(record.evaluation, sort_keys=True)} if record.evaluation else {}
        return BundlePart(rel, model, {"config.toml": dumps_toml(config).encode(), **(files or {})}, metadata)

    def save_pretrained(self, save_directory: str | Path, half: bool = False) -> Path:
        """Write the pipeline as a bundle that ``from_pretrained`` loads, with a model card
        (``README.md``). ``half`` stores the weights as fp16 (as the shipped bundles are)."""
        parts = self.bundle_parts()
        root = next(p for p in parts if p.rel == "")
        root.files[CARD] = self.model_card(parts).encode()
        return write_bundle(save_directory, parts, self.bundle_layout, half=half)

    # --- the model card ---------------------------------------------------------------------
    def card_limits(self) -> list[str]:
        return []

    def model_card(self, parts: list[BundlePart]) -> str:
        """A README stating what the bundle knows of itself: its parts, the data and steps each
        was trained with, the last evaluation each training logged, the sampling defaults and
        the limits. Quality figures that are not stored are pointed to, never written here."""
        from cvformers.registry import kind_of

        cls = type(self).__name__
        modules = self.modules()
        lines = [f"# {self.title}", "",
                 f"A cvformers bundle: `{cls}.from_pretrained(\"PATH\")` loads it.", "",
                 "```python", "import torch",
                 f"from {type(self).__module__} import {cls}", "",
                 f"pipe = {cls}.from_pretrained(\"PATH\")",
                 "out = pipe(\"a red circle\", num_images_per_prompt=4, generator=torch.Generator().manual_seed(0))",
                 "out.images  # PIL images", "```", "",
                 "## Parts", "",
                 "| part | kind | parameters | training data | training steps | last evaluation logged by training |",
                 "| --- | --- | ---: | --- | ---: | --- |"]
        records = getattr(self, "parts_record", {})
        for part in parts:
            if part.model is None:
                continue
            record = records.get(part.rel, PartRecord({}, None))
            data = record.config.get("data", {})
            data_text = f"{data['name']}, {data['image_size']} px" if {"name", "image_size"} <= set(data) else "not recorded"
            steps = record.config.get("train", {}).get("steps", "not recorded")
            evaluation = "none stored"
            if record.evaluation:
                figures = ", ".join(f"{k} {v:.4g}" for k, v in record.evaluation.items()
                                    if k not in ("step", "split") and isinstance(v, (int, float)))
                evaluation = f"step {record.evaluation.get('step', '?')}: {figures}"
            lines.append(f"| {part.rel or '(root)'} | {kind_of(part.model)} | "
                         f"{count_parameters(modules[part.rel]) / 1e6:.2f}M | {data_text} | {steps} | {evaluation} |")
        lines += ["", "## Sampling defaults", "",
                  ", ".join(f"`{k} = {v}`" for k, v in to_dict(self.sampling).items()), "",
                  "## Measured figures", "",
                  "The table above holds what the bundle stores: the last evaluation each part's training "
                  "run logged (on its evaluation split). Quality figures of generation (caption fidelity, "
                  "the gain of CLIP reranking) are not stored in a bundle: for the shipped `default` and "
                  "`unclip` bundles they are in cvformers' docs/results.md with the commands that measure "
                  "them; for this bundle, measure them with `cvformers eval fidelity --model PATH`.", "",
                  "## Limits", ""]
        lines += [f"- {limit}" for limit in self.card_limits()]
        return "\n".join(lines) + "\n"


def text_tokenizer_files(tokenizer) -> dict[str, bytes]:
    """``tokenizer.json`` of a trained caption BPE; nothing for CLIP's own BPE (it ships with its vocabulary)."""
    return {"tokenizer.json": tokenizer.to_bytes()} if hasattr(tokenizer, "to_bytes") else {}


__all__ = ["ImagePipelineOutput", "PretrainedPipeline"]
