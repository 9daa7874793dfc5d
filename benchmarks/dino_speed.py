"""DINO training speed: cvformers' ``train dino`` step against lightly's DINO pipeline, same ViT.

Both train the same backbone (the shape and initial weights of cvformers' ``vit_nano_patch4_28_paper``,
[CLS] features; lightly's around timm's ``VisionTransformer`` by default, ``--peer-backbone``) with the same
head sizes (3-layer MLP 512 wide, bottleneck 128, K = 1024, weight-normalised last layer), the
same batch, the same views (2 global of 28 px, 6 local of 12 px, the paper's augmentations) and
the same per-step work: student over all views, teacher over the global views, the loss over all
pairs, AdamW, the teacher's EMA and the centre.

- ours: ``MultiCropCollate`` (views made on the whole batch) + ``DINO.loss`` + ``DINOTeacher``;
- lightly: ``DINOTransform`` on each PIL image (what lightly's examples feed it), then
  ``DINOProjectionHead``, ``DINOLoss``, ``update_momentum`` and ``cosine_schedule`` as in its
  DINO example (each view through the student on its own);
- lightly with our views: the same, but fed ``MultiCropCollate``'s views, which isolates the
  method's step from the data pipeline.

Rounds alternate (ours, lightly, lightly-with-our-views, ...) so that a shared machine's drift hits
all alike; the median images/s of each and the ratios are printed.

    bash scripts/setup_lightly_env.sh
    .venv-lightly/bin/python benchmarks/dino_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PEER_BACKBONES, peer_vit  # noqa: E402

PRESET = "vit_nano_patch4_28_paper"

K, HIDDEN, BOTTLENECK, LOCAL = 1024, 512, 128, 6


def fashion_images(n: int) -> torch.Tensor:
    from cvformers.data import build_dataset

    data = build_dataset("fashion-mnist", split="train", image_size=28, channels=1)
    return torch.stack([data[i]["image"] for i in range(n)])


def ours(images: torch.Tensor, batch: int):
    from cvformers.config import to_dict
    from cvformers.data.multicrop import MultiCropCollate, MultiCropConfig
    from cvformers.models.dino import DINO, DINOConfig
    from cvformers.models.vision import preset_config
    from cvformers.train.teacher import DINOTeacher, TeacherConfig
    from cvformers.train.trainer import param_groups

    _, backbone = preset_config(PRESET)
    model = DINO(DINOConfig(backbone=to_dict(backbone), out_dim=K, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK))
    teacher = DINOTeacher(TeacherConfig(), total_steps=1000, out_dim=K, publish=False)
    teacher.on_fit_start(model)
    opt = torch.optim.AdamW(param_groups(model, 0.04), lr=5e-4)
    collate = MultiCropCollate(MultiCropConfig(local_crops=LOCAL), 28)
    items = [{"image": im, "caption": "", "label": 0} for im in images]
    state = {"step": 0}

    def step(i: int) -> None:
        b = collate(items[(i * batch) % len(items):][:batch])
        loss, _ = model.loss(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.after_step(model, state["step"])
        state["step"] += 1

    return step


def lightly_pipeline(images: torch.Tensor, batch: int, our_views: bool, peer_backbone: str):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.dino_transform import DINOTransform
    from lightly.utils.scheduler import cosine_schedule
    from torchvision.transforms.functional import to_pil_image

    from cvformers.data.multicrop import MultiCropCollate, MultiCropConfig
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = peer_vit(PRESET, peer_backbone)
            self.head = DINOProjectionHead(128, HIDDEN, BOTTLENECK, K, freeze_last_layer=1)

        def forward(self, x):
            return self.head(self.backbone((x - 0.5) / 0.5 if our_views else x))

    student = Net()
    teacher = Net()  # lightly's head holds a weight_norm, which deepcopy refuses
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=K, warmup_teacher_temp_epochs=5)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.04)
    if our_views:
        collate = MultiCropCollate(MultiCropConfig(local_crops=LOCAL), 28)
        items = [{"image": im, "caption": "", "label": 0} for im in images]
        make = lambda rows: collate(rows)["crops"]  # noqa: E731
    else:
        transform = DINOTransform(global_crop_size=28, local_crop_size=12, n_local_views=LOCAL,
                                  cj_strength=0.5, normalize={"mean": [0.5], "std": [0.5]})
        items = [to_pil_image(im) for im in images]

        def make(rows):
            per_image = [transform(im) for im in rows]
            return [torch.stack(v) for v in zip(*per_image)]
    state = {"step": 0}

    def step(i: int) -> None:
        views = make(items[(i * batch) % len(items):][:batch])
        m = cosine_schedule(state["step"], 1000, 0.996, 1)
        update_momentum(student.backbone, teacher.backbone, m=m)
        update_momentum(student.head, teacher.head, m=m)
        with torch.no_grad():
            teacher_out = [teacher(v) for v in views[:2]]
        student_out = [student(v) for v in views]
        loss = criterion(teacher_out, student_out, epoch=0)
        loss.backward()
        student.head.cancel_last_layer_gradients(current_epoch=1)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and pipeline")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peer-backbone", choices=PEER_BACKBONES, default="timm",
                    help="the ViT lightly's DINO trains (same shape and initial weights)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = fashion_images(args.batch_size * 8)
    runs = {"cvformers": ours(images, args.batch_size),
            "lightly": lightly_pipeline(images, args.batch_size, False, args.peer_backbone),
            "lightly + our views": lightly_pipeline(images, args.batch_size, True, args.peer_backbone)}
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for name, step in runs.items():
        step(0)  # warm-up
    for r in range(args.rounds):
        for name, step in runs.items():
            t = time.perf_counter()
            for i in range(args.steps):
                step(1 + r * args.steps + i)
            speeds[name].append(args.steps * args.batch_size / (time.perf_counter() - t))
    import lightly

    print(f"torch {torch.__version__}, lightly {lightly.__version__} around {args.peer_backbone}'s ViT, "
          f"{args.threads} thread(s), batch "
          f"{args.batch_size}, 2 x 28 px + {LOCAL} x 12 px views, K = {K}; {args.rounds} rounds of {args.steps} steps")
    ours_speed = statistics.median(speeds["cvformers"])
    for name, xs in speeds.items():
        med = statistics.median(xs)
        print(f"{name:22s} {med:7.1f} images/s   cvformers / this = {ours_speed / med:.2f}x")


if __name__ == "__main__":
    main()
