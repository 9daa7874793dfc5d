"""Attention time against grid size per pattern (fast path vs dense masked), and the share of this
machine's fp32 matmul peak that a DALL-E training step reaches.

Part 1: for grids of 16×16, 32×32 and 64×64 image tokens after 64 text tokens, the
attention op of one layer — ``pattern.attend(q, k, v)`` (each pattern's fast path) and
``dense_attention`` with the pattern's dense boolean mask (the test oracle) — forward +
backward, their runs alternating; how many times faster the fast path is, and how its time grows
with the number of image tokens N (growth exponent = log(t₂/t₁) / log(N₂/N₁): 1 is linear, 2 quadratic).

Part 2: fp32 matmul GFLOP/s of this machine (square products, best of several runs, and a product
of the shape the model's MLP runs), then a training step (forward, loss, backward, Adam) of the
256-image-token reference config (dim 256, depth 4, 8 heads × 32, 32 text tokens, batch 16). Its
FLOPs are ``3 × model_info(cfg).flops_forward × batch`` (``cvformers model-info``: matmuls as
2mnk, attention only over the pairs each pattern allows), so the figure is model-FLOPs utilisation.

    python benchmarks/attention_scaling.py                                   # everything, 2 threads
    python benchmarks/attention_scaling.py --grids 16 32 --repeats 2 --skip-step
    python benchmarks/attention_scaling.py --skip-attention --step-attention full paper
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import matmul_gflops, median, peak_rss_mb, times  # noqa: E402

from cvformers.models.dalle import DALLE, DalleConfig  # noqa: E402
from cvformers.models.dalle_info import model_info  # noqa: E402
from cvformers.nn.attention import build_pattern, dense_attention  # noqa: E402


def attention_step(pattern, batch: int, heads: int, dim_head: int, dense: bool):
    """Forward + backward of one attention op (fast path, or dense masked), as a callable."""
    shape = (batch, heads, pattern.seq_len, dim_head)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=gen)
    mask = pattern.dense_mask() if dense else None

    def step():
        out = dense_attention(q, k, v, mask) if dense else pattern.attend(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    return step


def attention_times(pattern, batch: int, heads: int, dim_head: int, repeats: int,
                    dense: bool = True) -> tuple[float, float]:
    """Median seconds of the fast path and of dense masked attention (nan when ``dense`` is off),
    their runs alternating so that the machine's drift falls on both."""
    fast = attention_step(pattern, batch, heads, dim_head, dense=False)
    ref = attention_step(pattern, batch, heads, dim_head, dense=True) if dense else None
    fast_t, ref_t = [], []
    for _ in range(repeats):
        fast_t += times(fast, 1, warmup=0 if fast_t else 1)
        if ref is not None:
            ref_t += times(ref, 1, warmup=0 if ref_t else 1)
    return median(fast_t), median(ref_t)


def attention_table(args) -> None:
    print(f"## Attention op, forward + backward (batch {args.batch}, {args.heads} heads × {args.dim_head}, "
          f"{args.text} text tokens, conv window {args.conv_kernel}; median of {args.repeats}, ms)\n")
    print("| pattern | grid | image tokens | fast path | dense masked | fast vs dense | fast growth exponent |")
    print("|---|---|---|---|---|---|---|")
    variants = [(name, b) for name in args.patterns
                for b in (args.rows_per_block if name in ("row", "conv") else [None])]
    for name, rows_per_block in variants:
        prev = None
        label = name if rows_per_block is None else f"{name}, {rows_per_block} rows a block"
        for g in args.grids:
            pattern = build_pattern(name, args.text, g, g, conv_kernel=args.conv_kernel)
            if rows_per_block is not None:
                pattern.rows_per_block = rows_per_block
            fast, dense = attention_times(pattern, args.batch, args.heads, args.dim_head, args.repeats,
                                          dense=g <= args.max_dense_grid)
            n = g * g
            growth = "" if prev is None else f"{math.log(fast / prev[1]) / math.log(n / prev[0]):.2f}"
            ratio = "—" if dense != dense else f"{dense / fast:.1f}×"
            dense_ms = "—" if dense != dense else f"{1e3 * dense:.1f}"
            print(f"| {label} | {g}×{g} | {n} | {1e3 * fast:.1f} | {dense_ms} | {ratio} | {growth} |", flush=True)
            prev = (n, fast)
    print()


