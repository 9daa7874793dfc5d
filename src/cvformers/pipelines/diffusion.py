"""Images from a trained diffusion run: ``DiffusionPipeline.load(RUN).generate(...)``.

    pipe = DiffusionPipeline.load("runs/ddpm")                       # the EMA weights when the run has them
    images = pipe.generate(16, DiffusionSamplingConfig(steps=50, guidance=3.0), labels=torch.tensor([3] * 16))

A run written by ``cvformers train ddpm`` holds the raw weights (``model.safetensors``) and their
exponential moving average (``ema.safetensors``); the papers sample from the average, and so
does this pipeline unless ``use_ema=False``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cvformers.diffusion.model import DDPM, EMA_FILE
from cvformers.diffusion.samplers import DiffusionSamplingConfig
from cvformers.errors import UserError
from cvformers.loading import load_run, load_weights, resolve_run

MAX_IMAGES = 1024  # one call; each image costs `steps` U-Net forwards


class DiffusionPipeline:
    def __init__(self, model: DDPM, sampling: DiffusionSamplingConfig | None = None):
        self.model = model.eval()
        self.sampling = sampling or DiffusionSamplingConfig()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> "DiffusionPipeline":
        run = resolve_run(path)
        model, cfg = load_run(run, device)
        if cfg.get("kind") != "ddpm":
            raise UserError(f"{run} holds a {cfg.get('kind')!r} model, not a ddpm")
        if use_ema and (run / EMA_FILE).is_file():
            load_weights(model, run / EMA_FILE)
        return cls(model)

    def generate(self, num_images: int = 16, sampling: DiffusionSamplingConfig | None = None,
                 labels: torch.Tensor | list[int] | int | None = None, progress: bool = False,
                 **settings) -> torch.Tensor:
        """[num_images, C, H, W] in [0, 1]. ``labels``: one class for all, or one per image."""
        from dataclasses import replace

        s = sampling or self.sampling
        s = replace(s, **{k: v for k, v in settings.items() if v is not None})
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= MAX_IMAGES:
            raise UserError(f"number of images must be between 1 and {MAX_IMAGES}, got {num_images}")
        if s.sampler == "ddim" and s.steps > self.model.cfg.num_steps:
            raise UserError(f"--steps {s.steps} is more than the {self.model.cfg.num_steps} steps the model was trained with")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).flatten()
            if len(labels) == 1:
                labels = labels.expand(num_images)
            if len(labels) != num_images:
                raise UserError(f"give one label or one per image ({num_images}), got {len(labels)}")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = lambda steps: tqdm(steps, desc="sampling", unit="step", leave=False, disable=not sys.stderr.isatty())  # noqa: E731
        return self.model.sample(num_images, s, labels=labels, progress=bar).cpu()
