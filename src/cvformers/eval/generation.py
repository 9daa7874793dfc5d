"""Caption fidelity of a text-to-image model on ``shapes``, and what CLIP reranking adds.

For ``n_captions`` scenes of a split (``test``: the training distribution, unseen seeds;
``heldout``: colour–shape pairs never seen in training) the model draws ``per_caption`` images
from each caption, and the shapes checker (``eval.fidelity.check_image``) says whether every
object has the right colour, shape and position. Fidelity is the share of images that pass.

Reranking (DALL-E §2.3 / §3.1 keep the candidates CLIP scores best): ``rerank_gain`` draws
``candidates`` images per caption, and compares the fidelity of CLIP's top-1 against that of a
random candidate (the mean over all candidates, i.e. its expected value).

    cvformers eval fidelity --model default --split heldout --captions 100 --per-caption 8
    cvformers eval fidelity --model default --split heldout --captions 100 --rerank 32
    cvformers eval fidelity --model default --split heldout --wording paraphrase

``wording``: ``template`` scores the captions of the data as generated; ``paraphrase`` says each
scene in an everyday wording instead ("the red circle is above the blue square", "red circle
above blue square": ``data.shapes.paraphrase_caption``), the same scenes, so the two figures
side by side say how much a model depends on the template wording.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from cvformers.errors import UserError
from cvformers.eval.fidelity import check_image, fidelity_report
from cvformers.utils import progress


WORDINGS = ("template", "paraphrase")


def _scenes(split: str, n_captions: int, image_size: int, seed: int, wording: str = "template") -> list[dict]:
    from cvformers.data.shapes import ShapesDataset

    if wording not in WORDINGS:
        raise UserError(f"unknown wording {wording!r}; known: {', '.join(WORDINGS)}")
    data = ShapesDataset(split=split, image_size=image_size, seed=seed,
                         paraphrase=1.0 if wording == "paraphrase" else 0.0)
    if n_captions < 1 or n_captions > len(data):
        raise UserError(f"--captions must be between 1 and {len(data)}, got {n_captions}")
    return [data.item(i)["record"] for i in range(n_captions)]  # each record carries its caption


def caption_fidelity(pipe, split: str = "test", n_captions: int = 100, per_caption: int = 8,
                     seed: int = 0, wording: str = "template", **sampling: Any) -> dict[str, float]:
    """Share of generated images whose every object is right, with per-field rates."""
    images, records, unknown = [], [], set()
    for i, scene in enumerate(progress(_scenes(split, n_captions, pipe.image_size, seed, wording),
                                       desc=f"{split} captions", unit="caption")):
        with warnings.catch_warnings():  # one count in the report rather than a warning per caption
            warnings.simplefilter("ignore")
            out = pipe.generate(scene["caption"], num_images=per_caption, seed=seed + i, **sampling)
        tokenizer = getattr(pipe, "tokenizer", None)
        unknown.update(tokenizer.unknown_words(scene["caption"]) if hasattr(tokenizer, "unknown_words") else ())
        images.append(out.images)
        records += [scene] * len(out.images)
    report = fidelity_report(torch.cat(images), records)
    return {"split": split, "wording": wording, "captions": n_captions, "images": len(records), **report,
            "words_never_seen": sorted(unknown)}


def rerank_gain(pipe, split: str = "heldout", n_captions: int = 100, candidates: int = 32,
                seed: int = 0, wording: str = "template", **sampling: Any) -> dict[str, float]:
    """Fidelity of the reranker's top-1 of ``candidates`` against a random candidate.

    ``oracle`` is the share of captions with at least one faithful candidate: the ceiling of any
    reranker, which says whether a low top-1 is the reranker's fault or the generator's.
    """
    if not pipe.reranks:
        raise UserError("this model has no CLIP reranker: pass --clip RUN or use a bundle with clip/")
    top1, random_pick, oracle = [], [], []
    for i, scene in enumerate(progress(_scenes(split, n_captions, pipe.image_size, seed, wording),
                                       desc=f"{split} captions", unit="caption")):
        out = pipe.generate(scene["caption"], num_images=candidates, seed=seed + i, **sampling)
        ok = torch.tensor([float(check_image(image, scene)["all_correct"]) for image in out.images])
        top1.append(ok[0].item())  # generate returns reranked candidates best first
        random_pick.append(ok.mean().item())
        oracle.append(ok.max().item())
    n = len(top1)
    return {"split": split, "wording": wording, "captions": n, "candidates": candidates,
            "random_candidate": sum(random_pick) / n, "clip_top1": sum(top1) / n,
            "oracle": sum(oracle) / n,
            "gain_points": 100 * (sum(top1) - sum(random_pick)) / n}
