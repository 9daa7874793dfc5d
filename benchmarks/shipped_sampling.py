"""Sampling time of the shipped model (or any dalle run): 8 images, with and without the KV cache.

Times ``TextToImage.generate`` end to end (caption encoding, sampling, decoding, CLIP scoring),
median of ``--repeats`` after one warm-up call.

    python benchmarks/shipped_sampling.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cvformers.pipelines.text_to_image import TextToImage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompt", default="a small red circle above a large blue square")
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = TextToImage.load(args.model)
    print(f"| KV cache | {args.num} images, median s ({args.threads} thread(s)) |\n|---|---|")
    for use_cache in (True, False):
        pipe.generate(args.prompt, num_images=args.num, seed=0, use_cache=use_cache)
        times = []
        for r in range(args.repeats):
            t = time.perf_counter()
            pipe.generate(args.prompt, num_images=args.num, seed=r, use_cache=use_cache)
            times.append(time.perf_counter() - t)
        print(f"| {'yes' if use_cache else 'no'} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
