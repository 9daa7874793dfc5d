"""This machine's fp32 matmul throughput (GFLOP/s): the yardstick for model-FLOPs utilisation.

An n×n @ n×n product is 2·n³ FLOPs. ``best`` (fastest of the repeats) estimates the cores' peak when
nothing else runs; ``median`` is what they delivered during the measurement on a shared machine.
benchmarks/attention_scaling.py measures the same in its own run, next to a DALL-E training step.

    python benchmarks/matmul_peak.py --threads 2 --sizes 512 1024 2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import matmul_gflops  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    print(f"torch {torch.__version__}, fp32\n")
    print("| threads | n | best GFLOP/s | median GFLOP/s |")
    print("|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n in args.sizes:
            best, med = matmul_gflops(n, repeats=args.repeats)
            print(f"| {threads} | {n} | {best:.1f} | {med:.1f} |", flush=True)


if __name__ == "__main__":
    main()
