"""Upper bound on caption fidelity set by the image tokenizer: the fidelity checker's score of
decode(encode(x)) on shapes images, for the test split and the held-out colour–shape pairs.

If reconstructions of held-out scenes pass the checker, the tokenizer can represent them and a
low held-out generation score is the transformer's (compositional generalisation), not its.

    python benchmarks/image_tokenizer_fidelity.py --vae runs/ship_vqvae --n 400
"""

from __future__ import annotations

import argparse

import torch

from cvformers.data import build_dataset, collate
from cvformers.data.shapes import SHAPES
from cvformers.eval.fidelity import alter_record, fidelity_report
from cvformers.loading import load_vae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", default="runs/ship_vqvae", help="image tokenizer run folder")
    p.add_argument("--n", type=int, default=400, help="images per split")
    args = p.parse_args()
    torch.set_num_threads(1)
    vae = load_vae(args.vae)
    for split in ("test", "heldout"):
        data = build_dataset("shapes", split=split, image_size=vae.image_size, size=args.n)
        batch = collate([data[i] for i in range(len(data))])
        with torch.no_grad():
            recon = vae.decode(vae.encode(batch["image"]))
        original, rebuilt = fidelity_report(batch["image"], batch["record"]), fidelity_report(recon, batch["record"])
        print(f"{split}: originals {100 * original['fidelity']:.1f}%, reconstructions {100 * rebuilt['fidelity']:.1f}% "
              f"(colour {100 * rebuilt['colour']:.1f}, shape {100 * rebuilt['shape']:.1f}, "
              f"position {100 * rebuilt['position']:.1f})")
        # the same reconstructions against captions with one object's shape changed: want ~0
        altered = [alter_record(rec, "shape", SHAPES, i) for i, rec in enumerate(batch["record"])]
        print(f"{split}: reconstructions passing a caption with one wrong shape "
              f"{100 * fidelity_report(recon, altered)['fidelity']:.1f}%")


if __name__ == "__main__":
    main()
