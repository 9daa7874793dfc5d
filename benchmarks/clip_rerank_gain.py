"""Reranking gain: caption fidelity of CLIP's top-1 of K candidates vs a random candidate.

For each held-out `shapes` caption, DALL-E draws K candidates (no reranker), the shapes
checker (cvformers.eval.fidelity) marks each faithful or not, and CLIP scores them. Printed:
``random`` = mean fidelity over all candidates (the expected fidelity of a random pick),
``clip_top1`` = fidelity of the candidate CLIP scores highest, ``oracle`` = share of
captions with at least one faithful candidate (the ceiling of any reranker), and the gain
``clip_top1 - random`` in points.

    python benchmarks/clip_rerank_gain.py --dalle runs/dalle --clip runs/clip-shapes [--captions 100] [--candidates 32]
    python benchmarks/clip_rerank_gain.py --dalle default --clip runs/a,runs/b --cache runs/heldout_candidates.pt
    python benchmarks/clip_rerank_gain.py --dalle default --clip ... --temperature 1 --guidance 1   # plainer sampling
    python benchmarks/clip_rerank_gain.py --unclip unclip --steps 25 --clip unclip/clip,default/clip --candidates 16

``--unclip MODEL`` draws the candidates with an unCLIP bundle or run instead of DALL-E (its
decoder's DDIM ``--steps``, the bundle's other sampling settings).

``--cache FILE`` keeps the candidates and the checker's verdicts: the first run draws and saves
them, later runs (with the same split, captions, candidates and seed) load them, so several
CLIPs (comma-separated ``--clip``) are compared on exactly the same pictures in seconds. The
candidates are those of ``cvformers eval fidelity --rerank K`` (the same seeds), so the figures
match that command's. ``--show-misses DIR`` draws, for each CLIP, the captions it misses: the
candidate it kept (left) beside the faithful one it scored highest (right), to see whether a miss
is the reranker's or the checker's.

``--proxy`` replaces DALL-E by a stand-in generator — each candidate is the caption's own
scene with probability 1/4, else another scene of the same split — to exercise the
reranker without a trained DALL-E (the numbers then say how well CLIP finds the faithful
picture among distractors, not how much it helps DALL-E).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

import torch

from cvformers.data.shapes import ShapesDataset, render
from cvformers.eval.fidelity import check_image
from cvformers.pipelines.rerank import ClipReranker


def draw_candidates(generate: Callable[[str, int, int], torch.Tensor], scenes: list[dict],
                    candidates: int) -> dict:
    """``generate(caption, k, seed) -> [k, C, H, W]`` for every scene (seed = its index), with the
    checker's verdict on each: {"images": [n, k, C, H, W], "ok": [n, k], "captions": [...]}."""
    images, ok = [], []
    for i, record in enumerate(scenes):
        drawn = generate(record["caption"], candidates, i)
        images.append(drawn)
        ok.append(torch.tensor([check_image(im, record)["all_correct"] for im in drawn], dtype=torch.float))
    return {"images": torch.stack(images), "ok": torch.stack(ok), "captions": [r["caption"] for r in scenes]}


def candidate_scores(drawn: dict, reranker: ClipReranker) -> torch.Tensor:
    """[n, k]: the reranker's score of every candidate for its caption."""
    return torch.stack([reranker.score(images, caption) for images, caption in zip(drawn["images"], drawn["captions"])])


def misses_grid(drawn: dict, scores: torch.Tensor) -> torch.Tensor | None:
    """One row per caption whose kept candidate fails the checker: the kept candidate, then the
    best-scored faithful one (a black square when there is none). [3, rows·H, 2·W] or None."""
    rows = []
    for images, ok, s in zip(drawn["images"], drawn["ok"], scores):
        kept = int(s.argmax())
        if ok[kept]:
            continue
        faithful = torch.where(ok == 1)[0]
        best = images[faithful[s[faithful].argmax()]] if len(faithful) else torch.zeros_like(images[kept])
        rows.append(torch.cat([images[kept], best], dim=-1))
    return torch.cat(rows, dim=-2) if rows else None


