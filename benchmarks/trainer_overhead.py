"""Cost of the training loop itself: Trainer.fit vs a bare AdamW loop on the same small MLP.

    python benchmarks/trainer_overhead.py [--steps 300] [--width 256]

Both train the same model on the same batches (in-memory tensors, num_workers=0, 1 thread);
the difference per step is what the loop adds (data loader, schedule, clipping, metrics,
logging). Checkpointing is excluded (checkpoint_every = steps: one write at the end, timed apart).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cvformers.train import TrainConfig, Trainer
from cvformers.train.setup import TaskSetup


@dataclass
class MlpConfig:
    width: int = 256  # hidden width


class Mlp(nn.Module):
    def __init__(self, cfg: MlpConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.width), nn.GELU(),
                                 nn.Linear(cfg.width, 1))

    def loss(self, batch):
        loss = F.mse_loss(self.net(batch["x"]).squeeze(-1), batch["y"])
        return loss, {}


class Data(Dataset):
    def __init__(self, n=4096):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 64, generator=g), torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def collate(items):
    return {"x": torch.stack([it["x"] for it in items]), "y": torch.stack([it["y"] for it in items])}


def bare_loop(model, data, steps, batch_size, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    perm = torch.randperm(len(data))
    per_epoch = len(data) // batch_size
    t = time.perf_counter()
    for s in range(steps):
        idx = perm[(s % per_epoch) * batch_size : (s % per_epoch + 1) * batch_size].tolist()
        batch = collate([data[i] for i in idx])
        loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = Data()
    torch.manual_seed(0)
    bare = bare_loop(Mlp(MlpConfig(args.width)), data, args.steps, args.batch_size, 1e-3)
    torch.manual_seed(0)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=10,
                      checkpoint_every=args.steps, eval_every=0, log_every=50)
    setup = TaskSetup(kind="bench-mlp", model=Mlp(MlpConfig(args.width)), model_config=MlpConfig(args.width),
                      train_config=cfg, train_data=data, collate=collate)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(setup, out)
        t = time.perf_counter()
        metrics = trainer.fit()
        total = time.perf_counter() - t
    loop = metrics["elapsed"]  # wall time of the steps, excluding setup and the final checkpoint
    print(f"steps {args.steps}, batch {args.batch_size}, width {args.width}, 1 thread")
    print(f"bare AdamW loop     : {1e3 * bare / args.steps:.3f} ms/step")
    print(f"Trainer.fit (steps) : {1e3 * loop / args.steps:.3f} ms/step  "
          f"(overhead {1e3 * (loop - bare) / args.steps:+.3f} ms/step, {100 * (loop / bare - 1):+.1f}%)")
    print(f"Trainer.fit (total, incl. optimizer build, run files, one checkpoint): {total:.2f} s")


if __name__ == "__main__":
    main()
