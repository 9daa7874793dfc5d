"""DINO k-NN accuracy: lightly's DINO trained with the recipe of configs/dino_fmnist.toml, scored
like a cvformers run.

The peer half of the DINO comparison in docs/results.md. lightly trains the same backbone
(``vit_nano_patch4_28_paper``, [CLS] features) with the same head sizes (3-layer MLP 512 wide,
bottleneck 128, K = 1024), batch, steps and views (2 global of 28 px, 6 local of 12 px, crop
scales 0.4–1 and 0.05–0.4, the paper's flip / jitter / grey / blur / solarize via lightly's
``DINOTransform``), and the same schedules as ``cvformers train dino`` with that config: AdamW,
lr warmed up for 50 steps then cosine to 0.002 x, weight decay 0.04 -> 0.4 on a cosine, teacher
momentum 0.996 -> 1, teacher temperature 0.04, centre momentum 0.9, the last layer frozen for the
first 10% of the steps, gradient norm clipped at 3.0. What differs is lightly's own code: its
transforms per PIL image, ``DINOProjectionHead``, ``DINOLoss``, ``update_momentum``, and the ViT
around which a lightly user builds DINO: by default timm's ``VisionTransformer`` of the same shape,
starting from the same weights (``--peer-backbone``: ``cvformers-all-tokens`` is cvformers' ViT
computing its last block for every token as timm does, ``cvformers`` the ViT as ``train dino`` runs it).

The teacher's backbone is then scored as ``cvformers eval knn`` scores a run (weighted k-NN,
k = 20, T = 0.07, and the linear probe), on the same memory bank and queries; with ``--ours RUN``
the cvformers run is scored in the same process, so both figures come from one function.

Run it beside ``cvformers train dino`` with one thread each, so both see the same machine:

    bash scripts/setup_lightly_env.sh
    OMP_NUM_THREADS=1 cvformers train dino --config configs/dino_fmnist.toml --steps 900 --out runs/dino &
    OMP_NUM_THREADS=1 .venv-lightly/bin/python benchmarks/dino_knn_vs_lightly.py --steps 900 --out runs/dino-lightly
    .venv-lightly/bin/python benchmarks/dino_knn_vs_lightly.py --eval-only --out runs/dino-lightly --ours runs/dino
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
from _common import PEER_BACKBONES, peer_vit  # noqa: E402

K, HIDDEN, BOTTLENECK, LOCAL, PRESET = 1024, 512, 128, 6, "vit_nano_patch4_28_paper"


def build_student(peer_backbone: str):
    from lightly.models.modules import DINOProjectionHead

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = peer_vit(PRESET, peer_backbone)
            self.head = DINOProjectionHead(self.backbone.num_features, HIDDEN, BOTTLENECK, K, freeze_last_layer=1)

        def forward(self, x):
            return self.head(self.backbone(x))

    return Net


def train(args) -> dict:
    from lightly.loss import DINOLoss
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.dino_transform import DINOTransform
    from torchvision.transforms.functional import to_pil_image

    from cvformers.data import build_dataset
    from cvformers.train.schedule import lr_at
    from cvformers.train.teacher import cosine_schedule
    from cvformers.train.trainer import param_groups

    torch.manual_seed(args.seed)
    data = build_dataset("fashion-mnist", split="train", image_size=28, channels=1)
    Net = build_student(args.peer_backbone)
    student, teacher = Net(), Net()  # lightly's head holds a weight_norm, which deepcopy refuses
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                         student_temp=0.1, center_momentum=0.9)
    groups = param_groups(student, 0.04)
    opt = torch.optim.AdamW(groups, lr=args.lr)
    transform = DINOTransform(global_crop_size=28, local_crop_size=12, n_local_views=LOCAL, cj_strength=0.5,
                              normalize={"mean": [0.5], "std": [0.5]})
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    freeze_steps = args.steps // 10
    start = time.perf_counter()
    log = []
    for step in range(args.steps):
        idx = [order[(step * args.batch_size + j) % len(order)] for j in range(args.batch_size)]
        per_image = [transform(to_pil_image(data[i]["image"])) for i in idx]
        views = [torch.stack(v) for v in zip(*per_image)]
        lr = lr_at(step, lr=args.lr, total_steps=args.steps, warmup_steps=50, min_lr_ratio=0.002)
        wd = cosine_schedule(0.04, 0.4, step, args.steps)
        for g in opt.param_groups:
            g["lr"] = lr
            if g["weight_decay"] > 0:
                g["weight_decay"] = wd
        with torch.no_grad():
            teacher_out = [teacher(v) for v in views[:2]]
        student_out = [student(v) for v in views]
        loss = criterion(teacher_out, student_out, epoch=0)
        loss.backward()
        student.head.cancel_last_layer_gradients(current_epoch=0 if step < freeze_steps else 1)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        m = cosine_schedule(0.996, 1.0, step, args.steps)
        update_momentum(student.backbone, teacher.backbone, m=m)
        update_momentum(student.head, teacher.head, m=m)
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            log.append({"step": step + 1, "loss": loss.item(), "elapsed": elapsed,
                        "images_per_s": (step + 1) * args.batch_size / elapsed})
            print(json.dumps(log[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in teacher.backbone.state_dict().items()}, out / "teacher_backbone.safetensors")
    summary = {"steps": args.steps, "batch_size": args.batch_size, "seconds": round(log[-1]["elapsed"], 1),
               "images_per_s": round(log[-1]["images_per_s"], 2), "threads": torch.get_num_threads(),
               "backbone": args.peer_backbone}
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    return summary


def lightly_encoder(out: Path):
    from safetensors.torch import load_file

    from cvformers.eval.knn import FeatureEncoder
    from cvformers.models.vision import create_model

    backbone = create_model(PRESET, num_classes=0)
    backbone.load_state_dict(load_file(out / "teacher_backbone.safetensors"))
    backbone.eval()
    return FeatureEncoder(lambda x: backbone((x - 0.5) / 0.5), 28, 1, {"model": str(out), "kind": "lightly dino"})


def score(encoder, args) -> dict:
    from cvformers.data import DataConfig
    from cvformers.data.labels import classification_dataset
    from cvformers.eval.knn import extract_features, knn_accuracy, linear_probe

    cfg = DataConfig(name="fashion-mnist", image_size=28, channels=1)
    train_f, train_y = extract_features(encoder, classification_dataset(cfg, "train"), limit=args.train_limit)
    test_f, test_y = extract_features(encoder, classification_dataset(cfg, "test"))
    return {**encoder.info, "knn_top1": round(knn_accuracy(train_f, train_y, test_f, test_y), 4),
            "linear_top1": round(linear_probe(train_f, train_y, test_f, test_y), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="folder for the lightly teacher's backbone and train.json")
    ap.add_argument("--eval-only", action="store_true", help="score an earlier --out without training")
    ap.add_argument("--ours", help="a cvformers dino run to score with the same bank and queries")
    ap.add_argument("--peer-backbone", choices=PEER_BACKBONES, default="timm",
                    help="the ViT lightly's DINO trains (same shape and initial weights; see the module doc)")
    ap.add_argument("--train-limit", type=int, default=20000, help="memory bank: the first N train images")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.eval_only:
        train(args)
    import lightly

    print(f"torch {torch.__version__}, lightly {lightly.__version__}; bank {args.train_limit} train images, "
          f"queries the 10k test split; k = 20, T = 0.07")
    rows = [score(lightly_encoder(out), args)]
    if (out / "train.json").is_file():
        rows[0].update(json.loads((out / "train.json").read_text()))
    if args.ours:
        from cvformers.eval.knn import feature_encoder

        rows.append(score(feature_encoder(args.ours), args))
        metrics = [json.loads(line) for line in (Path(args.ours) / "metrics.jsonl").read_text().splitlines()]
        train_rows = [m for m in metrics if m.get("split") == "train" and "elapsed" in m]
        if train_rows:
            # the mean of the logged windows' rates: the k-NN monitor's evaluations are not training time
            rate = sum(m["items_per_s"] for m in train_rows) / len(train_rows)
            rows[-1].update({"steps": train_rows[-1]["step"], "seconds": round(train_rows[-1]["elapsed"], 1),
                             "images_per_s": round(rate, 2)})
    for row in rows:
        print(json.dumps(row))
    if len(rows) == 2 and not any(math.isnan(r.get("images_per_s", math.nan)) for r in rows):
        print(f"cvformers / lightly training speed: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
