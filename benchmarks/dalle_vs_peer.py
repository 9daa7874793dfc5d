"""cvformers' DALL-E against DALLE-pytorch 1.6.6, same process, same sizes (issue 6's reference).

Both transformers: dim 256, depth 4, 8 heads of 32, 32 text tokens of a 1000-token vocabulary,
512 image ids; an 8x8 grid (64 image tokens) and a 16x16 grid (256). Random weights: the time of
a step does not depend on what they are. Sampling is 8 images; DALLE-pytorch's time is its
``generate_images`` as shipped (which includes its small dVAE's decode, measured separately and
printed); cvformers' is ``sample_codes`` (transformer only). A train step is forward + backward +
AdamW on a batch of 16 (caption ids, image ids), so neither side runs its dVAE encoder.

The peer is not a dependency. Install it beside the project's torch, without its dependencies:

    pip install --no-deps --target bench_envs/dalle_pytorch dalle-pytorch==1.6.6 \\
        rotary-embedding-torch==0.2.1 axial-positional-embedding==0.2.1 g-mlp-pytorch==0.1.5
    PYTHONPATH=bench_envs/dalle_pytorch python benchmarks/dalle_vs_peer.py --threads 2

Imports of DALLE-pytorch that only its pretrained-VAE wrappers use (omegaconf, taming, ...) are
stubbed when absent; nothing of them runs here.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import statistics
import sys
import time
import types

import torch

from cvformers.models.dalle import DALLE, DalleConfig
from cvformers.pipelines.text_to_image import sample_codes

TEXT_VOCAB, TEXT_LEN, IMAGE_VOCAB = 1000, 32, 512


def import_peer():
    for name in ("omegaconf", "taming", "taming.models", "taming.models.vqgan", "requests", "yaml", "pkg_resources"):
        try:
            importlib.import_module(name)
        except Exception:
            stub = types.ModuleType(name)
            stub.OmegaConf = stub.VQModel = stub.GumbelVQ = object
            stub.get_distribution = lambda name: types.SimpleNamespace(version="unknown")
            sys.modules[name] = stub
    import dalle_pytorch

    return dalle_pytorch


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peer_model(dp, grid: int, sparse: bool):
    image_size = 32 if grid == 8 else 64
    vae = dp.DiscreteVAE(image_size=image_size, num_layers=2, num_tokens=IMAGE_VOCAB, codebook_dim=256, hidden_dim=64)
    attn = ("axial_row", "axial_col", "axial_row", "conv_like") if sparse else ("full",)
    return dp.DALLE(dim=256, vae=vae, num_text_tokens=TEXT_VOCAB, text_seq_len=TEXT_LEN, depth=4, heads=8,
                    dim_head=32, attn_types=attn).eval()


def our_model(grid: int, sparse: bool) -> DALLE:
    cfg = DalleConfig(num_text_tokens=TEXT_VOCAB + TEXT_LEN, text_len=TEXT_LEN, num_image_tokens=IMAGE_VOCAB,
                      grid_size=grid, dim=256, depth=4, heads=8, dim_head=32,
                      attention="paper" if sparse else "full", caption_drop_prob=0.0)
    return DALLE(cfg).eval()


def train_step_fn(model, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model.train()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=int, nargs="+", default=[8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-peer-sampling", action="store_true", help="the peer's sampling is slow at 16x16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dp = import_peer()
    print(f"torch {torch.__version__}, {args.threads} threads; medians of {args.repeats}")
    print(f"{'what':<44} {'DALLE-pytorch':>14} {'cvformers':>10} {'ratio':>7}")

    def row(what, peer_s, ours_s):
        print(f"{what:<44} {peer_s:13.3f}s {ours_s:9.3f}s {peer_s / ours_s:6.1f}x", flush=True)

    for grid in args.grid:
        n = grid * grid
        for sparse in (False, True):
            label = f"{n} tokens, {'sparse' if sparse else 'full'}"
            peer, ours = peer_model(dp, grid, sparse), our_model(grid, sparse)
            text = torch.randint(1, TEXT_VOCAB, (16, TEXT_LEN))
            codes = torch.randint(0, IMAGE_VOCAB, (16, n))
            peer_step = train_step_fn(peer, lambda: peer(text, codes, return_loss=True))
            ours_step = train_step_fn(ours, lambda: ours.loss({"text": text, "codes": codes.view(16, grid, grid)})[0])
            row(f"train step, batch 16, {label}", median_time(peer_step, args.repeats),
                median_time(ours_step, args.repeats))

            if args.skip_peer_sampling and grid > 8:
                continue
            peer.eval()
            ours.eval()
            text8 = text[:8]
            with torch.no_grad():
                peer_t = median_time(lambda: peer.generate_images(text8), 1, warmup=0)
                decode_t = median_time(lambda: peer.vae.decode(codes[:8]), 3)
            ours_t = median_time(lambda: sample_codes(ours, text8, generator=torch.Generator().manual_seed(0)),
                                 args.repeats)
            row(f"sample 8 images, {label}", peer_t, ours_t)
            print(f"{'':<4}(DALLE-pytorch's dVAE decode inside that: {decode_t:.3f}s)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
