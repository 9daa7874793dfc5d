"""Prior quality: how close the diffusion prior's image embedding comes to the caption's true one.

For ``--n`` scenes of a shapes split, the true CLIP image embedding of the rendered scene is compared
(cosine) with (a) the prior's sample for the caption (two draws, the one closer to the text kept,
as unCLIP §2.2) and (b) the baseline of using the caption's CLIP text embedding itself, which is
what the decoder would get without a prior. Printed per split, with the share of scenes whose
prior embedding retrieves the scene's own image among all ``--n`` images (R@1 over the batch).

    python benchmarks/unclip_prior_quality.py --model unclip --n 500
    python benchmarks/unclip_prior_quality.py --model runs/clipart/unclip --data folder:data/openclipart --holdout 0.05

With ``--data folder:PATH`` the pairs are the caption folder's held-out split (each file's first
caption line) instead of shapes scenes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from cvformers.data.shapes import ShapesDataset
from cvformers.eval.heldout_generation import heldout_pairs
from cvformers.pipelines.unclip import UnCLIP


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unclip", help="unclip bundle or folder of runs")
    ap.add_argument("--n", type=int, default=500, help="scenes per split")
    ap.add_argument("--splits", default="test,heldout")
    ap.add_argument("--prior-steps", type=int, default=None, help="prior DDIM steps (default: the bundle's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default="shapes", help="shapes, or folder:PATH for a caption folder's held-out pairs")
    ap.add_argument("--holdout", type=float, default=0.05, help="(folder) the held-out share the runs used")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = UnCLIP.load(args.model)
    s = pipe.sampling.override(prior_steps=args.prior_steps)
    splits = args.splits.split(",") if args.data == "shapes" else ["test"]
    for split in splits:
        if args.data == "shapes":
            data = ShapesDataset(split=split, image_size=pipe.clip.cfg.image_size)
            items = [data[i] for i in range(args.n)]
            images = torch.stack([it["image"] for it in items])
            captions = [it["caption"] for it in items]
        else:
            images, captions = heldout_pairs(args.data, args.holdout, pipe.clip.cfg.image_size, 3, split, args.n)
        n = len(captions)
        with torch.no_grad():
            true = pipe.encode_images(images)
            text = pipe.tokenizer.encode(captions)
            text_emb = pipe.clip.encode_text(text, normalize=True)
            start = time.perf_counter()
            drawn = F.normalize(pipe.prior.sample(text, text_emb, s.stage("prior"), candidates=s.prior_candidates,
                                                  generator=torch.Generator().manual_seed(0)), dim=-1)
            seconds = time.perf_counter() - start
        cos_prior = (drawn * true).sum(-1)
        cos_text = (text_emb * true).sum(-1)
        r1_prior = ((drawn @ true.T).argmax(1) == torch.arange(n)).float().mean().item()
        r1_text = ((text_emb @ true.T).argmax(1) == torch.arange(n)).float().mean().item()
        print(json.dumps({"data": args.data, "split": split, "n": n, "prior_steps": s.prior_steps,
                          "cosine_prior": round(cos_prior.mean().item(), 4),
                          "cosine_text_embedding": round(cos_text.mean().item(), 4),
                          "r1_prior": round(r1_prior, 4), "r1_text_embedding": round(r1_text, 4),
                          "prior_seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
