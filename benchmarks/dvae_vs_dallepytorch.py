"""cvformers' dVAE against DALLE-pytorch 1.6.6's DiscreteVAE, measured in one run.

Same data, same code grid (8×8 for 32×32 images), same codebook size (512), parameter counts
within ±20%, same optimizer (AdamW, warmup + cosine decay, clipping), batch size, steps and
data order. Each model is trained with its own objective and step size: cvformers' dVAE with
the paper's (logit-Laplace ELBO, Gumbel-softmax with τ and β schedules) at the lr of
``cvformers train dvae``, and again with ``recon_loss = "mse"`` and no KL (the peer's objective
on our architecture, to separate the architecture from the objective); DiscreteVAE with its library defaults (MSE on images normalised to
[-1, 1], Gumbel-softmax at τ = 0.9, KL weight 0) at each lr of ``--peer-lrs`` (its train_vae.py
uses 1e-3), keeping its best. Reported on held-out images:
PSNR of decode(encode(x)) with the argmax codes, codebook perplexity (exp of the entropy of the
code histogram) and usage; then encode / decode throughput in images/s on this machine.

Datasets: ``shapes`` 32×32 RGB (the test split is held out), Fashion-MNIST padded 28 -> 32,
one channel (its test split).

Run:   bash benchmarks/setup_peers.sh
       .venv-bench/bin/python benchmarks/dvae_vs_dallepytorch.py --steps 300 --minutes 5
``--minutes`` caps each model's training time; the table says how many steps each did.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dvae_peer import import_dalle_pytorch  # noqa: E402

from cvformers.data import build_dataset  # noqa: E402
from cvformers.eval.reconstruction import code_histogram, perplexity_of, psnr  # noqa: E402
from cvformers.train.schedule import lr_at  # noqa: E402
from cvformers.vae.dvae import DiscreteVAE, DVAEConfig  # noqa: E402
from cvformers.vae.tasks import DVAE_SMALL, dvae_train_defaults  # noqa: E402

DATASETS = {"shapes": dict(spec="shapes", channels=3), "fashion-mnist": dict(spec="fashion-mnist", channels=1)}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the two models behind one small interface -----------------------------------------------


class Ours:
    """cvformers' dVAE with the paper's objective, or (``recon_loss="mse"``) the peer's objective
    choices: squared error and no KL term (DiscreteVAE's defaults), on our architecture."""

    def __init__(self, channels: int, total_steps: int, recon_loss: str = "logit_laplace"):
        extra = {"recon_loss": recon_loss, "kl_weight": 0.0} if recon_loss == "mse" else {}
        self.model = DiscreteVAE(DVAEConfig(**{**DVAE_SMALL, "channels": channels, **extra}))
        self.name = "cvformers dVAE" + (" (MSE, no KL)" if recon_loss == "mse" else "")
        self.total_steps = total_steps

    def loss(self, images: torch.Tensor, step: int) -> torch.Tensor:
        self.model.on_train_step(step, self.total_steps)
        return self.model.loss({"image": images})[0]

    def encode(self, images):
        return self.model.encode(images)

    def decode(self, ids):
        return self.model.decode(ids)


class Peer:
    name = "DALLE-pytorch DiscreteVAE"

    def __init__(self, channels: int, target_params: int):
        self.DiscreteVAE = import_dalle_pytorch().DiscreteVAE
        # the closest parameter count to ours among its own knobs (2 stride-2 layers: 32 -> 8)
        best = min(
            ((h, r, d) for h in range(16, 161, 8) for r in (0, 1, 2) for d in (64, 128, 256)),
            key=lambda c: abs(n_params(self._build(channels, *c)) - target_params),
        )
        self.hparams = dict(zip(("hidden_dim", "num_resnet_blocks", "codebook_dim"), best))
        torch.manual_seed(0)
        self.model = self._build(channels, *best)

    def _build(self, channels, hidden_dim, num_resnet_blocks, codebook_dim):
        return self.DiscreteVAE(image_size=32, num_tokens=512, codebook_dim=codebook_dim, num_layers=2,
                                num_resnet_blocks=num_resnet_blocks, hidden_dim=hidden_dim, channels=channels)

    def loss(self, images, step):
        return self.model(images, return_loss=True)

    @torch.no_grad()
    def encode(self, images):
        return self.model.get_codebook_indices(images).view(len(images), 8, 8)

    @torch.no_grad()
    def decode(self, ids):
        out = self.model.decode(ids.flatten(1))
        return (out * 0.5 + 0.5).clamp(0, 1)  # undo its normalisation (mean 0.5, std 0.5)


# --- data, training, measuring ------------------------------------------------------------


def load_images(spec: str, split: str, channels: int, limit: int) -> torch.Tensor:
    kw = {"size": limit} if spec == "shapes" else {"limit": limit}
    ds = build_dataset(spec, split=split, image_size=32, channels=channels, **kw)
    return torch.stack([ds[i]["image"] for i in range(min(limit, len(ds)))])


def train(wrapper, images: torch.Tensor, steps: int, minutes: float, batch_size: int, lr: float, seed: int):
    model = wrapper.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start, done = time.perf_counter(), 0
    for step in range(steps):
        if minutes and time.perf_counter() - start > minutes * 60:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=lr, total_steps=steps, warmup_steps=min(50, steps // 10), min_lr_ratio=0.0125)
        batch = images[torch.randint(0, len(images), (batch_size,), generator=order)]
        loss = wrapper.loss(batch, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done += 1
    model.eval()
    return done, time.perf_counter() - start


@torch.no_grad()
def measure(wrapper, images: torch.Tensor, batch_size: int = 100) -> dict[str, float]:
    counts = torch.zeros(512, dtype=torch.float64)
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        ids = wrapper.encode(x)
        total += float(psnr(wrapper.decode(ids), x)) * len(x)
        counts += code_histogram(ids, 512)
    return {"psnr": total / len(images), "perplexity": perplexity_of(counts), "usage": float((counts > 0).double().mean())}


@torch.no_grad()
def throughput(fn, x: torch.Tensor, repeats: int = 3) -> float:
    fn(x)  # warm-up
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps for each model")
    p.add_argument("--minutes", type=float, default=0, help="cap on each model's training time (0: none)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="peak lr of cvformers' dVAE (default: cvformers train dvae's)")
    p.add_argument("--peer-lrs", default="1e-3,3e-3", help="peak lrs tried for DiscreteVAE; its best is reported")
    p.add_argument("--datasets", default="shapes,fashion-mnist")
    p.add_argument("--objectives", default="logit_laplace,mse",
                   help="cvformers dVAE objectives to train: logit_laplace (the paper), mse (the peer's: MSE, no KL)")
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--eval-images", type=int, default=1000, help="held-out images for PSNR and perplexity")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.datasets.split(","):
        spec, channels = DATASETS[name]["spec"], DATASETS[name]["channels"]
        train_x = load_images(spec, "train", channels, args.train_images)
        test_x = load_images(spec, "test", channels, args.eval_images)
        runs = []
        for objective in args.objectives.split(","):
            torch.manual_seed(args.seed)
            runs.append((Ours(channels, args.steps, objective), args.lr or dvae_train_defaults().lr))
        runs += [(Peer(channels, n_params(runs[0][0].model)), float(lr)) for lr in args.peer_lrs.split(",")]
        results = []
        for wrapper, lr in runs:
            steps, seconds = train(wrapper, train_x, args.steps, args.minutes, args.batch_size, lr, args.seed)
            results.append((wrapper, lr, steps, seconds, measure(wrapper, test_x)))
            print(f"{name} {wrapper.name} lr {lr}: {steps} steps {seconds:.0f}s {results[-1][-1]}", file=sys.stderr, flush=True)
        peers = [r for r in results if isinstance(r[0], Peer)]
        best_peer = max(peers, key=lambda r: r[-1]["psnr"])
        for wrapper, lr, steps, seconds, m in [r for r in results if isinstance(r[0], Ours)] + [best_peer]:
            x = test_x[:64]
            ids = wrapper.encode(x)
            row = {
                "data": name, "model": wrapper.name, "params": n_params(wrapper.model), "steps": steps,
                "lr": lr, "train_s": seconds, **m,
                "encode_img_s": throughput(wrapper.encode, x), "decode_img_s": throughput(wrapper.decode, ids),
                "hparams": getattr(wrapper, "hparams", {}),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"\n{args.batch_size}-image batches, {args.threads} thread(s); "
          f"held-out: {args.eval_images} test images; grid 8×8, 512 codes")
    print("| data | model | params | steps | lr | train s | PSNR dB | perplexity | usage | encode img/s | decode img/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['model']} | {r['params'] / 1e3:.0f}k | {r['steps']} | {r['lr']:g} | {r['train_s']:.0f} | "
              f"{r['psnr']:.2f} | {r['perplexity']:.1f} | {100 * r['usage']:.0f}% | {r['encode_img_s']:.0f} | "
              f"{r['decode_img_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
