"""Where a DINO training step spends its time, and what ``torch.compile`` of the backbones changes.

One step of ``configs/dino_fmnist.toml`` (``vit_nano_patch4_28_paper``, head 512 / 128 / K = 1024,
batch 64, 2 global views of 28 px + 6 local of 12 px) split into: making the views, the teacher's
forward, the student's forward and loss, the backward, the optimizer step (with clipping) and the
teacher's EMA. With ``--compile`` it then times eager steps against steps whose student and teacher
backbones went through ``torch.compile`` (``nn.Module.compile``, keys unchanged), in interleaved
rounds, and prints the compile time. With ``--all-tokens`` it times, the same way, steps whose ViTs
compute their last block for every token (as timm and every other ViT do) against cvformers' default,
where the last block updates the class token alone.

    python benchmarks/dino_step_profile.py --threads 1 [--compile] [--all-tokens]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from cvformers.config import to_dict
from cvformers.data import build_dataset
from cvformers.data.multicrop import MultiCropCollate, MultiCropConfig
from cvformers.models.dino import DINO, DINOConfig, dino_loss
from cvformers.models.vision import preset_config
from cvformers.train.teacher import DINOTeacher, TeacherConfig
from cvformers.train.trainer import param_groups

PARTS = ("views", "teacher forward", "student forward + loss", "backward", "optimizer", "teacher EMA")


def make_step(model: DINO, items: list[dict], batch: int, compiled: bool, all_tokens: bool = False):
    """A function step(i, times) doing one training step on batch i, adding each part's seconds to ``times``."""
    model = copy.deepcopy(model)
    teacher = DINOTeacher(TeacherConfig(), total_steps=1000, out_dim=model.cfg.out_dim, publish=False)
    teacher.on_fit_start(model)
    if all_tokens:  # the ViT's every-token path: the same numbers, the last block over 1 + N tokens
        for vit in (model.backbone, teacher.teacher.backbone):
            vit.forward = lambda x, vit=vit: vit.forward_head(vit.forward_features(x))
    if compiled:
        model.backbone.compile()
        teacher.teacher.backbone.compile()
    opt = torch.optim.AdamW(param_groups(model, 0.04), lr=5e-4)
    collate = MultiCropCollate(MultiCropConfig(local_crops=6), 28)

    def step(i: int, times: dict[str, float] | None = None) -> None:
        marks = [time.perf_counter()]
        views = collate(items[(i * batch) % len(items):][:batch])["crops"]
        marks.append(time.perf_counter())
        targets = teacher.targets(views[:2])
        marks.append(time.perf_counter())
        loss = dino_loss(model.forward_views(views), targets, model.cfg.student_temp)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        teacher.after_step(model, i)
        marks.append(time.perf_counter())
        if times is not None:
            for part, a, b in zip(PARTS, marks, marks[1:]):
                times[part] = times.get(part, 0.0) + b - a

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps of the breakdown")
    ap.add_argument("--compile", action="store_true", help="also time eager against compiled backbones")
    ap.add_argument("--all-tokens", action="store_true",
                    help="also time the ViTs' every-token last block against the class-token one")
    ap.add_argument("--rounds", type=int, default=4, help="(--compile, --all-tokens) interleaved rounds of 4 steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = build_dataset("fashion-mnist", split="train", image_size=28, channels=1)
    items = [{"image": data[i]["image"], "caption": "", "label": 0} for i in range(args.batch_size * 6)]
    _, backbone = preset_config("vit_nano_patch4_28_paper")
    model = DINO(DINOConfig(backbone=to_dict(backbone), out_dim=1024, hidden_dim=512, bottleneck_dim=128))

    eager = make_step(model, items, args.batch_size, compiled=False)
    for i in range(3):
        eager(i)  # warm-up
    times: dict[str, float] = {}
    for i in range(args.steps):
        eager(3 + i, times)
    total = sum(times.values())
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, {args.steps} steps")
    for part in PARTS:
        print(f"{part:24s} {1000 * times[part] / args.steps:7.1f} ms")
    print(f"{'step':24s} {1000 * total / args.steps:7.1f} ms   {args.batch_size * args.steps / total:.1f} images/s")

    if args.compile:
        compiled = make_step(model, items, args.batch_size, compiled=True)
        start = time.perf_counter()
        compiled(0)
        compiled(1)
        print(f"compile (first two steps): {time.perf_counter() - start:.1f} s")
        interleave({"eager": eager, "compiled": compiled}, args)
    if args.all_tokens:
        every = make_step(model, items, args.batch_size, compiled=False, all_tokens=True)
        every(0)
        interleave({"class token (default)": eager, "every token": every}, args)


def interleave(steps: dict, args) -> None:
    """Rounds of 4 steps of each in turn, the order flipped every round; medians and the ratio."""
    speeds: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            start = time.perf_counter()
            for i in range(4):
                steps[name](100 + 4 * r + i)
            speeds[name].append(4 * args.batch_size / (time.perf_counter() - start))
    medians = {name: statistics.median(xs) for name, xs in speeds.items()}
    first = next(iter(medians.values()))
    for name, med in medians.items():
        print(f"{name:22s} {med:6.1f} images/s (median of {args.rounds} rounds)   first / this = {first / med:.2f}x")


if __name__ == "__main__":
    main()
