"""Images from a trained diffusion run: ``DiffusionPipeline.load(RUN).generate(...)``.

    pipe = DiffusionPipeline.load("runs/ddpm")                       # the EMA weights when the run has them
    images = pipe.generate(16, DiffusionSamplingConfig(steps=50, guidance=3.0), labels=torch.tensor([3] * 16))
    pipe = DiffusionPipeline.load("runs/ddpm-text")                  # a caption-conditioned run
    images = pipe.generate(8, prompt="a red circle above a blue square", guidance=3.0)

A run written by ``cvformers train ddpm`` holds the raw weights (``model.safetensors``) and their
exponential moving average (``ema.safetensors``); the papers sample from the average, and so
does this pipeline unless ``use_ema=False``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from cvformers.diffusion.caption import CaptionDDPM
from cvformers.diffusion.model import DDPM, EMA_FILE
from cvformers.diffusion.samplers import DiffusionSamplingConfig
from cvformers.errors import UserError
from cvformers.loading import TOKENIZER_FILE, load_run, load_weights, resolve_run
from cvformers.pipelines.text_to_image import UnknownWords

MAX_IMAGES = 1024  # one call; each image costs `steps` U-Net forwards
KINDS = ("ddpm", "ddpm_caption")


class DiffusionPipeline:
    def __init__(self, model: DDPM, sampling: DiffusionSamplingConfig | None = None, tokenizer=None):
        self.model = model.eval()
        self.sampling = sampling or DiffusionSamplingConfig()
        self.tokenizer = tokenizer  # the caption BPE of a caption-conditioned run, else None

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
             compile: bool = False) -> "DiffusionPipeline":
        """The run's model (EMA weights unless ``use_ema=False``). ``compile``: run the U-Net through
        ``torch.compile`` (the first call then compiles, which takes tens of seconds on a CPU)."""
        run = resolve_run(path)
        model, cfg = load_run(run, device)
        if cfg.get("kind") not in KINDS:
            raise UserError(f"{run} holds a {cfg.get('kind')!r} model, not a ddpm")
        if use_ema and (run / EMA_FILE).is_file():
            load_weights(model, run / EMA_FILE)
        tokenizer = None
        if isinstance(model, CaptionDDPM):
            from cvformers.text import BPETokenizer

            tokenizer = BPETokenizer.load(run / TOKENIZER_FILE)
        if compile:
            model.unet.compile()
        return cls(model, tokenizer=tokenizer)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Caption ids [1, text_len] of a prompt; a prompt with words the captions never held draws
        something else, which an ``UnknownWords`` warning says."""
        if self.tokenizer is None:
            raise UserError("this model was not trained on captions: --prompt needs a run trained with "
                            "[ddpm] conditional = \"caption\"")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("the prompt is empty")
        text = self.tokenizer.encode(prompt)
        unknown = self.tokenizer.unknown_words(prompt)
        if unknown:
            warnings.warn(f"the model never learnt the word(s) {', '.join(repr(w) for w in unknown)}: "
                          "expect something else", UnknownWords, stacklevel=3)
        if bool((text >= self.tokenizer.vocab_size).all()):
            raise UserError(f"the prompt {prompt!r} tokenizes to nothing but padding")
        return text

    def generate(self, num_images: int = 16, sampling: DiffusionSamplingConfig | None = None,
                 labels: torch.Tensor | list[int] | int | None = None, progress: bool = False,
                 prompt: str | None = None, **settings) -> torch.Tensor:
        """[num_images, C, H, W] in [0, 1]. ``labels``: one class for all, or one per image;
        ``prompt``: the caption of every image (caption-conditioned runs; None: unconditional)."""
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
        if isinstance(self.model, CaptionDDPM) and labels is not None:
            raise UserError("this model was trained on captions, not classes: give --prompt, not --label")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = lambda steps: tqdm(steps, desc="sampling", unit="step", leave=False, disable=not sys.stderr.isatty())  # noqa: E731
        if isinstance(self.model, CaptionDDPM):
            text = None if prompt is None else self.encode_prompt(prompt).expand(num_images, -1)
            return self.model.sample(text, num_images, s, progress=bar).cpu()
        if prompt is not None:
            self.encode_prompt(prompt)  # says why a prompt cannot be used here
        return self.model.sample(num_images, s, labels=labels, progress=bar).cpu()
