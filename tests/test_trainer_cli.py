"""``cvformers train TASK`` end to end with a toy task: new run, refusal, resume, overrides."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from cvformers.train.checkpoint import load_trainer_state
from cvformers import cli
from cvformers.config import load_toml


def test_cli_train_refuse_resume(tmp_path, monkeypatch, capsys):
    import trainer_toys  # noqa: F401  (registers the "toy" task)
    cfg = tmp_path / "exp.toml"
    cfg.write_text('[model]\nhidden = 12\n\n[train]\nlr = 0.005\n')
    run = str(tmp_path / "run")

    assert cli.main(["train", "toy", "--data", "toy", "--out", run, "--config", str(cfg), "--steps", "4"]) == 0
    saved = load_toml(tmp_path / "run/config.toml")
    assert saved["model"]["hidden"] == 12 and saved["train"]["lr"] == 0.005 and saved["train"]["steps"] == 4
    assert saved["data"] == {"spec": "toy"}

    assert cli.main(["train", "toy", "--out", run]) == 2
    assert "pass --resume" in capsys.readouterr().err

    assert cli.main(["train", "toy", "--out", run, "--resume", "--steps", "8"]) == 0
    assert load_trainer_state(tmp_path / "run")["step"] == 8
    assert [json.loads(ln)["step"] for ln in (tmp_path / "run/metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
    assert load_file(str(tmp_path / "run/model.safetensors"))["embed.weight"].shape == (12, 8)

    assert cli.main(["train", "toy", "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err

    (tmp_path / "run/config.toml").rename(tmp_path / "kept.toml")
    assert cli.main(["train", "toy", "--out", run, "--resume", "--steps", "10"]) == 2
    assert "config.toml is missing" in capsys.readouterr().err
    assert not (tmp_path / "run/config.toml").exists() and load_trainer_state(tmp_path / "run")["step"] == 8

    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nwarmup = 3\n')
    assert cli.main(["train", "toy", "--out", str(tmp_path / "b"), "--config", str(bad)]) == 2
    assert "train.warmup" in capsys.readouterr().err


def test_cli_until_then_resume_equals_straight_run(tmp_path, monkeypatch):
    import trainer_toys  # noqa: F401  (registers the "toy" task)
    straight, pieces = str(tmp_path / "straight"), str(tmp_path / "pieces")
    assert cli.main(["train", "toy", "--data", "toy", "--out", straight, "--steps", "6"]) == 0
    assert cli.main(["train", "toy", "--data", "toy", "--out", pieces, "--steps", "6", "--until", "3"]) == 0
    assert load_trainer_state(tmp_path / "pieces")["step"] == 3
    assert cli.main(["train", "toy", "--out", pieces, "--resume"]) == 0
    a = load_file(str(tmp_path / "straight/model.safetensors"))
    b = load_file(str(tmp_path / "pieces/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
