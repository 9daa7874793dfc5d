"""Small helpers shared by the speed benchmarks: timing, peak memory, this machine's matmul peak."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Callable

import torch


def times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of fn, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def matmul_gflops(n: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(best, median) GFLOP/s of an n×n @ n×n product (2·n³ FLOPs) with torch's current thread count.

    The best of several runs estimates what the cores can do when nothing else runs; on a shared
    machine the median says what they did during this benchmark.
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    ts = times(lambda: torch.mm(a, b, out=c), repeats, warmup=2)
    flops = 2 * n**3
    return flops / min(ts) / 1e9, flops / median(ts) / 1e9


def fmt_s(x: float) -> str:
    if x != x:  # nan
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_x(a: float, b: float) -> str:
    """Ratio a / b (how many times faster b is than a), or — when either is missing."""
    if a != a or b != b or b == 0:
        return "—"
    return f"{a / b:.1f}×"


PEER_BACKBONES = ("timm", "cvformers-all-tokens", "cvformers")


def peer_vit(preset: str, kind: str = "timm") -> torch.nn.Module:
    """The ViT a peer's method trains in a DINO comparison, with cvformers' initial weights of ``preset``.

    - ``timm``: timm's ``VisionTransformer`` of the same shape (``dynamic_img_size``, so local views
      get resampled position embeddings, timm's bicubic with antialiasing), what lightly's ViT
      examples build on; the preset's weights load into it key for key.
    - ``cvformers-all-tokens``: cvformers' ViT computing its last block for every token, as every
      other ViT does: the same function as ``cvformers`` within float rounding.
    - ``cvformers``: cvformers' ViT as ``cvformers train dino`` runs it (the last block updates the
      class token alone).
    """
    from cvformers.models.vision import create_model

    ours = create_model(preset, num_classes=0)
    if kind == "cvformers":
        return ours
    if kind == "cvformers-all-tokens":
        ours.forward = lambda x: ours.forward_features(x)[:, 0]
        return ours
    if kind != "timm":
        raise ValueError(f"peer backbone must be one of {PEER_BACKBONES}, got {kind!r}")
    from timm.models.vision_transformer import VisionTransformer

    c = ours.cfg
    if c.patch_norm or c.shifted_patches or c.locality_attention or c.pool != "token":
        raise ValueError(f"{preset} has options timm's VisionTransformer does not have; take a *_paper preset")
    vit = VisionTransformer(img_size=c.image_size, patch_size=c.patch_size, in_chans=c.in_chans, num_classes=0,
                            embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                            qkv_bias=c.qkv_bias, dynamic_img_size=True)
    vit.load_state_dict(ours.state_dict())
    return vit
