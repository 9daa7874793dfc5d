"""Training-step and sampling time of cvformers' DALL-E against DALLE-pytorch 1.6.6, same machine, same run.

The reference config (the size both implementations are compared at): DALLE-pytorch ``DiscreteVAE(image_size=32, num_layers=2,
num_tokens=512, codebook_dim=256, hidden_dim=64)`` (8×8 = 64 image tokens; image_size 64 for the
16×16 = 256-token variant) and ``DALLE(dim=256, num_text_tokens=1000, text_seq_len=32, depth=4,
heads=8, dim_head=32)``, everything else as shipped (rotary embeddings, token shift, GEGLU
feed-forward). cvformers runs the matching ``DalleConfig``: the same width, depth, heads, head
width, 32 text positions, 1000 + 32 per-position pad text ids, 512 image ids, the same grid, and
the paper's GELU MLP of 4× width — which makes it ~1M parameters smaller than the peer (whose
GEGLU doubles the first projection); ``--mlp-ratio 6`` equalises parameters and FLOPs.
Sparse means the paper's schedule (row / column / row / conv for 4 layers) for cvformers and
``attn_types=('axial_row', 'axial_col', 'conv_like')`` for DALLE-pytorch (the same count of each
kind), with the conv window of DALLE-pytorch's default (5×5) on both sides.

- train: one optimizer step (forward, loss, backward, Adam step) on a batch of 16 given image ids
  (the dVAE encode is not timed on either side);
- generate: 8 images from 8 captions, including each side's dVAE decode, after ``--gen-warmup``
  untimed runs on each side. DALLE-pytorch's
  ``generate_images`` runs with ``use_cache=False`` (its default, "as shipped") and with
  ``use_cache=True``; top-k keeps half of the candidates on both sides (its ``filter_thres=0.5``).

Each (side, case) runs in its own subprocess of the same interpreter, so that its peak RSS is
its own; medians over repeats after one warm-up. Random weights: step time does not depend on them.

    bash benchmarks/setup_peers.sh                     # once: .venv-bench with DALLE-pytorch 1.6.6
    python benchmarks/speed_vs_dallepytorch.py         # every case (slow: the peer samples for minutes)
    python benchmarks/speed_vs_dallepytorch.py --cases train64-full gen64-full --repeats 3 --gen-repeats 1
    python benchmarks/speed_vs_dallepytorch.py --cases gen64-full --peer-cache off --rounds 4   # drift-robust
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

CASES = {
    "train64-full": dict(kind="train", grid=8, sparse=False),
    "train64-sparse": dict(kind="train", grid=8, sparse=True),
    "train256-full": dict(kind="train", grid=16, sparse=False),
    "train256-sparse": dict(kind="train", grid=16, sparse=True),
    "gen64-full": dict(kind="generate", grid=8, sparse=False),
    "gen256-full": dict(kind="generate", grid=16, sparse=False),
    "gen256-sparse": dict(kind="generate", grid=16, sparse=True),
}
DIM, DEPTH, HEADS, DIM_HEAD, TEXT_LEN, TEXT_VOCAB, IMAGE_VOCAB = 256, 4, 8, 32, 32, 1000, 512


# --- the two sides (run inside a worker process) -------------------------------------------


def build_peer(grid: int, sparse: bool, conv_kernel: int, mlp_ratio: float):
    import torch
    from dvae_peer import import_dalle_pytorch

    dp = import_dalle_pytorch()
    torch.manual_seed(0)
    vae = dp.DiscreteVAE(image_size=grid * 4, num_layers=2, num_tokens=IMAGE_VOCAB, codebook_dim=256, hidden_dim=64)
    attn_types = ("axial_row", "axial_col", "conv_like") if sparse else ("full",)
    model = dp.DALLE(dim=DIM, vae=vae, num_text_tokens=TEXT_VOCAB, text_seq_len=TEXT_LEN, depth=DEPTH, heads=HEADS,
                     dim_head=DIM_HEAD, attn_types=attn_types)
    if sparse and conv_kernel != 5:
        for m in model.modules():
            if type(m).__name__ == "SparseConvCausalAttention":
                m.kernel_size = conv_kernel
    params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in vae.parameters())
    return model, vae, params


def build_ours(grid: int, sparse: bool, conv_kernel: int, mlp_ratio: float):
    import torch

    from cvformers.models.dalle import DALLE, DalleConfig
    from cvformers.vae.dvae import DiscreteVAE, DVAEConfig

    torch.manual_seed(0)
    cfg = DalleConfig(num_text_tokens=TEXT_VOCAB + TEXT_LEN, text_len=TEXT_LEN, num_image_tokens=IMAGE_VOCAB,
                      grid_size=grid, dim=DIM, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD,
                      attention="paper" if sparse else "full", conv_kernel=conv_kernel, caption_drop_prob=0.0,
                      mlp_ratio=mlp_ratio)
    model = DALLE(cfg)
    # a dVAE of the peer's size class: 2 downsamplings (grid = image / 4), 64 hidden channels
    vae = DiscreteVAE(DVAEConfig(image_size=grid * 4, vocab_size=IMAGE_VOCAB, n_hid=64, n_blk_per_group=1,
                                 group_count=3))
    return model, vae, sum(p.numel() for p in model.parameters())


def run_worker(spec: dict) -> dict:
    import torch

    from _common import peak_rss_mb, times

    torch.set_num_threads(spec["threads"])
    case = CASES[spec["case"]]
    grid, sparse, kind = case["grid"], case["sparse"], case["kind"]
    base_rss = peak_rss_mb()
    peer = spec["side"] == "peer"
    model, vae, params = (build_peer if peer else build_ours)(grid, sparse, spec["conv_kernel"], spec["mlp_ratio"])
    n = grid * grid
    g = torch.Generator().manual_seed(0)

    if kind == "train":
        B = spec["batch"]
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4)
        if peer:
            text = torch.randint(1, TEXT_VOCAB, (B, TEXT_LEN), generator=g)
            codes = torch.randint(0, IMAGE_VOCAB, (B, n), generator=g)

            def step():
                loss = model(text, codes, return_loss=True)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            batch = {"text": torch.randint(0, TEXT_VOCAB, (B, TEXT_LEN), generator=g),
                     "codes": torch.randint(0, IMAGE_VOCAB, (B, grid, grid), generator=g)}

            def step():
                loss, _ = model.loss(batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        ts = times(step, spec["repeats"], warmup=1)
    else:
        num = spec["num_images"]
        model.eval()
        vae.eval()
        text = torch.randint(1, TEXT_VOCAB, (num, TEXT_LEN), generator=g)
        if peer:
            def sample():
                return model.generate_images(text, filter_thres=0.5, use_cache=spec["peer_cache"])

            with torch.no_grad():  # plus one forward over the whole sequence
                model(text, torch.randint(0, IMAGE_VOCAB, (num, n), generator=g))
        else:
            from cvformers.models.dalle_sampling import SamplingConfig, sample_codes

            def sample():
                codes = sample_codes(model, text, SamplingConfig(top_k=IMAGE_VOCAB // 2), generator=g)
                return vae.decode(codes)

            with torch.no_grad():
                model(text, torch.randint(0, IMAGE_VOCAB, (num, n), generator=g))
        ts = times(sample, spec["repeats"], warmup=spec["gen_warmup"])

    return {"times": ts, "params": params, "rss_mb": peak_rss_mb(), "base_rss_mb": base_rss,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# --- the driver ---------------------------------------------------------------------------


def spawn(python: str, spec: dict, timeout: float) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["wall_s"] = time.perf_counter() - t
            return out
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    raise RuntimeError(f"worker {spec['side']} {spec['case']} failed (exit {proc.returncode}):\n{tail}")


def default_python() -> str:
    venv = REPO / ".venv-bench" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main() -> None:
    from _common import fmt_s, fmt_x, median

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                   help=f"subset of: {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, default=5, help="timed training steps per side (after one warm-up)")
    p.add_argument("--gen-repeats", type=int, default=3, help="timed sampling runs per side")
    p.add_argument("--gen-warmup", type=int, default=1,
                   help="untimed sampling runs per side first (first-call allocations and kernel setup)")
    p.add_argument("--peer-cache", choices=["off", "on", "both"], default="both",
                   help="DALLE-pytorch generate_images use_cache: off (its default), on, or both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="training batch")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--conv-kernel", type=int, default=5, help="conv window side, both sides (DALLE-pytorch: 5)")
    p.add_argument("--mlp-ratio", type=float, default=4.0,
                   help="cvformers MLP width / dim (4 = the paper; 6 matches DALLE-pytorch's GEGLU params and FLOPs)")
    p.add_argument("--python", default=default_python(), help="interpreter with torch, cvformers and dalle_pytorch "
                   "(default .venv-bench/bin/python; make it with benchmarks/setup_peers.sh)")
    p.add_argument("--only", choices=["peer", "cvformers"], default=None, help="run one side only")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the sides this many times per case and pool their timings: this VM's speed "
                        "drifts by tens of percent over minutes, and alternating spreads the drift over both sides")
    p.add_argument("--json", default=None, help="also write all raw results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return

    peer_caches = {"off": [False], "on": [True], "both": [False, True]}[args.peer_cache]
    results = []
    for name in args.cases:
        case = CASES[name]
        train = case["kind"] == "train"
        base = dict(case=name, threads=args.threads, batch=args.batch, num_images=args.num_images,
                    conv_kernel=args.conv_kernel, mlp_ratio=args.mlp_ratio,
                    repeats=args.repeats if train else args.gen_repeats, gen_warmup=args.gen_warmup)
        row = {"case": name}

        def run(key: str, spec: dict) -> None:
            out = spawn(args.python, {**base, **spec}, args.timeout)
            if key in row:  # a later round: pool the timings, keep the worst peak RSS
                out = {**out, "times": row[key]["times"] + out["times"], "rss_mb": max(row[key]["rss_mb"], out["rss_mb"])}
            row[key] = out
            label = "cvformers" if key == "ours" else key
            print(f"  {name} {label}: median {median(out['times']):.3f}s, rss {out['rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)

        for _ in range(args.rounds):
            if args.only != "cvformers":
                for cache in [False] if train else peer_caches:
                    run("peer" if train or not cache else "peer_cached", {"side": "peer", "peer_cache": cache})
            if args.only != "peer":
                run("ours", {"side": "cvformers", "peer_cache": False})
        results.append(row)

    any_row = next(v for r in results for k, v in r.items() if k != "case")
    print(f"\ntorch {any_row['torch']} CPU, {any_row['threads']} threads, {os.cpu_count()} cores; train batch "
          f"{args.batch}, {args.num_images} images; medians of {args.repeats} train steps / {args.gen_repeats} "
          f"sampling runs per side and round, {args.rounds} round(s) alternating the sides; "
          f"conv window {args.conv_kernel}; cvformers mlp_ratio {args.mlp_ratio:g}; "
          "peak RSS per worker process (MB)\n")
    print("| case | DALLE-pytorch (s) | DALLE-pytorch use_cache (s) | cvformers (s) | speed-up | speed-up vs use_cache "
          "| RSS peer | RSS cvformers | params peer / ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in results:
        peer, cached, ours = (median(r[k]["times"]) if k in r else nan for k in ("peer", "peer_cached", "ours"))
        rss_peer = max((r[k]["rss_mb"] for k in ("peer", "peer_cached") if k in r), default=nan)
        rss_ours = r["ours"]["rss_mb"] if "ours" in r else nan
        params = " / ".join(f"{r[k]['params'] / 1e6:.2f}M" if k in r else "—" for k in (
            "peer" if "peer" in r else "peer_cached", "ours"))
        print(f"| {r['case']} | {fmt_s(peer)} | {fmt_s(cached)} | {fmt_s(ours)} | {fmt_x(peer, ours)} | "
              f"{fmt_x(cached, ours)} | {rss_peer:.0f} | {rss_ours:.0f} | {params} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
