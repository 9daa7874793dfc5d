"""`cvformers plot` (curves from metrics.jsonl) and `cvformers eval classifier --confusion`."""

import json

import pytest
import torch

from cvformers.cli import main
from cvformers.errors import UserError

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from cvformers.eval.plots import DPI, PANEL_INCHES, plot_runs, read_metrics  # noqa: E402

torch.set_num_threads(1)


def _toy_run(folder, eval_metrics=("loss", "acc"), steps=(10, 20, 30)):
    folder.mkdir()
    lines = []
    for i, step in enumerate(steps):
        lines.append({"step": step, "split": "train", "loss": 2.0 / (i + 1), "acc": 0.1 * i, "lr": 1e-3,
                      "grad_norm": 1.0, "items_per_s": 50.0, "elapsed": float(i)})
        if step % 20 == 0:
            lines.append({"step": step, "split": "eval", **{m: 0.5 for m in eval_metrics}})
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 40, "spl'  # a line cut short by a crash
    (folder / "metrics.jsonl").write_text(text)
    return folder


def _panel_size(columns, rows):
    return round(PANEL_INCHES[0] * DPI * columns), round(PANEL_INCHES[1] * DPI * rows)


def test_plot_draws_the_metrics_in_the_file(tmp_path):
    run = _toy_run(tmp_path / "a")
    curves = read_metrics(run)
    assert curves["loss"] == [(10, 2.0), (20, 1.0), (30, 2.0 / 3)]
    assert curves["eval_acc"] == [(20, 0.5)]
    drawn = plot_runs([run], tmp_path / "c.png")
    assert drawn == ["loss", "lr", "eval_acc", "eval_loss"]  # bookkeeping (items_per_s, ...) left out
    assert Image.open(tmp_path / "c.png").size == _panel_size(3, 2)
    assert plot_runs([run], tmp_path / "d.png", ["loss", "grad_norm"]) == ["loss", "grad_norm"]
    assert Image.open(tmp_path / "d.png").size == _panel_size(2, 1)


def test_plot_overlays_runs_through_the_cli(tmp_path, capsys):
    a, b = _toy_run(tmp_path / "a"), _toy_run(tmp_path / "b", eval_metrics=("loss",))
    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out), "--metrics", "loss,eval_loss"]) == 0
    assert "loss, eval_loss" in capsys.readouterr().out
    assert Image.open(out).size == _panel_size(2, 1)
    # eval_acc is in a only: drawn for a, and the runs still share loss
    assert "eval_acc" in plot_runs([a, b], tmp_path / "e.png")


def test_plot_refuses_bad_input(tmp_path, capsys):
    run = _toy_run(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["plot", str(run), "--metrics", "los", "--out", str(tmp_path / "x.png")]) == 2
    assert "no run logged los" in capsys.readouterr().err
    assert main(["plot", str(run), "--out", str(tmp_path / "x.jpg")]) == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "eval", "knn_top1": 0.3}) + "\n")
    with pytest.raises(UserError, match="share none"):
        plot_runs([run, other], tmp_path / "x.png", ["loss", "eval_knn_top1"])
    assert not (tmp_path / "x.png").exists()


def test_eval_classifier_names_classes_and_draws_the_confusion_matrix(tmp_path, capsys):
    run = tmp_path / "run"
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\nsize = 32\neval_size = 20\n[train]\neval_every = 0\nwarmup_steps = 1\n'
                    '[model.backbone]\ndepth = 1\n')
    assert main(["train", "classifier", "--model", "vit_nano_patch4_32", "--data", "shapes", "--out", str(run),
                 "--steps", "2", "--batch-size", "8", "--config", str(toml)]) == 0
    capsys.readouterr()
    out = tmp_path / "cm.png"
    assert main(["eval", "classifier", str(run), "--json", "--confusion", str(out)]) == 0
    r = json.loads(capsys.readouterr().out.splitlines()[0])
    assert r["classes"] == ["circle", "square", "triangle", "plus"]
    assert set(r["per_class"]) <= set(r["classes"]) and r["per_class"]
    cm = torch.tensor(r["confusion"])
    assert cm.shape == (4, 4) and int(cm.sum()) == r["n"] == 20
    assert int(cm.trace()) == round(r["accuracy"] * r["n"])
    for i, name in enumerate(r["classes"]):  # each row's diagonal share is that class's accuracy
        if cm[i].sum():
            assert r["per_class"][name] == pytest.approx(float(cm[i, i] / cm[i].sum()))
    width, height = Image.open(out).size
    assert width >= 400 and height >= 400
    assert main(["eval", "classifier", str(run)]) == 0
    assert "per class: circle" in capsys.readouterr().out
    assert main(["eval", "classifier", str(run), "--confusion", str(tmp_path)]) == 2  # a folder
    # the attention picture's title names the predicted class and its probability
    from cvformers.pipelines.attention import attention_picture, load_classifier

    title = attention_picture(load_classifier(run), torch.rand(3, 32, 32)).sections[0][0]
    assert any(f"predicted {name}, p=" in title for name in r["classes"]), title


def test_without_matplotlib_the_commands_say_what_to_install(tmp_path, capsys, monkeypatch):
    import sys

    run = _toy_run(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'cvformers[plot]'" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "classifier", str(run), "--confusion", str(tmp_path / "cm.png")]) == 2
    assert "cvformers[plot]" in capsys.readouterr().err
