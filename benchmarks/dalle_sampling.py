"""Sampling time of the DALL-E transformer: 8 images, with and without the KV cache.

The model is the reference size of the speed comparisons (dim 256, depth 4, 8 heads of 32, 32 text tokens, 512 image
ids) with random weights — the time of a sampling step does not depend on what the weights are.
Only the transformer's sampling loop is timed (``sample_codes``), not the dVAE decode.

    python benchmarks/dalle_sampling.py                      # 8x8 and 16x16 grids, full and paper schedule
    python benchmarks/dalle_sampling.py --grid 16 --attention paper --threads 2 --repeats 3
    python benchmarks/dalle_sampling.py --decode-step          # ms per decode step by width and batch
    python benchmarks/dalle_sampling.py --decode-step --compare-packed   # ... with F.linear vs packed products
    python benchmarks/dalle_sampling.py --grid 8 --attention full --no-baseline --compare-packed
    python benchmarks/dalle_sampling.py --linear-sizes --threads 1   # one product: F.linear vs packed, by size

``--decode-step`` times one KV-cache decode step (full attention, 4 layers, position 40 of the
image) at widths 64 and 256 with 1 and 8 images: width 64 with one image is close to the pure
per-operator overhead of a step; width 256 with one image adds the reading of the weights; eight
images add the products' arithmetic.

``--compare-packed`` times each case twice, alternating, with the decode step's products on
``F.linear`` (``packed=False``) and on oneDNN's packed weights (the default;
``cvformers.nn.decode_linear``), and prints the ratio. ``--linear-sizes`` times one product of
a few rows, F.linear against the packed weight, over weight sizes: where the two cross is
``decode_linear.PACK_MIN_ENTRIES``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from _common import median, times
from cvformers.models.dalle import DALLE, DalleConfig
from cvformers.models.dalle_sampling import SamplingConfig, sample_codes


def build(grid: int, attention: str) -> DALLE:
    torch.manual_seed(0)
    cfg = DalleConfig(num_text_tokens=1000, text_len=32, num_image_tokens=512, grid_size=grid, dim=256, depth=4,
                      heads=8, dim_head=32, attention=attention)
    return DALLE(cfg).eval()


def time_sampling(model: DALLE, num: int, use_cache: bool, repeats: int, guidance: float = 1.0,
                  packed: bool = True) -> float:
    text = torch.randint(0, 1000 - 32, (num, 32))
    times = []
    for r in range(repeats + 1):  # the first run warms up allocators and caches, not counted
        g = torch.Generator().manual_seed(r)
        t = time.perf_counter()
        sample_codes(model, text, SamplingConfig(guidance=guidance), generator=g, use_cache=use_cache, packed=packed)
        if r:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_step_ms(dim: int, batch: int, steps: int = 300, packed: bool = True) -> float:
    torch.manual_seed(0)
    cfg = DalleConfig(num_text_tokens=1000, text_len=32, num_image_tokens=512, grid_size=8, dim=dim, depth=4,
                      heads=dim // 32, dim_head=32, attention="full")
    model = DALLE(cfg).eval()
    with torch.inference_mode():
        caches = model.new_caches(batch, packed=packed)
        model.prefill(torch.randint(0, 1000 - 32, (batch, 32)), caches)
        code = torch.randint(0, 512, (batch,))
        for _ in range(30):
            model.decode_step(code, 32 + 40, caches)
        start = time.perf_counter()
        for _ in range(steps):
            model.decode_step(code, 32 + 40, caches)
        return 1000 * (time.perf_counter() - start) / steps


def linear_sizes_table() -> None:
    """Microseconds per product of r rows, F.linear / packed oneDNN, by weight shape (median of 300)."""
    import torch.nn.functional as F

    def us(fn) -> float:
        return 1e6 * median(times(fn, 300, warmup=30))

    rows = (1, 2, 8, 32)
    print("in x out (entries): " + "  ".join(f"{r} rows F.linear/packed us" for r in rows))
    for i, o in [(64, 64), (256, 256), (256, 512), (256, 768), (256, 1024), (1024, 256), (512, 2048)]:
        w, b = torch.randn(o, i), torch.randn(o)
        cells = []
        for r in rows:
            x, packed = torch.randn(r, i), torch.ops.mkldnn._reorder_linear_weight(w, r)
            plain_us = us(lambda: F.linear(x, w, b))
            packed_us = us(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""))
            cells.append(f"{plain_us:6.0f} / {packed_us:<6.0f}")
        print(f"{i:5d} x {o:<5d} ({i * o:7d}): " + "  ".join(cells))


def alternate(fn, rounds: int) -> tuple[float, float]:
    """Median of fn(packed=False) and of fn(packed=True), called alternately ``rounds`` times each."""
    plain, packed = [], []
    for _ in range(rounds):
        plain.append(fn(packed=False))
        packed.append(fn(packed=True))
    return statistics.median(plain), statistics.median(packed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=int, nargs="+", default=[8, 16], help="image ids per side")
    p.add_argument("--attention", nargs="+", default=["full", "paper"], help="full | paper | row | column | conv")
    p.add_argument("--num", type=int, default=8, help="images sampled in one batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-baseline", action="store_true", help="skip the slow run without a cache")
    p.add_argument("--guidance", type=float, default=1.0, help="also time classifier-free guidance at this scale")
    p.add_argument("--decode-step", action="store_true", help="only time one decode step by width and batch")
    p.add_argument("--compare-packed", action="store_true",
                   help="time F.linear products (packed=False) against packed ones, alternating")
    p.add_argument("--rounds", type=int, default=3, help="alternations of --compare-packed")
    p.add_argument("--linear-sizes", action="store_true", help="only time one product by size: F.linear vs packed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.linear_sizes:
        print(f"torch {torch.__version__}, {args.threads} threads")
        linear_sizes_table()
        return
    if args.decode_step:
        print(f"torch {torch.__version__}, {args.threads} threads; ms per decode step (4 layers, full attention)")
        for dim in (64, 256):
            cells = []
            for b in (1, 8):
                if args.compare_packed:
                    plain, packed = alternate(lambda packed: decode_step_ms(dim, b, packed=packed), args.rounds)
                    cells.append(f"{b} image(s) F.linear {plain:.3f} / packed {packed:.3f} ({plain / packed:.2f}x)")
                else:
                    cells.append(f"{b} image(s) {decode_step_ms(dim, b):.3f}")
            print(f"width {dim:4d}: " + ", ".join(cells))
        return
    if args.compare_packed:
        print(f"torch {torch.__version__}, {args.threads} threads, {args.num} images, sampling loop with the KV "
              f"cache, median of {args.repeats} runs x {args.rounds} alternations")
        for grid in args.grid:
            for attention in args.attention:
                model = build(grid, attention)
                plain, packed = alternate(lambda packed: time_sampling(model, args.num, True, args.repeats,
                                                                       args.guidance, packed), args.rounds)
                print(f"{grid}x{grid} {attention:>6}: F.linear {plain:.3f} s, packed {packed:.3f} s "
                      f"({plain / packed:.2f}x)")
        return

    print(f"torch {torch.__version__}, {args.threads} threads, {args.num} images, median of {args.repeats}")
    print(f"{'grid':>6} {'attention':>9} {'KV cache (s)':>13} {'no cache (s)':>13} {'speed-up':>9} {'ms/step':>8}")
    for grid in args.grid:
        for attention in args.attention:
            model = build(grid, attention)
            cached = time_sampling(model, args.num, True, args.repeats, args.guidance)
            plain = float("nan") if args.no_baseline else time_sampling(model, args.num, False, 1, args.guidance)
            steps = grid * grid
            print(f"{grid}x{grid:<4} {attention:>9} {cached:13.3f} {plain:13.3f} {plain / cached:8.1f}x "
                  f"{1000 * cached / steps:8.2f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB" + (f"; guidance {args.guidance} (2x batch)" if args.guidance != 1 else ""))


if __name__ == "__main__":
    main()
