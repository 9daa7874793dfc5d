"""Linear-probe accuracy of a CLIP image encoder (CLIP §3.2), against the same encoder untrained.

Features: the image tower's output (before normalisation) on ``--train`` images of the
probe dataset; classifier: multinomial logistic regression fitted with L-BFGS and a small L2
penalty, as the paper does; score: accuracy on ``--test`` test images. The untrained
baseline is the same config with a fresh random initialisation (seed 0).

    python benchmarks/clip_linear_probe.py runs/clip-openclipart --data fashion-mnist
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from cvformers.data import build_dataset, collate
from cvformers.models.clip import CLIP
from cvformers.loading import load_clip
from cvformers.images import fit_images


@torch.no_grad()
def features(model, dataset, n: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for start in range(0, min(n, len(dataset)), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, n, len(dataset)))])
        xs.append(model.encode_image(fit_images(batch["image"], model.cfg.image_size)))
        ys.append(batch["label"])
    return torch.cat(xs), torch.cat(ys)


def probe(train_x, train_y, test_x, test_y, l2: float = 1e-3, steps: int = 200) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(train_y.max()) + 1
    w = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ w + b, train_y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((test_x @ w + b).argmax(1) == test_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="CLIP run folder (or weight file)")
    parser.add_argument("--data", default="fashion-mnist", help="labelled dataset spec")
    parser.add_argument("--train", type=int, default=5000, help="probe training images")
    parser.add_argument("--test", type=int, default=2000, help="probe test images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trained, _ = load_clip(args.run)
    torch.manual_seed(0)
    untrained = CLIP(trained.cfg).eval()
    kw = {"image_size": trained.cfg.image_size, "channels": trained.cfg.in_channels}
    train_set, test_set = build_dataset(args.data, "train", **kw), build_dataset(args.data, "test", **kw)
    for name, model in (("trained", trained), ("untrained", untrained)):
        tx, ty = features(model, train_set, args.train)
        vx, vy = features(model, test_set, args.test)
        acc = probe(tx, ty, vx, vy)
        print(json.dumps({"encoder": name, "data": args.data, "train": len(ty), "test": len(vy),
                          "linear_probe_acc": round(acc, 4)}))


if __name__ == "__main__":
    main()
