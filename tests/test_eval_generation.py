"""Caption fidelity and rerank gain, driven by stand-in pipelines whose answers we know."""

from types import SimpleNamespace

import pytest
import torch

from cvformers.data.shapes import ShapesDataset, render
from cvformers.errors import UserError
from cvformers.eval.generation import caption_fidelity, rerank_gain


class StandInPipe:
    """Draws the true scene for the first ``good`` of every ``period`` images, noise otherwise.

    Its reranker knows which images are the true ones (they have exact palette colours)."""

    def __init__(self, split, good, period, rerank=True):
        data = ShapesDataset(split=split, image_size=32)
        self.truth = {data.item(i)["caption"]: data.item(i)["record"] for i in range(20)}
        self.good, self.period = good, period
        self.image_size = 32
        self.reranks = rerank

    def generate(self, caption, num_images, seed, **sampling):
        g = torch.Generator().manual_seed(seed)
        images = torch.stack([render(self.truth[caption], 32) if i % self.period < self.good
                              else torch.rand(3, 32, 32, generator=g) for i in range(num_images)])
        is_true = torch.tensor([i % self.period < self.good for i in range(num_images)], dtype=torch.float)
        order = is_true.argsort(descending=True, stable=True) if self.reranks else torch.arange(num_images)
        return SimpleNamespace(images=images[order])


@pytest.mark.parametrize("split", ["test", "heldout"])
def test_caption_fidelity_counts_true_images(split):
    r = caption_fidelity(StandInPipe(split, good=3, period=4), split, n_captions=10, per_caption=8)
    assert r["images"] == 80
    assert r["fidelity"] == pytest.approx(0.75)
    perfect = caption_fidelity(StandInPipe(split, good=1, period=1), split, n_captions=10, per_caption=2)
    assert perfect["fidelity"] == 1.0 and perfect["colour"] == 1.0


def test_rerank_gain_top1_against_random():
    r = rerank_gain(StandInPipe("heldout", good=1, period=8), "heldout", n_captions=10, candidates=16)
    assert r["clip_top1"] == 1.0
    assert r["random_candidate"] == pytest.approx(1 / 8)
    assert r["gain_points"] == pytest.approx(87.5)
    assert r["oracle"] == 1.0  # every caption had a true candidate
    none = rerank_gain(StandInPipe("heldout", good=0, period=8), "heldout", n_captions=4, candidates=8)
    assert none["oracle"] == 0.0 and none["clip_top1"] == 0.0
    with pytest.raises(UserError, match="reranker"):
        rerank_gain(StandInPipe("heldout", 1, 8, rerank=False), "heldout", n_captions=2)
    with pytest.raises(UserError, match="captions"):
        caption_fidelity(StandInPipe("test", 1, 1), "test", n_captions=0)


def test_paraphrase_wording_scores_the_same_scenes_in_other_words():
    class Wording(StandInPipe):  # draws the true scene of a caption in either wording
        def __init__(self):
            super().__init__("test", good=1, period=1)
            reworded = ShapesDataset(split="test", image_size=32, paraphrase=1.0)
            self.truth.update({reworded.item(i)["caption"]: reworded.item(i)["record"] for i in range(20)})
            self.asked = []
            self.tokenizer = SimpleNamespace(unknown_words=lambda text: [w for w in ("is", "there") if w in text.split()])

        def generate(self, caption, num_images, seed, **sampling):
            self.asked.append(caption)
            return super().generate(caption, num_images, seed, **sampling)

    pipe = Wording()
    r = caption_fidelity(pipe, "test", n_captions=10, per_caption=2, wording="paraphrase")
    template = [ShapesDataset("test").item(i)["caption"] for i in range(10)]
    assert r["wording"] == "paraphrase" and r["fidelity"] == 1.0
    assert all(a != t for a, t in zip(pipe.asked, template))  # every caption reworded
    assert set(r["words_never_seen"]) <= {"is", "there"}
    with pytest.raises(UserError, match="wording"):
        caption_fidelity(pipe, "test", n_captions=2, wording="shouting")


def test_show_misses_writes_each_failed_image_with_its_verdict(tmp_path):
    import json

    from PIL import Image

    from cvformers.eval.fidelity import check_image, verdict

    folder = tmp_path / "misses"
    (folder).mkdir()
    (folder / "misses_007.png").write_bytes(b"left by an earlier call")
    r = caption_fidelity(StandInPipe("test", good=3, period=4), "test", n_captions=10, per_caption=4,
                         show_misses=folder)
    lines = [json.loads(x) for x in (folder / "misses.jsonl").read_text().splitlines()]
    assert r["misses"] == len(lines) == round((1 - r["fidelity"]) * r["images"]) == 10
    assert [x["index"] for x in lines] == [4 * i + 3 for i in range(10)]  # the noise image of each caption
    assert all(x["verdict"] != "right" and x["caption"] and not x["check"]["all_correct"] for x in lines)
    assert sorted(p.name for p in folder.glob("*.png")) == ["misses_000.png"]  # 10 misses: one sheet
    width, height = Image.open(folder / "misses_000.png").size
    assert width == 6 * 128 + 7 * 4 and height > 2 * 128  # two rows of tiles, each with words under it
    assert caption_fidelity(StandInPipe("test", good=1, period=1), "test", n_captions=2, per_caption=2,
                            show_misses=folder)["misses"] == 0
    assert (folder / "misses.jsonl").read_text() == "" and not list(folder.glob("*.png"))
    # the verdict names what is wrong: a true scene checked against another scene's record
    data = ShapesDataset(split="test", image_size=32)
    a, b = data.item(0)["record"], data.item(1)["record"]
    said = verdict(check_image(render(a, 32), b), b)
    assert said != "right" and any(o["colour"] in said for o in b["objects"])
    assert verdict(check_image(render(a, 32), a), a) == "right"
    with pytest.raises(UserError, match="not a folder"):
        caption_fidelity(StandInPipe("test", 1, 1), "test", n_captions=1, show_misses=folder / "misses.jsonl")
