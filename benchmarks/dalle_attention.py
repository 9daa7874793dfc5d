"""Attention-layer time against grid size: each pattern's fast path vs dense masked SDPA.

For grids 16x16, 32x32, 64x64 image tokens after 64 text tokens (issue 6), forward and
forward+backward of ``pattern.attend(q, k, v)`` against ``dense_attention`` with the pattern's
dense boolean mask (the test oracle), and plain causal SDPA (``is_causal``) for scale.

    python benchmarks/dalle_attention.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cvformers.nn.attention import build_pattern, dense_attention


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: caches of index tensors and masks, allocator
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)  # the least disturbed run on a shared machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--patterns", nargs="+", default=["row", "column", "conv"])
    p.add_argument("--text", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--conv-kernel", type=int, default=11)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-backward", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads; batch {args.batch}, {args.heads} heads x "
          f"{args.dim_head}, {args.text} text tokens; best of {args.repeats}; ms")
    print(f"{'grid':>6} {'pattern':>7} {'fast fwd':>9} {'dense fwd':>10} {'x':>6} {'fast f+b':>9} "
          f"{'dense f+b':>10} {'x':>6} {'causal f+b':>11}")
    for g in args.grid:
        for name in args.patterns:
            pat = build_pattern(name, args.text, g, g, conv_kernel=args.conv_kernel)
            shape = (args.batch, args.heads, pat.seq_len, args.dim_head)
            q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
            mask = pat.dense_mask()

            def fast():
                return pat.attend(q, k, v)

            def dense():
                return dense_attention(q, k, v, mask)

            def causal():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            with torch.no_grad():
                tf, td = best_time(fast, args.repeats), best_time(dense, args.repeats)
            if args.no_backward:
                bf = bd = bc = float("nan")
            else:
                bf = best_time(lambda: fast().sum().backward(), args.repeats)
                bd = best_time(lambda: dense().sum().backward(), args.repeats)
                bc = best_time(lambda: causal().sum().backward(), args.repeats)
            print(f"{g}x{g:<4} {name:>7} {1e3 * tf:9.1f} {1e3 * td:10.1f} {td / tf:5.1f}x {1e3 * bf:9.1f} "
                  f"{1e3 * bd:10.1f} {bd / bf:5.1f}x {1e3 * bc:11.1f}")


if __name__ == "__main__":
    main()
