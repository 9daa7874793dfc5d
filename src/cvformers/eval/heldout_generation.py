"""Generated images against held-out image–caption pairs, measured the way the papers measure.

For every held-out pair of a caption folder the model draws one image from the caption (with
``candidates`` > 1, CLIP's best of that many, as DALL-E §2.3 reranks). Two figures follow:

**FD on our CLIP features.** FID (Heusel et al. 2017) is the Fréchet distance between Gaussians
fitted to Inception-v3 features of generated and real images; Inception's weights cannot be
downloaded here, so the features are a CLIP image tower of our own (its unit image embeddings,
as CLIP-based FID variants read them). The figure is on that CLIP's scale and not comparable to
published FIDs. A Fréchet distance from a few hundred images is biased upward by the sample size,
so it is read against two references computed at the same size: the held-out pairs are split in
two random halves A and B, and every FD is "images for A against the real images of B", averaged
over ``splits`` random halvings (their standard deviation is printed beside it):

- ``fd_floor``: the real images of A — what a perfect model would score at this size;
- ``fd_tokenizer``: A's real images through the image tokenizer and back — the best a model
  drawing the tokenizer's ids can score (DALL-E's transformer only predicts ids);
- ``fd``: the images generated from A's captions.

**CLIP R-precision** (Xu et al. 2018, AttnGAN §5; used for DALL-E-like models since): an image
is scored against its caption and ``distractors`` other held-out captions drawn at random (none
equal to its own); the share of images whose own caption scores highest. Given for the real
images too, which bounds what that CLIP can recognise. With reranking by the same CLIP the
generated figure flatters the model (the candidates were picked by the judge); it is printed with
``reranked_by_judge`` so that it is read as such.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cvformers.errors import UserError
from cvformers.eval.frechet import frechet_distance
from cvformers.utils import progress


@dataclass
class HeldoutGenerationConfig:
    """What ``cvformers eval generation`` measures; every field has a CLI flag."""

    split: str = "test"  # the held-out split of the folder ([data] holdout of the run)
    limit: int = 0  # pairs to use (0: all)
    candidates: int = 1  # images drawn per caption; >1: the CLIP reranker keeps the best
    distractors: int = 99  # other captions each image is ranked against (R-precision among 1 + this)
    seed: int = 0  # sampling seed of the first caption (caption i uses seed + i), of the distractors and splits
    splits: int = 10  # random halvings of the pairs; each FD is their mean (and std)

    def __post_init__(self) -> None:
        if self.limit < 0 or self.candidates < 1 or self.distractors < 1 or self.splits < 1:
            raise UserError("limit must be >= 0, candidates, distractors and splits >= 1")


def r_precision(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str], distractors: int,
                seed: int = 0) -> float:
    """Share of images whose own caption (row i of ``text_emb``) out-scores ``distractors`` others
    drawn at random from the rest (captions equal to its own, ignoring case, never drawn)."""
    n = len(captions)
    keys = [c.strip().lower() for c in captions]
    rng = random.Random(seed)
    hits = 0
    for i in range(n):
        pool = [j for j in range(n) if keys[j] != keys[i]]
        if len(pool) < distractors:
            raise UserError(f"R-precision needs {distractors} other captions, the held-out set has {len(pool)}; "
                            "lower --distractors")
        others = rng.sample(pool, distractors)
        scores = image_emb[i] @ text_emb[[i] + others].T
        hits += int(scores[0] > scores[1:].max())
    return hits / n


def fd_over_splits(images: torch.Tensor, real: torch.Tensor, splits: int = 10, seed: int = 0) -> torch.Tensor:
    """[splits] Fréchet distances, each between the features ``images`` of a random half A of the
    pairs and the ``real`` features of the other half B (row i of both belongs to pair i)."""
    g = torch.Generator().manual_seed(seed)
    half = len(real) // 2
    out = []
    for _ in range(splits):
        p = torch.randperm(len(real), generator=g)
        out.append(frechet_distance(images[p[:half]], real[p[half:2 * half]]))
    return torch.tensor(out)


def heldout_pairs(data: str, holdout: float, image_size: int, channels: int, split: str = "test", limit: int = 0):
    """(images [N, C, H, W] in [0, 1], first caption line of each) of a caption folder's held-out split."""
    from cvformers.data import DataConfig, build_from_config
    from cvformers.data.folder import FolderDataset

    dataset = build_from_config(DataConfig(name=data, image_size=image_size, channels=channels, holdout=holdout), split)
    if not isinstance(dataset, FolderDataset):
        raise UserError(f"{data}: FD and R-precision need a caption folder (folder:PATH), got {type(dataset).__name__}")
    n = len(dataset) if not limit else min(limit, len(dataset))
    if n < 4:
        raise UserError(f"{data} split {split!r} has {len(dataset)} pairs; at least 4 are needed")
    images = torch.stack([dataset[i]["image"] for i in range(n)])
    captions = [dataset.caption_lists[i][0] for i in range(n)]  # the first line: the title
    return images, captions


