"""Run folder files: safetensors weights (tied, fp16), atomic replacement, weights_only state, load_run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from trainer_toys import ToyConfig, ToyRegressor, toy_setup

import cvformers.train.checkpoint as ckpt
from cvformers.errors import UserError
from cvformers.train import TrainConfig, Trainer, load_run, load_weights, save_weights


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight  # tied, as in GPT-style token embeddings
        self.register_buffer("counts", torch.arange(3))


def test_tied_weights_round_trip_and_fp16(tmp_path):
    torch.manual_seed(0)
    src = Tied()
    save_weights(src, tmp_path / "w.safetensors")
    assert set(load_file(str(tmp_path / "w.safetensors"))) == {"embed.weight", "counts"}
    dst = Tied()
    load_weights(dst, tmp_path / "w.safetensors")
    assert torch.equal(dst.embed.weight, src.embed.weight) and dst.out.weight is dst.embed.weight

    save_weights(src, tmp_path / "h.safetensors", dtype=torch.float16)
    stored = load_file(str(tmp_path / "h.safetensors"))
    assert stored["embed.weight"].dtype == torch.float16 and stored["counts"].dtype == torch.int64
    half = Tied()
    load_weights(half, tmp_path / "h.safetensors")
    assert half.embed.weight.dtype == torch.float32  # upcast to the model's dtype
    assert torch.allclose(half.embed.weight, src.embed.weight, atol=1e-3)


def test_load_weights_is_strict(tmp_path):
    save_weights(ToyRegressor(ToyConfig()), tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="shape"):
        load_weights(ToyRegressor(ToyConfig(hidden=4)), tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="missing"):
        load_weights(Tied(), tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="not found"):
        load_weights(Tied(), tmp_path / "nope.safetensors")


def test_crash_while_saving_keeps_old_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, eval_every=0, log_every=2, warmup_steps=0)
    Trainer(toy_setup(cfg), run).fit(until=2)
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        Trainer(toy_setup(cfg), run, resume=True).fit()
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == sorted(before)  # no temp files left behind
    assert (run / "model.safetensors").read_bytes() == before["model.safetensors"]
    model, _ = load_run(run)
    assert torch.load(run / "trainer_state.pt", weights_only=True)["step"] == 2
    Trainer(toy_setup(cfg), run, resume=True).fit()  # and the run can still continue
    assert torch.load(run / "trainer_state.pt", weights_only=True)["step"] == 4


def test_trainer_state_is_weights_only(tmp_path):
    Trainer(toy_setup(TrainConfig(steps=2, batch_size=8, eval_every=0)), tmp_path / "run").fit()
    state = torch.load(tmp_path / "run/trainer_state.pt", weights_only=True)
    assert set(state) == {"step", "optimizer", "rng", "data", "elapsed"}
    assert state["step"] == 2 and len(state["rng"]) == 1
    assert {"torch", "python", "numpy"} <= set(state["rng"][0])


def test_mismatched_checkpoint_pair_is_refused(tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, eval_every=0)
    Trainer(toy_setup(cfg), run).fit(until=2)
    save_weights(ToyRegressor(ToyConfig()), run / "model.safetensors", metadata={"step": "3"})
    with pytest.raises(UserError, match="stopped while saving"):
        Trainer(toy_setup(cfg), run, resume=True).fit()


def test_load_run(tmp_path):
    run = tmp_path / "run"
    setup = toy_setup(TrainConfig(steps=2, batch_size=8, eval_every=0))
    Trainer(setup, run).fit()
    model, cfg = load_run(run)
    assert isinstance(model, ToyRegressor) and not model.training
    assert cfg["kind"] == "toy-regressor" and cfg["train"]["steps"] == 2
    for k, v in setup.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    (run / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors"):
        load_run(run)
    with pytest.raises(UserError, match="not found"):
        load_run(tmp_path / "nothing")
