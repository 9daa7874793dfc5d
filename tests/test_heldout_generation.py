"""FD on CLIP features and CLIP R-precision of generated images on held-out caption-folder pairs."""

import json

import pytest
import torch
import torch.nn.functional as F

from cvformers.cli import main
from cvformers.eval.heldout_generation import HeldoutGenerationConfig, heldout_generation, r_precision


def test_r_precision_counts_own_caption_first():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(30, 16), dim=-1)
    assert r_precision(text.clone(), text, [f"c{i}" for i in range(30)], distractors=9) == 1.0
    shuffled = text[torch.roll(torch.arange(30), 1)]  # every image looks like the next caption
    assert r_precision(shuffled, text, [f"c{i}" for i in range(30)], distractors=29) == 0.0
    # a caption equal to the true one (case aside) is never a distractor: a cat has one possible
    captions = ["A cat"] * 15 + ["a cat"] * 14 + ["a dog"]
    assert r_precision(text, text, captions, distractors=1) == 1.0
    with pytest.raises(Exception, match="distractors"):
        r_precision(text, text, captions, distractors=2)


class _Judge:
    """A stand-in CLIP: an image's embedding is its mean colour; a caption names a colour."""

    model = object()
    colours = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "grey": (0.5, 0.5, 0.5)}

    def embed_images(self, images):
        return F.normalize(images.mean((2, 3)) - 0.3, dim=-1)

    def embed_texts(self, texts):
        return F.normalize(torch.tensor([self.colours[t.split()[0]] for t in texts]) - 0.3, dim=-1)


class _Pipe:
    """Draws the caption's colour (``faithful``) or always grey."""

    device = torch.device("cpu")

    def __init__(self, faithful: bool):
        self.faithful = faithful

    def generate(self, caption, num_images=1, candidates=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        colour = _Judge.colours[caption.split()[0] if self.faithful else "grey"]
        image = torch.tensor(colour)[:, None, None] * 0.8 + 0.2 * torch.rand(3, 8, 8, generator=g)
        return type("Out", (), {"images": image[None]})


def _held_out(n=40):
    g = torch.Generator().manual_seed(1)
    names = ["red", "green", "blue"]
    captions = [f"{names[i % 3]} thing {i}" for i in range(n)]
    real = torch.stack([torch.tensor(_Judge.colours[c.split()[0]])[:, None, None] * 0.8
                        + 0.2 * torch.rand(3, 8, 8, generator=g) for c in captions])
    return real, captions


def test_faithful_model_scores_near_the_floor_and_a_grey_one_far():
    real, captions = _held_out()
    config = HeldoutGenerationConfig(distractors=1)
    good = heldout_generation(_Pipe(True), _Judge(), real, captions, config)
    bad = heldout_generation(_Pipe(False), _Judge(), real, captions, config)
    assert good["half_size"] == 20 and good["fd_tokenizer"] is None and good["fd_std"] > 0 and good["r_precision_tokenizer"] is None
    assert good["fd"] < 3 * good["fd_floor"] + 1e-3 < bad["fd"]
    # a distractor of the same colour ties with the own caption, and a tie is no hit: about 2/3
    assert good["r_precision"] == good["r_precision_real"] > 0.55
    assert bad["r_precision"] < 0.45  # grey is nearer to one colour than the others: a hit a third of the time


def test_cli_scores_the_shipped_model_on_a_folder(tmp_path, capsys):
    from PIL import Image

    from cvformers.data.shapes import ShapesDataset

    data = ShapesDataset(size=24, image_size=32, seed=3)
    for i in range(24):
        item = data[i]
        Image.fromarray((item["image"].permute(1, 2, 0) * 255).byte().numpy()).save(tmp_path / f"s{i}.png")
        (tmp_path / f"s{i}.txt").write_text(item["caption"] + "\n")
    assert main(["eval", "generation", "--model", "default", "--data", f"folder:{tmp_path}", "--holdout", "0.5",
                 "--limit", "8", "--distractors", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairs"] == 8 and result["half_size"] == 4
    assert result["fd_floor"] >= 0 and result["fd_tokenizer"] >= 0 and result["fd"] >= 0
    assert 0 <= result["r_precision"] <= 1 and result["r_precision_real"] >= 0.5  # the shipped CLIP knows shapes
    assert result["reranked_by_judge"] is False
    assert main(["eval", "generation", "--model", "default", "--data", f"folder:{tmp_path}", "--holdout", "0.5",
                 "--limit", "4", "--distractors", "2", "--candidates", "2"]) == 0
    reranked = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reranked["candidates"] == 2 and reranked["reranked_by_judge"] is True  # the bundle's CLIP did both
    assert main(["eval", "generation", "--model", "default"]) == 2  # shapes, not a caption folder
    assert "caption folder" in capsys.readouterr().err