def run_data(model: str | Path) -> tuple[str, float]:
    """The data spec and held-out share a run or bundle was trained with."""
    from cvformers.config import load_toml
    from cvformers.loading import resolve_run

    root = Path(resolve_run(model))
    tables = [load_toml(f).get("data", {}) for f in (root / "config.toml", root / "decoder" / "config.toml") if f.is_file()]
    for table in tables:
        name, holdout = table.get("name"), float(table.get("holdout", 0.0))
        if name and str(name).startswith("folder:") and holdout > 0:
            return str(name), holdout
    raise UserError(f"{model} was not trained on a caption folder with held-out pairs "
                    "([data] name = 'folder:PATH', holdout > 0); give --data and --holdout")


def heldout_generation(pipe, judge, real: torch.Tensor, captions: list[str],
                       config: HeldoutGenerationConfig | None = None) -> dict[str, Any]:
    """The figures of the module docstring for ``pipe`` (a ``TextToImage`` or ``UnCLIP``) on the
    held-out ``real`` images [N, C, H, W] in [0, 1] and their ``captions``, judged by the CLIP
    ``judge`` (a ``ClipReranker``: ``embed_images``, ``embed_texts``). ``fd_tokenizer`` needs the
    pipeline's image tokenizer (``pipe.vae``); a diffusion pipeline has none and reports None.

        pipe = TextToImage.load("runs/clipart/bundle")
        real, captions = heldout_pairs(*run_data("runs/clipart/bundle"), pipe.image_size, 3)
        print(heldout_generation(pipe, pipe.reranker, real, captions))
    """
    c = config or HeldoutGenerationConfig()
    start = time.perf_counter()
    generated = []
    for i, caption in enumerate(progress(captions, desc="drawing", unit="caption")):
        out = pipe.generate(caption, num_images=1, candidates=c.candidates, seed=c.seed + i)
        generated.append(out.images[0].cpu())
    sets = {"real": real, "generated": torch.stack(generated)}
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        with torch.no_grad():
            sets["tokenizer"] = torch.cat([vae.decode(vae.encode(x.to(pipe.device))).cpu()
                                           for x in real.split(64)]).clamp(0, 1)
    feats = {name: judge.embed_images(x).cpu() for name, x in sets.items()}
    texts = judge.embed_texts(captions).cpu()
    per_split = {name: fd_over_splits(feats[name], feats["real"], c.splits, c.seed) if name in feats else None
                 for name in ("generated", "real", "tokenizer")}
    half = len(captions) // 2

    def fd(name: str) -> float | None:
        return None if per_split[name] is None else float(per_split[name].mean())

    def spread(name: str) -> float | None:
        return None if per_split[name] is None or c.splits < 2 else float(per_split[name].std())

    def rp(name: str) -> float | None:
        return r_precision(feats[name], texts, captions, c.distractors, c.seed) if name in feats else None

    reranker = getattr(pipe, "reranker", None) or getattr(pipe, "clip", None)
    result = {"pairs": len(captions), "half_size": half, "candidates": c.candidates, "splits": c.splits,
              "fd": fd("generated"), "fd_floor": fd("real"), "fd_tokenizer": fd("tokenizer"),
              "fd_std": spread("generated"), "fd_floor_std": spread("real"), "fd_tokenizer_std": spread("tokenizer"),
              "r_precision": rp("generated"), "r_precision_real": rp("real"), "r_precision_tokenizer": rp("tokenizer"),
              "distractors": c.distractors,
              "reranked_by_judge": c.candidates > 1 and getattr(reranker, "model", reranker) is judge.model,
              "seconds": round(time.perf_counter() - start, 1)}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


__all__ = ["HeldoutGenerationConfig", "fd_over_splits", "heldout_generation", "heldout_pairs", "r_precision", "run_data"]
