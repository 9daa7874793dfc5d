"""Caption fidelity of an unCLIP decoder given the true CLIP image embedding, or the caption alone.

``cvformers eval fidelity`` scores the whole pipeline: caption -> prior -> image embedding ->
decoder. This script takes the prior out, to say which stage loses what:

- ``image``: the decoder reads the CLIP image embedding of the scene's own rendered image and its
  caption (the paper's reconstructions, unCLIP §7 and Figure 15: a perfect prior could do no better);
- ``text``: the decoder reads the caption's CLIP *text* embedding in place of the image embedding,
  and the caption (no prior: the baseline of unCLIP §5.1);
- ``caption``: the decoder reads the caption with the embedding dropped (zero), as the 10% of
  training batches whose embedding was dropped taught it.

Same scenes, seeds, checker and sampling as ``eval fidelity`` (``--per-caption`` images per caption,
decoder guidance ``--guidance`` mixing the given conditions against neither, ``--steps`` DDIM steps).

    python benchmarks/unclip_decoder_oracle.py --model unclip --split heldout --captions 100 --per-caption 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="unclip", help="unclip bundle or folder of runs")
    ap.add_argument("--split", default="heldout", help="test (training distribution) or heldout (unseen pairs)")
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--per-caption", type=int, default=4)
    ap.add_argument("--conditions", nargs="+", default=["image", "caption"], choices=["image", "text", "caption"])
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cvformers.data.shapes import ShapesDataset
    from cvformers.diffusion.samplers import DiffusionSamplingConfig
    from cvformers.eval.fidelity import check_image, summarise_checks
    from cvformers.pipelines.unclip import UnCLIP

    pipe = UnCLIP.load(args.model)
    decoder, n = pipe.decoder, args.per_caption
    data = ShapesDataset(split=args.split, image_size=pipe.image_size, seed=args.seed)
    sampling = DiffusionSamplingConfig(steps=args.steps, guidance=args.guidance)
    print(f"{args.model}: {args.split} split, {args.captions} captions x {n}, decoder guidance {args.guidance}, "
          f"{args.steps} DDIM steps")
    for condition in args.conditions:
        start, checks = time.perf_counter(), []
        for i in range(args.captions):
            item = data[i]
            text, text_embedding = pipe.encode_prompt(item["caption"])
            text = text.expand(n, -1)
            embedding = (text_embedding if condition == "text" else pipe.encode_images(item["image"])).expand(n, -1)
            keep = torch.full((n,), condition != "caption")
            cond = decoder.conditions(embedding, text, keep_embedding=keep)
            null = decoder.conditions(embedding, None, keep_embedding=torch.zeros(n, dtype=torch.bool))
            generator = torch.Generator().manual_seed(args.seed + i)
            with torch.inference_mode():
                x = decoder.run_sampler(n, sampling, cond, null, generator)
            checks += [check_image(image, item["record"]) for image in decoder.to_images(x)]
        row = {"condition": condition, "split": args.split, "images": len(checks), **summarise_checks(checks),
               "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
