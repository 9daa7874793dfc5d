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
from pathlib import Path
from typing import Any

import torch

from cvformers.errors import UserError
from cvformers.eval.fidelity import check_image, summarise_checks, verdict
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
                     seed: int = 0, wording: str = "template", show_misses: str | Path | None = None,
                     **sampling: Any) -> dict[str, float]:
    """Share of generated images whose every object is right, with per-field rates.

    ``show_misses``: a folder to write the images the checker failed into (``write_misses``)."""
    if show_misses is not None:
        _misses_folder(show_misses)  # refused before any image is drawn
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
    images = torch.cat(images)
    checks = [check_image(image, record) for image, record in zip(images, records)]
    report = summarise_checks(checks)
    result = {"split": split, "wording": wording, "captions": n_captions, "images": len(records), **report,
              "words_never_seen": sorted(unknown)}
    if show_misses is not None:
        result["misses"] = write_misses(show_misses, images, records, checks)
    return result


MISSES_FILE = "misses.jsonl"
MISSES_PER_SHEET = 24  # 6 columns x 4 rows of a sheet PNG
MAX_SHEETS = 4  # sheets drawn at most; misses.jsonl lists every miss


def _misses_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--show-misses {folder}: not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_misses(folder: str | Path, images: torch.Tensor, records: list[dict], checks: list[dict]) -> int:
    """The images the checker failed, each with its caption and the checker's verdict under it, as
    ``misses_000.png``, ... (at most ``MAX_SHEETS`` of ``MISSES_PER_SHEET``) and one line a miss in
    ``misses.jsonl`` (index among the images drawn, caption, verdict, the sheet and tile it is drawn
    on, the checker's full result). Returns the number of misses."""
    import json

    from cvformers.images import labelled_grid, save_png
    from cvformers.utils import atomic_write_bytes

    folder = _misses_folder(folder)
    for old in folder.glob("misses_*.png"):  # a sheet of an earlier call would mix with these
        old.unlink()
    missed = [i for i, c in enumerate(checks) if not c["all_correct"]]
    lines = []
    for n, i in enumerate(missed):
        sheet, tile = divmod(n, MISSES_PER_SHEET)
        drawn = sheet < MAX_SHEETS
        lines.append({"index": i, "caption": records[i]["caption"], "verdict": verdict(checks[i], records[i]),
                      "sheet": f"misses_{sheet:03d}.png" if drawn else None, "tile": tile if drawn else None,
                      "check": checks[i]})
    for sheet in range(min(MAX_SHEETS, -(-len(missed) // MISSES_PER_SHEET))):
        chunk = lines[sheet * MISSES_PER_SHEET:(sheet + 1) * MISSES_PER_SHEET]
        tiles = images[[line["index"] for line in chunk]]
        labels = [f"{line['caption']}\n{line['verdict']}" for line in chunk]
        save_png(labelled_grid(tiles, 6, min_tile=128, tile_labels=labels), folder / chunk[0]["sheet"],
                 metadata={"misses": json.dumps([line["index"] for line in chunk])})
    atomic_write_bytes(folder / MISSES_FILE, "".join(json.dumps(line) + "\n" for line in lines).encode())
    return len(missed)


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