def peak_table(args) -> tuple[float, float]:
    print(f"## fp32 matmul on this machine ({torch.get_num_threads()} threads)\n")
    print("| product | best GFLOP/s | median GFLOP/s |")
    print("|---|---|---|")
    best = med = 0.0
    for n in args.matmul_sizes:
        b, m = matmul_gflops(n, repeats=args.matmul_repeats)
        print(f"| {n}×{n} @ {n}×{n} | {b:.1f} | {m:.1f} |", flush=True)
        best, med = max(best, b), max(med, m)
    # the MLP's first product of the step below: (batch·S) × dim @ dim × 4·dim
    rows, dim = args.batch_step * (32 + args.step_grid**2), 256
    a, w = torch.randn(rows, dim), torch.randn(dim, 4 * dim)
    ts = times(lambda: a @ w, args.matmul_repeats, warmup=2)
    flops = 2 * rows * dim * 4 * dim
    print(f"| {rows}×{dim} @ {dim}×{4 * dim} (the model's fc1) | {flops / min(ts) / 1e9:.1f} | "
          f"{flops / median(ts) / 1e9:.1f} |")
    print(f"\npeak (best square product): {best:.1f} GFLOP/s\n")
    return best, med


def step_table(args, peak: float, peak_median: float) -> None:
    print(f"## Training step, reference config with {args.step_grid}×{args.step_grid} image tokens, batch "
          f"{args.batch_step} (median of {args.repeats})\n")
    print("| attention | step (s) | model FLOPs / step | achieved GFLOP/s | of best peak | of median peak |")
    print("|---|---|---|---|---|---|")
    for attention in args.step_attention:
        torch.manual_seed(0)
        cfg = DalleConfig(num_text_tokens=1032, text_len=32, num_image_tokens=512, grid_size=args.step_grid, dim=256,
                          depth=4, heads=8, dim_head=32, attention=attention, conv_kernel=args.conv_kernel,
                          caption_drop_prob=0.0)
        model = DALLE(cfg).train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-4)
        B, G = args.batch_step, args.step_grid
        batch = {"text": torch.randint(0, 1000, (B, 32)), "codes": torch.randint(0, 512, (B, G, G))}

        def step():
            loss, _ = model.loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = median(times(step, args.repeats, warmup=1))
        flops = 3 * model_info(cfg).flops_forward * B
        achieved = flops / t / 1e9
        print(f"| {attention} | {t:.3f} | {flops / 1e9:.1f} G | {achieved:.1f} | {achieved / peak:.0%} | "
              f"{achieved / peak_median:.0%} |", flush=True)
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", type=int, nargs="+", default=[16, 32, 64], help="image tokens per side")
    p.add_argument("--patterns", nargs="+", default=["row", "column", "conv", "full"])
    p.add_argument("--text", type=int, default=64, help="text tokens before the image")
    p.add_argument("--rows-per-block", type=int, nargs="+", default=[2],
                   help="grid rows per query block of the row and conv fast paths (one table row each)")
    p.add_argument("--batch", type=int, default=1, help="batch of the attention op")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim-head", type=int, default=32)
    p.add_argument("--conv-kernel", type=int, default=11, help="conv window side (paper: 11)")
    p.add_argument("--max-dense-grid", type=int, default=64, help="skip dense masked attention above this grid")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--matmul-repeats", type=int, default=10)
    p.add_argument("--step-grid", type=int, default=16, help="image tokens per side of the training step")
    p.add_argument("--batch-step", type=int, default=16)
    p.add_argument("--step-attention", nargs="+", default=["full", "paper"])
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--skip-step", action="store_true", help="skip the matmul peak and the training step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if not args.skip_attention:
        attention_table(args)
    if not args.skip_step:
        peak, peak_median = peak_table(args)
        step_table(args, peak, peak_median)
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
