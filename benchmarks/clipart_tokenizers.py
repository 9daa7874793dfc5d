"""Which image tokenizer suits clip art: reconstructions of the held-out OpenClipart pairs.

For each tokenizer run (VQ-VAE, dVAE, ...) trained on the caption folder: the held-out images
through the tokenizer and back, scored by

- pixel MSE and PSNR;
- FD on our CLIP features of the reconstructions of half A against the real images of half B,
  mean ± std over 10 random halvings, beside the real-vs-real floor at the same size
  (``cvformers.eval.heldout_generation``): what a
  DALL-E drawing that tokenizer's ids can at best reach;
- CLIP R-precision of the reconstructions (caption among 1 + 99), beside that of the real images;
- the share of the codebook the held-out images use, and the run's training seconds.

    python benchmarks/clipart_tokenizers.py --clip runs/openclipart_clip \\
        runs/openclipart_vqvae runs/openclipart_dvae
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from cvformers.eval.heldout_generation import fd_over_splits, heldout_pairs, r_precision
from cvformers.loading import load_vae
from cvformers.pipelines.rerank import ClipReranker


def train_seconds(run: Path) -> float | None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["elapsed"] for r in rows if r.get("split") == "train" and "elapsed" in r]
    return round(times[-1], 1) if times else None


def _mean_std(values: torch.Tensor) -> str:
    return f"{values.mean():.4f} ± {values.std():.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="image tokenizer run folders")
    p.add_argument("--clip", required=True, help="CLIP run that judges")
    p.add_argument("--data", default="folder:data/openclipart")
    p.add_argument("--holdout", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    judge = ClipReranker.load(args.clip)
    first = load_vae(args.runs[0])
    real, captions = heldout_pairs(args.data, args.holdout, first.image_size, first.channels, "test", 0)
    real_f = judge.embed_images(real).cpu()
    texts = judge.embed_texts(captions).cpu()
    print(json.dumps(ensure_ascii=False, obj={"tokenizer": "none (real images)", "pairs": len(captions),
                      "fd_floor": _mean_std(fd_over_splits(real_f, real_f)),
                      "r_precision": round(r_precision(real_f, texts, captions, 99), 4)}))
    for run in args.runs:
        vae = load_vae(run).eval()
        with torch.no_grad():
            ids = torch.cat([vae.encode(x) for x in real.split(64)])
            recon = torch.cat([vae.decode(i) for i in ids.split(64)]).clamp(0, 1)
        mse = float((recon - real).square().mean())
        feats = judge.embed_images(recon).cpu()
        print(json.dumps(ensure_ascii=False, obj={"tokenizer": run, "kind": type(vae).__name__, "ids": vae.num_tokens,
                          "codebook_used": round(ids.unique().numel() / vae.num_tokens, 3),
                          "mse": round(mse, 5), "psnr_db": round(10 * math.log10(1 / mse), 2),
                          "fd": _mean_std(fd_over_splits(feats, real_f)),
                          "r_precision": round(r_precision(feats, texts, captions, 99), 4),
                          "train_seconds": train_seconds(Path(run))}))


if __name__ == "__main__":
    main()
