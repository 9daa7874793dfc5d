"""Reranking gain: caption fidelity of CLIP's top-1 of K candidates vs a random candidate.

For each held-out `shapes` caption, DALL-E draws K candidates (no reranker), the shapes
checker (cvformers.eval.fidelity) marks each faithful or not, and CLIP scores them. Printed:
``random`` = mean fidelity over all candidates (the expected fidelity of a random pick),
``clip_top1`` = fidelity of the candidate CLIP scores highest, ``oracle`` = share of
captions with at least one faithful candidate (the ceiling of any reranker), and the gain
``clip_top1 - random`` in points.

    python benchmarks/clip_rerank_gain.py --dalle runs/dalle --clip runs/clip-shapes [--captions 100] [--candidates 32]

``--proxy`` replaces DALL-E by a stand-in generator — each candidate is the caption's own
scene with probability 1/4, else another scene of the same split — to exercise the
reranker without a trained DALL-E (the numbers then say how well CLIP finds the faithful
picture among distractors, not how much it helps DALL-E).
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Callable

import torch

from cvformers.data.shapes import ShapesDataset, render
from cvformers.eval.fidelity import check_image
from cvformers.pipelines.rerank import ClipReranker


def rerank_gain(generate: Callable[[str, int, int], torch.Tensor], reranker: ClipReranker,
                scenes: list[dict], candidates: int) -> dict[str, float]:
    """``generate(caption, k, seed) -> [k, C, H, W]``; ``scenes``: shapes records with captions."""
    random_pick = top1 = oracle = 0.0
    for i, record in enumerate(scenes):
        images = generate(record["caption"], candidates, i)
        ok = torch.tensor([check_image(im, record)["all_correct"] for im in images], dtype=torch.float)
        scores = reranker.score(images, record["caption"])
        random_pick += ok.mean().item()
        top1 += ok[scores.argmax()].item()
        oracle += float(ok.any())
    n = len(scenes)
    return {"captions": n, "candidates": candidates, "random": round(random_pick / n, 4),
            "clip_top1": round(top1 / n, 4), "oracle": round(oracle / n, 4),
            "gain_points": round(100 * (top1 - random_pick) / n, 1)}


def proxy_generator(split: str, image_size: int, pool: int = 500):
    distractors = ShapesDataset(split, image_size=image_size, size=pool, seed=1)
    by_caption: dict[str, dict] = {}

    def generate(caption: str, k: int, seed: int) -> torch.Tensor:
        rng = random.Random(seed)
        own = by_caption[caption]
        out = [render(own, image_size) if rng.random() < 0.25 else distractors[rng.randrange(pool)]["image"]
               for _ in range(k)]
        return torch.stack(out)

    return generate, by_caption


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True, help="CLIP run folder")
    parser.add_argument("--dalle", default=None, help="DALL-E run folder (or --proxy)")
    parser.add_argument("--proxy", action="store_true", help="stand-in generator instead of DALL-E (see above)")
    parser.add_argument("--split", default="heldout", help="shapes split whose captions are used")
    parser.add_argument("--captions", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reranker = ClipReranker.load(args.clip)
    if args.proxy:
        generate, by_caption = proxy_generator(args.split, reranker.model.cfg.image_size)
        image_size = reranker.model.cfg.image_size
    elif args.dalle:
        from cvformers.pipelines.text_to_image import TextToImage

        pipe = TextToImage.load(args.dalle)
        image_size = pipe.vae.image_size

        def generate(caption: str, k: int, seed: int) -> torch.Tensor:
            return pipe.generate(caption, num_images=k, seed=seed).images

        by_caption = {}
    else:
        parser.error("give --dalle RUN or --proxy")
    scenes = [ShapesDataset(args.split, image_size=image_size, size=args.captions).item(i)["record"]
              for i in range(args.captions)]
    for record in scenes:
        by_caption[record["caption"]] = record
    print(json.dumps({"split": args.split, "generator": "proxy" if args.proxy else args.dalle,
                      **rerank_gain(generate, reranker, scenes, args.candidates)}))


if __name__ == "__main__":
    main()
