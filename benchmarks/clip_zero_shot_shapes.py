"""Zero-shot accuracy of a CLIP trained on `shapes`, on held-out colour–shape compositions.

The `heldout` split only holds scenes with a colour–shape pair that never occurs in training
(red triangle, green plus, blue circle, yellow square). On its one-object scenes we classify,
zero-shot, the colour (8-way), the shape (4-way) and the pair (32-way, every colour x shape,
the held-out pairs included), once with a single template and once with a template ensemble
(CLIP §3.1.4). The `test` split (seen pairs) is printed beside it for reference.

    python benchmarks/clip_zero_shot_shapes.py runs/clip-shapes [--n 2000]
"""

from __future__ import annotations

import argparse
import json

import torch

from cvformers.data.shapes import COLOURS, SHAPES, ShapesDataset
from cvformers.loading import load_clip
from cvformers.pipelines.zero_shot import ZeroShotClassifier

SIZES = ("small", "large")
FRAMES = ("{}", "an image of {}", "a picture of {}", "a drawing of {}")
# what the ensembles average over: the words that are not the label
ENSEMBLES = {
    "colour": [f.format(f"a {s} {{}} {shape}") for f in FRAMES for s in SIZES for shape in SHAPES],
    "shape": [f.format(f"a {s} {c} {{}}") for f in FRAMES for s in SIZES for c in COLOURS],
    "pair": [f.format(f"a {s} {{}}") for f in FRAMES for s in SIZES],
}
SINGLE = {"colour": ["a {}"], "shape": ["a {}"], "pair": ["a {}"]}


def one_object_scenes(split: str, n: int, image_size: int):
    ds = ShapesDataset(split, image_size=image_size, size=n)
    keep = [i for i in range(len(ds)) if ds.item(i)["record"]["relation"] is None]
    images = torch.stack([ds[i]["image"] for i in keep])
    objects = [ds.item(i)["record"]["objects"][0] for i in keep]
    return images, objects


@torch.no_grad()
def accuracies(model, tokenizer, images, objects, templates) -> dict[str, float]:
    truth = {
        "colour": [o["colour"] for o in objects],
        "shape": [o["shape"] for o in objects],
        "pair": [f"{o['colour']} {o['shape']}" for o in objects],
    }
    labels = {"colour": list(COLOURS), "shape": list(SHAPES), "pair": [f"{c} {s}" for c in COLOURS for s in SHAPES]}
    out = {}
    for task in ("colour", "shape", "pair"):
        clf = ZeroShotClassifier(model, tokenizer, labels[task], templates[task])
        predicted = clf.predict(images)
        out[task] = sum(p == t for p, t in zip(predicted, truth[task])) / len(predicted)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="CLIP run folder trained on shapes")
    parser.add_argument("--n", type=int, default=2000, help="scenes drawn per split (about half have one object)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_clip(args.run)
    for split in ("heldout", "test"):
        images, objects = one_object_scenes(split, args.n, model.cfg.image_size)
        for name, templates in (("single", SINGLE), ("ensemble", ENSEMBLES)):
            acc = accuracies(model, tokenizer, images, objects, templates)
            print(json.dumps({"split": split, "templates": name, "scenes": len(objects),
                              **{k: round(v, 4) for k, v in acc.items()}}))


if __name__ == "__main__":
    main()
