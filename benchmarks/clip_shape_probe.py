"""Does a CLIP's image embedding say an object's shape apart from its colour?

A linear probe reads the shape of the one object in ``shapes`` scenes from the CLIP image
embedding. It is fitted on training scenes (training colour–shape pairs only) and scored on
training-distribution scenes (``test``) and on scenes of the held-out pairs (``heldout``: a
yellow square, a blue circle … that CLIP never saw). A CLIP whose embedding holds shape in a
direction of its own, whatever the colour, scores as well on ``heldout`` as on ``test``; one that
learnt "yellow things are round" does not. This is what an unCLIP decoder reading the embedding
can draw at best (unCLIP §7: CLIP embeddings do not bind attributes to objects), and what a
reranker sees.

Also printed: zero-shot shape with the colour named ("a yellow square" against "a yellow
circle", "a yellow triangle", "a yellow plus"), the text side of the same question.

    python benchmarks/clip_shape_probe.py unclip/clip default/clip runs/clip-colourless
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from cvformers.data.shapes import COLOURS, SHAPES, ShapesDataset
from cvformers.pipelines.rerank import ClipReranker


def one_object_scenes(split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` one-object scenes of a split: images [n, 3, 32, 32], shape and colour indices."""
    data = ShapesDataset(split, image_size=32, seed=seed)
    images, shapes, colours = [], [], []
    for i in range(len(data)):
        if len(images) == n:
            break
        record = data.item(i)["record"]
        if len(record["objects"]) == 1:
            images.append(data[i]["image"])
            shapes.append(SHAPES.index(record["objects"][0]["shape"]))
            colours.append(COLOURS.index(record["objects"][0]["colour"]))
    return torch.stack(images), torch.tensor(shapes), torch.tensor(colours)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, steps: int = 500) -> torch.nn.Linear:
    """Multinomial logistic regression on unit embeddings (full batch, Adam)."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(features.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(probe(features * 10), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", nargs="+", help="CLIP run folders or bundle parts (unclip/clip, default/clip)")
    parser.add_argument("--train", type=int, default=3000, help="one-object training scenes the probe is fitted on")
    parser.add_argument("--eval", type=int, default=600, help="one-object scenes scored per split")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fit = one_object_scenes("train", args.train)
    scored = {split: one_object_scenes(split, args.eval) for split in ("test", "heldout")}
    for path in args.clip:
        reranker = ClipReranker.load(path)
        with torch.no_grad():
            fit_features = reranker.embed_images(fit[0])
        probe = fit_probe(fit_features, fit[1])
        prompts = reranker.embed_texts([f"a {c} {s}" for c in COLOURS for s in SHAPES]).view(len(COLOURS), len(SHAPES), -1)
        row = {"clip": path}
        for split, (images, shapes, colours) in scored.items():
            with torch.no_grad():
                features = reranker.embed_images(images)
                row[f"probe_{split}"] = round((probe(features * 10).argmax(1) == shapes).float().mean().item(), 4)
                named = torch.einsum("nd,nsd->ns", features, prompts[colours]).argmax(1)
                row[f"zero_shot_{split}"] = round((named == shapes).float().mean().item(), 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
