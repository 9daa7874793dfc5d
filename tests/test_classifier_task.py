"""`cvformers train classifier` end to end on the built-in shapes data: a run folder that
reloads, an eval accuracy in metrics.jsonl, `cvformers eval classifier` and `attention` on it."""

import json

import pytest
import torch

from cvformers.cli import main
from cvformers.config import ConfigError
from cvformers.errors import UserError
from cvformers.models.vision import ImageClassifier, classifier_config
from cvformers.tasks.classifier import classifier_task
from cvformers.tasks import TaskArgs

torch.set_num_threads(1)


def test_train_eval_and_attention_on_shapes(tmp_path, capsys):
    run = tmp_path / "run"
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\nsize = 48\neval_size = 24\n[train]\neval_every = 4\nlog_every = 2\n'
                    'warmup_steps = 1\ncheckpoint_every = 4\n[model]\nmixup_alpha = 0.2\n'
                    '[model.backbone]\ndepth = 2\n')
    assert main(["train", "classifier", "--model", "vit_nano_patch4_32", "--data", "shapes", "--out", str(run),
                 "--steps", "4", "--batch-size", "8", "--config", str(toml)]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if x["split"] == "eval"]
    assert evals and 0.0 <= evals[-1]["acc"] <= 1.0
    config = (run / "config.toml").read_text()
    assert 'family = "vit"' in config and "num_classes = 4" in config and "depth = 2" in config
    capsys.readouterr()
    assert main(["eval", "classifier", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 24 and 0.0 <= result["accuracy"] <= 1.0
    assert main(["eval", "classifier", str(run), "--limit", "10"]) == 0
    assert "accuracy" in capsys.readouterr().out
    from cvformers.images import save_png

    image = save_png(torch.rand(3, 32, 32), tmp_path / "x.png")
    assert main(["attention", str(image), "--model", str(run), "--out", str(tmp_path / "a.png"), "--query", "1,2"]) == 0
    assert (tmp_path / "a.png").is_file()
    assert main(["attention", str(image), "--model", str(run), "--out", str(tmp_path / "b.png"), "--query", "x"]) == 2


def test_task_rejects_conflicts_and_unknowns(tmp_path):
    with pytest.raises(ConfigError, match="disagree"):
        classifier_task(TaskArgs(out=tmp_path, data="shapes", model="vit_nano_patch4_32",
                                 config={"model": {"preset": "mixer_nano_patch4_32"}}))
    with pytest.raises(ConfigError, match="unknown config key"):
        classifier_task(TaskArgs(out=tmp_path, data="shapes", model="vit_nano_patch4_32",
                                 config={"model": {"backbone": {"depht": 2}}}))
    assert main(["train", "classifier", "--model", "vit_huge_patch99", "--data", "shapes",
                 "--out", str(tmp_path / "r")]) == 2


def test_mixup_loss_is_finite_and_eval_has_no_augmentation():
    torch.manual_seed(0)
    cfg = classifier_config("convmixer_256_8_28")
    cfg.mixup_alpha = 0.4
    model = ImageClassifier(cfg)
    batch = {"image": torch.rand(4, 1, 28, 28), "label": torch.tensor([0, 1, 2, 3])}
    loss, metrics = model.train().loss(batch)
    assert torch.isfinite(loss) and set(metrics) == {"loss", "acc"}
    model.eval()
    assert model.loss(batch)[0].item() == model.loss(batch)[0].item()  # deterministic in eval mode


def test_folder_classes_come_from_sub_folders(tmp_path):
    from cvformers.data import DataConfig
    from cvformers.data.labels import classification_dataset, count_classes
    from cvformers.images import save_png

    for cls in ("boot", "shirt"):
        for i in range(10):
            save_png(torch.full((3, 8, 8), 0.1 if cls == "boot" else 0.9), tmp_path / "d" / cls / f"{i}.png")
            (tmp_path / "d" / cls / f"{i}.txt").write_text(f"a {cls}\n")
    data = DataConfig(name=f"folder:{tmp_path / 'd'}", image_size=16, channels=1)
    train, held = classification_dataset(data, "train"), classification_dataset(data, "test")
    assert (len(train), len(held)) == (18, 2) and count_classes(data.name, train) == 2
    assert {train[i]["label"] for i in range(18)} == {0, 1}
    assert train[0]["image"].shape == (1, 16, 16)
    save_png(torch.rand(3, 8, 8), tmp_path / "d" / "loose.png")
    (tmp_path / "d" / "loose.txt").write_text("loose\n")
    with pytest.raises(UserError, match="one sub-folder per class"):
        classification_dataset(data, "train")
