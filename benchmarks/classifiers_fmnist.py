"""Fashion-MNIST test accuracy and training images/s of every vision family, at equal time budget.

Each model is trained with the machinery of ``cvformers train classifier`` (the classifier task,
its augmentation — random crop with 2 px padding, horizontal flips — label smoothing 0.1, AdamW,
warmup + cosine, the one Trainer) for a budget of ``--minutes`` of compute: first every model's
training speed is measured, one after the other and before any training starts; each model's
step count is then set so that its run would fill the budget at that speed, and its learning-rate
schedule spans exactly that run. Runs that share the machine (``--jobs``) take longer in wall
time but train the same steps, so the budget does not depend on what ran beside them. Then the
whole 10k test split is scored.

Next to our families, lucidrains' ``vit-pytorch`` ViT at the parameter count of our ViT (±10%,
checked), trained in the same run with the same data, augmentation, loss, optimizer and budget:
its backbone replaces ours inside the same ``ImageClassifier``. ``peer_small`` is vit-pytorch's
``vit_for_small_dataset.ViT`` (its shifted patch tokens and locality self-attention, Lee et al.
2021) in the same way: the fair peer for our ViT with ``shifted_patches`` / ``locality_attention``.

    python benchmarks/classifiers_fmnist.py --minutes 20 --threads 1 --jobs 2
    python benchmarks/classifiers_fmnist.py --speed-only --threads 1 --out runs/speeds   # on an idle machine
    python benchmarks/classifiers_fmnist.py --calibration runs/speeds/speeds.json --threads 1 --jobs 3
    python benchmarks/classifiers_fmnist.py --minutes 2 --models vit_nano_patch4_28,peer

Needs Fashion-MNIST (``apt-get install dataset-fashion-mnist``) and, for the peer,
``pip install --no-deps vit-pytorch`` (it needs only einops, already a dependency).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from cvformers.eval.classification import accuracy
from cvformers.nn.layers import count_parameters
from cvformers.tasks.classifier import classifier_task
from cvformers.tasks import TaskArgs
from cvformers.train.trainer import Trainer

# Sized for a 20-minute budget on one CPU core (several epochs each); with --jobs 2 the
# ViT and its peer run side by side, so they share the machine's state.
FAMILY_PRESETS = [
    "vit_nano_patch4_28",
    "peer",  # lucidrains vit-pytorch ViT at vit_nano_patch4_28's size
    # also available: "peer_small", vit-pytorch's ViT for small datasets (SPT + LSA) at that size
    "mixer_nano_patch4_28",
    "convmixer_256_8_ks3_p4_28",
    "swin_pico_patch2_window7_28",
    "mixer_attention_nano_patch4_28",
    "convmixer_mixer_256_8_ks3_p4_28",
]
PEER_LIKE = "vit_nano_patch4_28"


PEERS = {"peer": "vit.py", "peer_small": "vit_for_small_dataset.py"}  # name -> vit-pytorch module file


def load_peer_vit(module_file: str = "vit.py"):
    """vit-pytorch's ``ViT`` class of one module file without importing the package ``__init__``
    (it pulls in torchvision for its DINO module, which this environment does not need)."""
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None:
        raise SystemExit("vit-pytorch is not installed: pip install --no-deps vit-pytorch")
    path = Path(spec.submodule_search_locations[0]) / module_file
    module_spec = importlib.util.spec_from_file_location("vit_pytorch_vit", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ViT


def peer_backbone(ours_cfg: dict, name: str = "peer"):
    """vit-pytorch ViT with our ViT's patch size, width, depth, heads and MLP width."""
    vit_cls = load_peer_vit(PEERS[name])
    d = ours_cfg["embed_dim"]
    return vit_cls(image_size=ours_cfg["image_size"], patch_size=ours_cfg["patch_size"],
                   num_classes=ours_cfg["num_classes"], dim=d, depth=ours_cfg["depth"],
                   heads=ours_cfg["num_heads"], mlp_dim=int(d * ours_cfg["mlp_ratio"]),
                   channels=ours_cfg["in_chans"], dim_head=d // ours_cfg["num_heads"], pool="cls")


def trainable_copy(model):
    """A copy of ``model`` in training mode with its own AdamW, so timing leaves the original alone."""
    model = copy.deepcopy(model).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model, opt, batch: dict) -> None:
    loss, _ = model.loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def images_per_second(model, batch: dict, steps: int = 3, warmup: int = 2) -> float:
    """Training speed (forward + backward + AdamW) of a copy of ``model`` on one batch."""
    model, opt = trainable_copy(model)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        train_step(model, opt, batch)
    return steps * len(batch["label"]) / (time.perf_counter() - start)


