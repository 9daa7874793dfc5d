"""Quality of a class-conditional DDPM run on Fashion-MNIST, read by one of our trained classifiers.

For each class, ``--per-class`` samples are drawn (DDIM, ``--steps`` steps, guidance ``--guidance``,
EMA weights). A classifier trained on the real training images (``cvformers train classifier``)
then gives two figures:

- **accuracy on samples**: the share of samples that the classifier assigns to the class they were
  drawn for, next to its accuracy on the real test images. (Ravuri & Vinyals' "classification
  accuracy score" is the other direction, a classifier trained on samples and tested on real
  images; this is the cheaper reading, which says whether the samples look like their class.)
- **FD on our classifier's features**: the Fréchet distance between the classifier's penultimate
  features of the samples and of real test images (``cvformers.eval.frechet``). It is not FID
  (that needs ImageNet's Inception-v3) and its scale is this classifier's own; the FD between two
  disjoint halves of the real test images, printed beside it, is the floor that sampling noise
  of the same size alone gives.

    python benchmarks/ddpm_quality.py --model runs/ddpm-fmnist --classifier runs/clf-fmnist --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="class-conditional ddpm run")
    parser.add_argument("--classifier", required=True, help="classifier run trained on the same data")
    parser.add_argument("--per-class", type=int, default=50, help="samples per class")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--batch", type=int, default=100, help="samples per sampling call")
    parser.add_argument("--real", type=int, default=2000, help="real test images for the FD (and its floor: two halves)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cvformers.data import DataConfig
    from cvformers.data.labels import classification_dataset
    from cvformers.diffusion.samplers import DiffusionSamplingConfig
    from cvformers.eval.frechet import frechet_distance, penultimate_features
    from cvformers.loading import load_run
    from cvformers.pipelines.diffusion import DiffusionPipeline

    pipe = DiffusionPipeline.load(args.model)
    classes = pipe.model.num_classes
    if not classes:
        raise SystemExit(f"{args.model} is not class-conditional")
    classifier, clf_cfg = load_run(args.classifier)
    data = clf_cfg.get("data", {})
    real_set = classification_dataset(DataConfig(name=data.get("name", "fashion-mnist"),
                                                 image_size=data.get("image_size", 28),
                                                 channels=data.get("channels", 1)), "test")
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(real_set), generator=g)[: args.real].tolist()
    real = torch.stack([real_set[i]["image"] for i in pick])
    real_labels = torch.tensor([int(real_set[i]["label"]) for i in pick])

    labels = torch.arange(classes).repeat_interleave(args.per_class)
    start = time.perf_counter()
    samples = []
    for i in range(0, len(labels), args.batch):
        chunk = labels[i:i + args.batch]
        sampling = DiffusionSamplingConfig(steps=args.steps, guidance=args.guidance, seed=args.seed + i)
        samples.append(pipe.generate(len(chunk), sampling, labels=chunk))
    samples = torch.cat(samples)
    seconds = time.perf_counter() - start

    fake_feats, fake_logits = penultimate_features(classifier, samples)
    real_feats, real_logits = penultimate_features(classifier, real)
    half = len(real) // 2
    acc_fake = (fake_logits.argmax(-1) == labels).float().mean().item()
    acc_real = (real_logits.argmax(-1) == real_labels).float().mean().item()
    per_class = [(fake_logits.argmax(-1)[labels == c] == c).float().mean().item() for c in range(classes)]
    print(f"{len(samples)} samples ({args.per_class} per class), {args.steps} DDIM steps, guidance {args.guidance}, "
          f"{seconds:.0f} s, {torch.get_num_threads()} thread(s)")
    print(f"  classifier accuracy: {100 * acc_fake:.1f}% on samples, {100 * acc_real:.1f}% on {len(real)} real test images")
    print("  per class on samples: " + " ".join(f"{c}:{100 * a:.0f}%" for c, a in enumerate(per_class)))
    print(f"  FD on our classifier's features, samples vs {len(real)} real: {frechet_distance(fake_feats, real_feats):.2f}")
    print(f"  same, {len(samples)} samples vs {half} real: "
          f"{frechet_distance(fake_feats, real_feats[:half]):.2f}; "
          f"floor, {half} real vs the other {len(real) - half} real: "
          f"{frechet_distance(real_feats[:half], real_feats[half:]):.2f}")


if __name__ == "__main__":
    main()
