"""[train] loggers: TensorBoard mirrors metrics.jsonl into RUN/tensorboard/."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from trainer_toys import toy_setup

from cvformers.config import ConfigError
from cvformers.errors import UserError
from cvformers.tasks import TaskArgs
from cvformers.train import TrainConfig, Trainer, train_config_from

torch.set_num_threads(1)


def _config(**kw) -> TrainConfig:
    base = dict(steps=2, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1, eval_every=2, checkpoint_every=100,
                loggers=("tensorboard",))
    return TrainConfig(**{**base, **kw})


def test_tensorboard_logger_writes_the_jsonl_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    Trainer(toy_setup(_config(), n=16), run).fit()
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([x["loss"] for x in train])
    assert [e.step for e in acc.Scalars("eval/loss")] == [2]
    assert "train/lr" in acc.Tags()["scalars"] and "train/split" not in acc.Tags()["scalars"]
    Trainer(toy_setup(_config(loggers=()), n=16), tmp_path / "plain").fit()
    assert not (tmp_path / "plain" / "tensorboard").exists()  # the default logs to metrics.jsonl only


def test_loggers_are_checked(tmp_path, monkeypatch):
    assert TrainConfig().loggers == ()
    with pytest.raises(ConfigError, match="tensorboard"):
        train_config_from(TaskArgs(out=tmp_path, config={"train": {"loggers": ["wandb"]}}))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as on a machine without the extra
    with pytest.raises(UserError, match=r"pip install 'cvformers\[tensorboard\]'"):
        Trainer(toy_setup(_config(), n=16), tmp_path / "run").fit()
    assert not (tmp_path / "run" / "config.toml").exists()  # refused before the run folder is written