def build_setup(name: str, args, out: Path):
    """The classifier task of ``name`` (a preset, or a peer: vit-pytorch inside the same wrapper)."""
    preset = PEER_LIKE if name in PEERS else name
    task_args = TaskArgs(out=out, data=args.data, model=preset, batch_size=args.batch_size, lr=args.lr,
                         config={"train": {"eval_every": 0, "checkpoint_every": 10**9, "log_every": 50,
                                           "seed": args.seed, **json.loads(args.train_table)},
                                 "model": json.loads(args.model_table)})
    setup = classifier_task(task_args)
    ours_params = count_parameters(setup.model)
    if name in PEERS:
        setup.model.backbone = peer_backbone(setup.model_config.backbone, name)
        peer_params = count_parameters(setup.model)
        if abs(peer_params - ours_params) > 0.1 * ours_params:
            raise SystemExit(f"peer has {peer_params} parameters, ours {ours_params}: not within 10%")
    return setup


def interleaved_speeds(names: list[str], args) -> list[dict]:
    """Training images/s of every model with single steps alternated A, B, A, B, ... for
    ``args.interleave_steps`` steps each (after 3 warm-up steps), so slow drifts of a shared
    machine land on every model alike. Keeps the median and the mean step time of each."""
    from cvformers.data import collate

    setups = [build_setup(name, args, Path(args.out) / name) for name in names]
    batch = collate([setups[0].train_data[i] for i in range(args.batch_size)])
    runs = [trainable_copy(setup.model) for setup in setups]
    times = [[] for _ in names]
    for i in range(3 + args.interleave_steps):
        for (model, opt), taken in zip(runs, times):
            start = time.perf_counter()
            train_step(model, opt, batch)
            if i >= 3:
                taken.append(time.perf_counter() - start)
    n = args.batch_size
    return [speed_record(name, setup, n / statistics.median(taken), mean_images_per_s=n * len(taken) / sum(taken))
            for name, setup, taken in zip(names, setups, times)]


def speed_record(name: str, setup, speed: float, **extra) -> dict:
    return {"model": name, "family": "vit-pytorch" if name in PEERS else setup.model_config.family,
            "params": count_parameters(setup.model), "calibrated_images_per_s": speed, **extra}


def calibrate(name: str, args) -> dict:
    """Training images/s of one model, measured before any training runs (so on an idle machine
    the budgets do not depend on what else the benchmark is running)."""
    from cvformers.data import collate

    setup = build_setup(name, args, Path(args.out) / name)
    batch = collate([setup.train_data[i] for i in range(args.batch_size)])
    speed = images_per_second(setup.model, batch, steps=args.speed_steps)
    print(f"[{name}] {count_parameters(setup.model) / 1e6:.2f}M params, {speed:.0f} img/s", file=sys.stderr, flush=True)
    return speed_record(name, setup, speed)


