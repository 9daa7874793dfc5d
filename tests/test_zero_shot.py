"""Zero-shot classification: template ensembles, probabilities, bad input, the CLI."""

import pytest
import torch
import torch.nn.functional as F

from cvformers.cli import main
from cvformers.errors import UserError
from cvformers.models.clip import CLIP, clip_config
from cvformers.pipelines.zero_shot import (ZeroShotClassifier, check_templates, class_embeddings,
                                           parse_labels, zero_shot_classify)
from cvformers.text import BPETokenizer

torch.set_num_threads(1)

LABELS = ["circle", "square", "triangle"]
TEMPLATES = ["a photo of a {}.", "a {} shape", "an image of a small {}"]


@pytest.fixture(scope="module")
def clip_and_tok():
    words = [t.format(l) for l in LABELS + ["plus"] for t in TEMPLATES] * 3
    tok = BPETokenizer.train(words, vocab_size=300, text_len=12)
    torch.manual_seed(0)
    model = CLIP(clip_config("tiny", context_length=12, vocab_size=tok.num_text_tokens,
                             real_vocab_size=tok.vocab_size, embed_dim=16, vision_width=32, text_width=32))
    return model.eval(), tok


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real CLIP run folder from `cvformers train clip` (1 step on a few shapes)."""
    out = tmp_path_factory.mktemp("clip") / "run"
    cfg = out.parent / "c.toml"
    cfg.write_text("[data]\nsize = 32\neval_size = 16\n[text]\nbpe_train_captions = 200\n"
                   "[train]\neval_every = 0\nlog_every = 1\n")
    assert main(["train", "clip", "--data", "shapes", "--out", str(out), "--steps", "1",
                 "--batch-size", "8", "--config", str(cfg)]) == 0
    return out


def test_template_ensemble_is_mean_of_normalised_embeddings(clip_and_tok):
    model, tok = clip_and_tok
    got = class_embeddings(model, tok, LABELS, TEMPLATES)
    with torch.no_grad():
        for k, label in enumerate(LABELS):
            per_template = [model.encode_text(tok.encode([t.format(label)]), normalize=True)[0] for t in TEMPLATES]
            expected = F.normalize(torch.stack(per_template).mean(0), dim=0)
            assert torch.allclose(got[k], expected, atol=1e-6)
    single = class_embeddings(model, tok, LABELS, TEMPLATES[:1])
    assert not torch.allclose(single, got)  # the ensemble is not just the first template


def test_probabilities(clip_and_tok):
    model, tok = clip_and_tok
    clf = ZeroShotClassifier(model, tok, "circle, square,triangle", TEMPLATES)
    assert clf.labels == LABELS
    probs = clf.predict_proba(torch.rand(5, 3, 40, 40))  # resized to the model's 32 px
    assert probs.shape == (5, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-6)
    assert all(p in LABELS for p in clf.predict(torch.rand(2, 3, 32, 32)))


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="empty"):
        parse_labels(" , ")
    with pytest.raises(UserError, match="empty"):
        parse_labels([])
    with pytest.raises(UserError, match="no '\\{\\}'"):
        check_templates(["a photo of a cat"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        zero_shot_classify(tmp_path / "no-run", "a,b", [bad])  # fails on the image before loading


def test_cli_zero_shot_and_errors(run_dir, tmp_path, capsys):
    from cvformers.data import build_dataset
    from cvformers.images import save_png

    images = []
    for i, item in enumerate(build_dataset("shapes", split="heldout", size=2)):
        images.append(str(tmp_path / f"{i}.png"))
        save_png(item["image"], images[-1])
    assert main(["zero-shot", "--clip", str(run_dir), "--labels", "circle,square,triangle,plus",
                 "--template", "a photo of a {}.", "--template", "a {}", *images]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[1] in ("circle", "square", "triangle", "plus")
    bad = tmp_path / "bad.png"
    bad.write_text("x")
    for argv in (["--labels", ""], ["--labels", "a,b", "--template", "nothing"], ["--labels", "a"]):
        files = [str(bad)] if argv == ["--labels", "a"] else images
        assert main(["zero-shot", "--clip", str(run_dir), *argv, *files]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cvformers: error:") and "\n" not in err


def test_cli_eval_retrieval(run_dir, capsys):
    import json

    assert main(["eval", "retrieval", "--clip", str(run_dir), "--limit", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == 16 and 0.0 <= result["i2t_R@1"] <= result["i2t_R@5"] <= result["i2t_R@10"] <= 1.0


def test_a_clip_run_carries_its_own_zero_shot_wording(run_dir):
    from cvformers.config import load_toml
    from cvformers.data.shapes import parse_caption, render, zero_shot_templates
    from cvformers.pipelines.zero_shot import DEFAULT_TEMPLATES, run_templates

    # the run writes the templates it was trained to read, and zero-shot uses them by default
    assert load_toml(run_dir / "config.toml")["text"]["zero_shot_templates"] == zero_shot_templates()
    assert ZeroShotClassifier.load(run_dir, LABELS).templates == zero_shot_templates()
    assert ZeroShotClassifier.load(run_dir, LABELS, ["a {}"]).templates == ["a {}"]  # given ones win
    assert run_templates("no/such/run.pt") == list(DEFAULT_TEMPLATES)
    # the shipped CLIP in its own wording names a green plus (a held-out pair) a plus
    clf = ZeroShotClassifier.load("default/clip", ["circle", "square", "triangle", "plus"])
    assert clf.templates == zero_shot_templates()
    assert clf.predict(render(parse_caption("a large green plus"))[None]) == ["plus"]