def rerank_gain(drawn: dict, scores: torch.Tensor) -> dict[str, float]:
    """Fidelity of a random candidate, of the reranker's top-1, and of the best (oracle)."""
    ok = drawn["ok"]
    top1 = ok.gather(1, scores.argmax(1, keepdim=True)).mean().item()
    n, k = ok.shape
    return {"captions": n, "candidates": k, "random": round(ok.mean().item(), 4),
            "clip_top1": round(top1, 4), "oracle": round(ok.amax(1).mean().item(), 4),
            "gain_points": round(100 * (top1 - ok.mean().item()), 1)}


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
    parser.add_argument("--clip", required=True, help="CLIP run folder(s), comma-separated")
    parser.add_argument("--dalle", default=None, help="DALL-E run folder (or --proxy)")
    parser.add_argument("--unclip", default=None, help="unCLIP bundle or run folder drawing the candidates")
    parser.add_argument("--steps", type=int, default=None, help="(--unclip) decoder DDIM steps")
    parser.add_argument("--prior", choices=("diffusion", "text"), default=None,
                        help="(--unclip) the prior's sample or the caption's text embedding (no prior)")
    parser.add_argument("--proxy", action="store_true", help="stand-in generator instead of DALL-E (see above)")
    parser.add_argument("--split", default="heldout", help="shapes split whose captions are used")
    parser.add_argument("--captions", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes and of sampling")
    parser.add_argument("--cache", default=None, help="file to keep the candidates in (see above)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=None,
                        help="DALL-E sampling temperature (default: the run's own default)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the run's own default)")
    parser.add_argument("--show-misses", default=None, metavar="DIR",
                        help="write DIR/misses_N.png for the N-th --clip: each missed caption's kept "
                             "candidate beside the best-scored faithful one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rerankers = {path: ClipReranker.load(path) for path in args.clip.split(",")}
    key = {"split": args.split, "captions": args.captions, "candidates": args.candidates, "seed": args.seed,
           "generator": "proxy" if args.proxy else args.unclip or args.dalle}
    sampling = {k: v for k, v in (("temperature", args.temperature), ("guidance", args.guidance),
                                  ("steps", args.steps), ("prior", args.prior)) if v is not None}
    key.update(sampling)  # only when given, so caches of the defaults keep their key
    if args.cache and Path(args.cache).is_file():
        drawn = torch.load(args.cache, weights_only=True)
        if drawn["key"] != key:
            parser.error(f"{args.cache} holds candidates for {drawn['key']}, not {key}: give another --cache")
        return report(drawn, rerankers, key, args.show_misses)
    image_size = next(iter(rerankers.values())).model.cfg.image_size
    if args.proxy:
        generate, by_caption = proxy_generator(args.split, image_size)
    elif args.dalle:
        from cvformers.pipelines.text_to_image import TextToImage

        pipe = TextToImage.load(args.dalle)
        image_size = pipe.vae.image_size
        pipe.reranker = None  # the candidates unsorted, as drawn

        def generate(caption: str, k: int, seed: int) -> torch.Tensor:
            return pipe.generate(caption, num_images=k, seed=args.seed + seed, **sampling).images

        by_caption = {}
    elif args.unclip:
        from cvformers.pipelines.unclip import UnCLIP

        unclip = UnCLIP.load(args.unclip)
        image_size = unclip.image_size

        def generate(caption: str, k: int, seed: int) -> torch.Tensor:
            # all k are kept (sorted by unCLIP's own CLIP); the figures score every candidate, so order is moot
            return unclip.generate(caption, num_images=k, seed=args.seed + seed, **sampling).images

        by_caption = {}
    else:
        parser.error("give --dalle RUN, --unclip MODEL or --proxy")
    scenes = [ShapesDataset(args.split, image_size=image_size, seed=args.seed).item(i)["record"]
              for i in range(args.captions)]
    for record in scenes:
        by_caption[record["caption"]] = record
    drawn = draw_candidates(generate, scenes, args.candidates)
    if args.cache:
        torch.save({**drawn, "key": key}, args.cache)
    report(drawn, rerankers, key, args.show_misses)


def report(drawn: dict, rerankers: dict[str, ClipReranker], key: dict, show_misses: str | None) -> None:
    for n, (path, reranker) in enumerate(rerankers.items()):
        scores = candidate_scores(drawn, reranker)
        print(json.dumps({**key, "clip": path, **rerank_gain(drawn, scores)}))
        grid = misses_grid(drawn, scores) if show_misses else None
        if grid is not None:
            from PIL import Image

            Path(show_misses).mkdir(parents=True, exist_ok=True)
            pixels = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            image = Image.fromarray(pixels)
            image.resize((image.width * 4, image.height * 4), Image.NEAREST).save(Path(show_misses) / f"misses_{n}.png")


if __name__ == "__main__":
    main()
