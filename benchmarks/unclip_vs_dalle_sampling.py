"""Sampling time of 8 images end to end: the shipped DALL-E against the shipped DALL-E 2 (unCLIP).

DALL-E: caption -> 64 image ids one at a time (KV cache) -> image tokenizer decode, at the bundle's
sampling defaults. unCLIP: caption -> CLIP text embedding -> prior (DDIM ``prior_steps``, two draws
per image) -> decoder (DDIM ``steps``, classifier-free guidance as one batch) -> upsampler (DDIM
``upsampler_steps``), and also without the upsampler. Each is timed ``--repeats`` times on the same
captions, alternating, and the median is printed with the ratio to DALL-E.

    python benchmarks/unclip_vs_dalle_sampling.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cvformers.pipelines.text_to_image import TextToImage
from cvformers.pipelines.unclip import UnCLIP

CAPTIONS = ["a small red circle above a large blue square", "a yellow triangle"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dalle", default="default")
    ap.add_argument("--unclip", default="unclip")
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dalle, unclip = TextToImage.load(args.dalle), UnCLIP.load(args.unclip)
    upsampler = unclip.upsampler

    def run_dalle():
        for c in CAPTIONS:
            dalle.generate(c, args.num)

    def run_unclip(with_upsampler: bool):
        unclip.upsampler = upsampler if with_upsampler else None
        for c in CAPTIONS:
            unclip.generate(c, args.num)

    runs = {"dalle": run_dalle, "unclip": lambda: run_unclip(True), "unclip_no_upsampler": lambda: run_unclip(False)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / len(CAPTIONS))
    med = {k: statistics.median(v) for k, v in times.items()}
    s = unclip.sampling
    print(json.dumps({"images": args.num, "threads": args.threads, "prior_steps": s.prior_steps,
                      "decoder_steps": s.steps, "upsampler_steps": s.upsampler_steps,
                      "seconds": {k: round(v, 2) for k, v in med.items()},
                      "ratio_to_dalle": {k: round(v / med["dalle"], 2) for k, v in med.items()}}))


if __name__ == "__main__":
    main()