def run_one(name: str, args, out_root: Path, speed: float) -> dict:
    out = out_root / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    setup = build_setup(name, args, out)
    steps = args.steps or max(10, int(args.minutes * 60 * speed / args.batch_size))
    cfg = setup.train_config
    cfg.steps, cfg.warmup_steps = steps, max(1, steps // 20)
    print(f"[{name}] {count_parameters(setup.model) / 1e6:.2f}M params, calibrated {speed:.0f} img/s "
          f"-> {steps} steps of {args.batch_size}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    Trainer(setup, out).fit()
    train_seconds = time.perf_counter() - start
    result = accuracy(setup.model, setup.eval_data, batch_size=256, limit=args.eval_limit)
    return {
        "model": name, "family": "vit-pytorch" if name in PEERS else setup.model_config.family,
        "params": count_parameters(setup.model), "steps": steps, "train_images": steps * args.batch_size,
        "train_minutes": train_seconds / 60, "train_images_per_s": steps * args.batch_size / train_seconds,
        "test_accuracy": result["accuracy"], "test_images": result["n"], "calibrated_images_per_s": speed,
    }


def run_in_worker(name: str, args, out_root: Path, speed: float) -> dict:
    """One model in a fresh process with ``args.threads`` threads (for ``--jobs`` > 1)."""
    torch.set_num_threads(args.threads or 1)
    row = run_one(name, args, out_root, speed)
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget per model")
    p.add_argument("--models", default=",".join(FAMILY_PRESETS), help="comma-separated presets; 'peer' = vit-pytorch")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-table", default="{}",
                   help='JSON of [model] settings for every model, e.g. \'{"crop_padding": 0}\' (augmentation off)')
    p.add_argument("--train-table", default="{}",
                   help='JSON of [train] settings for every model, e.g. \'{"weight_decay": 0.05}\'')
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=0, help="a fixed step count for every model instead of the budget")
    p.add_argument("--speed-only", action="store_true",
                   help="only measure each model's training images/s (writes OUT/speeds.json)")
    p.add_argument("--speed-steps", type=int, default=3, help="timed training steps per speed measurement")
    p.add_argument("--speed-rounds", type=int, default=1,
                   help="with --speed-only: measure every model this many times, alternating, and keep the median")
    p.add_argument("--interleave-steps", type=int, default=0,
                   help="measure speeds by alternating single training steps of the models this many times "
                        "each, keeping the median (steadier than --speed-rounds on a noisy machine); sizes "
                        "the budgets too, or with --speed-only just prints them")
    p.add_argument("--calibration", default=None,
                   help="speeds.json of an earlier --speed-only run to size the budgets from, instead of measuring")
    p.add_argument("--jobs", type=int, default=1,
                   help="models trained at once, each in its own process (use with --threads 1)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--out", default="runs/bench_classifiers_fmnist")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_root = Path(args.out)
    names = [name.strip() for name in args.models.split(",")]
    out_root.mkdir(parents=True, exist_ok=True)
    if args.calibration:  # speeds of an earlier --speed-only run (e.g. taken while the machine was idle)
        known = {r["model"]: r for r in json.loads(Path(args.calibration).read_text())}
        missing = [n for n in names if n not in known]
        if missing:
            raise SystemExit(f"{args.calibration} has no speed for {', '.join(missing)}")
        speeds = [known[n] for n in names]
    elif args.interleave_steps:
        speeds = interleaved_speeds(names, args)
    else:
        rounds = [[calibrate(name, args) for name in names] for _ in range(args.speed_rounds)]
        speeds = [dict(runs[0], calibrated_images_per_s=statistics.median(r["calibrated_images_per_s"] for r in runs))
                  for runs in zip(*rounds)]
    if args.speed_only:
        (out_root / "speeds.json").write_text(json.dumps(speeds, indent=1))
        print(f"\ntraining images/s (forward, backward, AdamW; batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads)")
        first = speeds[0]["calibrated_images_per_s"]
        for r in speeds:
            mean = f"  mean {r['mean_images_per_s']:7.1f}" if "mean_images_per_s" in r else ""
            print(f"{r['model']:32s} {r['family']:16s} {r['params'] / 1e6:7.2f}M {r['calibrated_images_per_s']:7.1f}"
                  f"{mean}  ({r['calibrated_images_per_s'] / first:.3f}x the first)")
        return 0
    rates = [r["calibrated_images_per_s"] for r in speeds]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, max_tasks_per_child=1) as pool:
            rows = list(pool.map(run_in_worker, names, [args] * len(names), [out_root] * len(names), rates))
    else:
        rows = [run_in_worker(name, args, out_root, rate) for name, rate in zip(names, rates)]
    (out_root / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{args.data}, {args.minutes:g} min training budget per model, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads per model, {args.jobs} at once")
    print(f"{'model':32s} {'family':16s} {'params':>8s} {'steps':>6s} {'min':>5s} {'img/s':>7s} {'calib':>7s} {'test acc':>8s}")
    for r in rows:
        print(f"{r['model']:32s} {r['family']:16s} {r['params'] / 1e6:7.2f}M {r['steps']:6d} {r['train_minutes']:5.1f} "
              f"{r['train_images_per_s']:7.1f} {r['calibrated_images_per_s']:7.1f} {100 * r['test_accuracy']:7.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
