"""Caption fidelity of a caption-conditioned DDPM on ``shapes`` (``[ddpm] conditional = "caption"``).

The scenes, captions and checker are those of ``cvformers eval fidelity`` (``cvformers.eval.generation``
and ``cvformers.eval.fidelity``): for each of ``--captions`` scenes of a split, ``--per-caption``
images are drawn from the caption alone (DDIM, ``--steps`` steps, guidance ``--guidance``, EMA
weights, no reranking) and an image counts as faithful when the checker finds every object of
the caption with the right colour, shape, size and position, and nothing else.

    python benchmarks/ddpm_caption_fidelity.py --model runs/ddpm-caption --split test --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch


class _CaptionPipe:
    """The face ``caption_fidelity`` reads (``image_size``, ``generate(caption, num_images, seed)``
    returning ``.images``) over a ``DiffusionPipeline``."""

    def __init__(self, pipe, steps: int, guidance: float):
        self.pipe, self.steps, self.guidance = pipe, steps, guidance
        self.image_size = pipe.model.cfg.unet.image_size

    def generate(self, caption: str, num_images: int, seed: int):
        images = self.pipe.generate(num_images, prompt=caption, seed=seed, steps=self.steps, guidance=self.guidance)
        return SimpleNamespace(images=images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="caption-conditioned ddpm run")
    parser.add_argument("--split", default="test", help="test (training distribution) or heldout (unseen pairs)")
    parser.add_argument("--captions", type=int, default=100)
    parser.add_argument("--per-caption", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cvformers.eval.generation import caption_fidelity
    from cvformers.pipelines.diffusion import DiffusionPipeline

    pipe = _CaptionPipe(DiffusionPipeline.load(args.model), args.steps, args.guidance)
    start = time.perf_counter()
    result = caption_fidelity(pipe, args.split, args.captions, args.per_caption, seed=args.seed)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
