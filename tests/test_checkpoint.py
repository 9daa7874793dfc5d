"""Run folder files: safetensors weights (tied, fp16), atomic replacement, weights_only state, load_run."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from trainer_toys import ToyConfig, ToyRegressor, count_checkpoint_ops, crash_config, toy_setup, train_killed_after

import cvformers.loading
import cvformers.train.checkpoint as ckpt
from cvformers.errors import UserError
from cvformers.loading import load_run, load_weights, save_weights
from cvformers.train import TrainConfig, Trainer


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


def _weights(run):
    return {k: v.clone() for k, v in load_file(str(run / "model.safetensors")).items()}


def _spawn(fn, *args):
    ctx = multiprocessing.get_context("spawn")  # fork after torch ran threads can hang the child
    p = ctx.Process(target=fn, args=args)
    p.start()
    p.join(120)
    return p.exitcode


def _assert_clean(run):
    """Only the latest checkpoint folder, no temporary files, and the top weights are its weights."""
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    latest = (run / "checkpoints/latest").read_text().strip()
    assert folders == sorted([latest, "latest"])
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert os.path.samefile(run / "model.safetensors", run / "checkpoints" / latest / "model.safetensors")


def test_checkpoint_is_one_unit_under_a_pointer(tmp_path):
    run = tmp_path / "run"
    Trainer(toy_setup(TrainConfig(steps=4, batch_size=8, checkpoint_every=2, eval_every=0)), run).fit()
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in (run / "checkpoints/step-00000004").iterdir()) == ["model.safetensors", "trainer_state.pt"]
    _assert_clean(run)


def test_crash_while_saving_keeps_old_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, eval_every=0, log_every=2, warmup_steps=0)
    Trainer(toy_setup(cfg), run).fit(until=2)
    before = _weights(run)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(cvformers.loading, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        Trainer(toy_setup(cfg), run, resume=True).fit()
    monkeypatch.undo()
    assert ckpt.load_trainer_state(run)["step"] == 2
    assert all(torch.equal(v, _weights(run)[k]) for k, v in before.items())
    Trainer(toy_setup(cfg), run, resume=True).fit()  # and the run can still continue
    assert ckpt.load_trainer_state(run)["step"] == 4
    _assert_clean(run)


def test_sigkill_before_every_file_operation_of_a_checkpoint_resumes_bit_exactly(tmp_path):
    cfg = crash_config(steps=6, checkpoint_every=2)
    Trainer(toy_setup(cfg), tmp_path / "straight").fit()
    reference = _weights(tmp_path / "straight")
    ops = count_checkpoint_ops(tmp_path / "count", cfg)
    assert ops >= 8  # a folder, two files (write, fsync, rename), the pointer, the link, the cleanup
    for kill_at in range(1, ops + 1):
        run = tmp_path / f"kill{kill_at}"
        Trainer(toy_setup(cfg), run).fit(until=2)
        assert _spawn(count_checkpoint_ops, run, cfg, kill_at) == -signal.SIGKILL
        assert ckpt.load_trainer_state(run)["step"] in (2, 4)
        Trainer(toy_setup(cfg), run, resume=True).fit()
        got = _weights(run)
        assert all(torch.equal(v, got[k]) for k, v in reference.items()), f"killed before operation {kill_at}"
        _assert_clean(run)


def test_twenty_sigkills_at_random_times_then_resume_is_bit_exact(tmp_path):
    cfg = crash_config(steps=60, checkpoint_every=1)  # a checkpoint every step: many kills land inside one
    Trainer(toy_setup(cfg), tmp_path / "straight").fit()
    reference = _weights(tmp_path / "straight")
    run, rng = tmp_path / "run", random.Random(0)
    kills = 0
    while kills < 20:
        code = _spawn(train_killed_after, run, cfg, rng.uniform(0.0, 0.4))
        if code == 0:  # finished before its kill: start over so that every kill lands in a run
            shutil.rmtree(run)
            continue
        assert code == -signal.SIGKILL
        kills += 1
    assert _spawn(train_killed_after, run, cfg, -1.0) == 0
    got = _weights(run)
    assert all(torch.equal(v, got[k]) for k, v in reference.items())
    _assert_clean(run)


def test_trainer_state_is_weights_only(tmp_path):
    run = tmp_path / "run"
    Trainer(toy_setup(TrainConfig(steps=2, batch_size=8, eval_every=0)), run).fit()
    state = torch.load(ckpt.checkpoint_dir(run) / "trainer_state.pt", weights_only=True)
    assert set(state) == {"step", "optimizer", "rng", "data", "elapsed"}
    assert state["step"] == 2 and len(state["rng"]) == 1
    assert {"torch", "python", "numpy"} <= set(state["rng"][0])


def test_mismatched_checkpoint_pair_is_refused(tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, eval_every=0)
    Trainer(toy_setup(cfg), run).fit(until=2)
    save_weights(ToyRegressor(ToyConfig()), ckpt.checkpoint_dir(run) / "model.safetensors", metadata={"step": "3"})
    with pytest.raises(UserError, match="stopped while saving"):
        Trainer(toy_setup(cfg), run, resume=True).fit()


def test_flat_layout_of_older_runs_still_resumes(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, eval_every=0)
    Trainer(toy_setup(cfg), tmp_path / "straight").fit()
    run = tmp_path / "flat"
    Trainer(toy_setup(cfg), run).fit(until=2)
    step_dir = ckpt.checkpoint_dir(run)
    os.unlink(run / "model.safetensors")
    for f in step_dir.iterdir():
        shutil.move(f, run / f.name)
    shutil.rmtree(run / "checkpoints")
    Trainer(toy_setup(cfg), run, resume=True).fit()
    assert not (run / "trainer_state.pt").exists()
    ref, got = _weights(tmp_path / "straight"), _weights(run)
    assert all(torch.equal(v, got[k]) for k, v in ref.items())


@pytest.mark.parametrize("damage", ["partial-metrics-line", "state-of-wrong-structure", "missing-pointer-target"])
def test_damaged_run_folders(tmp_path, damage):
    run = tmp_path / "run"
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, eval_every=0, log_every=1)
    Trainer(toy_setup(cfg), run).fit(until=2)
    if damage == "partial-metrics-line":
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 3, "split": "tr')  # what a kill during an append leaves
        Trainer(toy_setup(cfg), run, resume=True).fit()
        steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]
        return
    if damage == "state-of-wrong-structure":
        torch.save({"step": "two", "weights": [1, 2]}, ckpt.checkpoint_dir(run) / "trainer_state.pt")
        match = "not a cvformers trainer state"
    else:
        (run / "checkpoints/latest").write_text("step-00000099\n")
        match = "not a checkpoint folder"
    with pytest.raises(UserError, match=match):
        Trainer(toy_setup(cfg), run, resume=True).fit()


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    with ckpt.RunLock(run):
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            message = pool.apply(_try_lock, (run,))
    assert "in use by another training process" in message
    with ckpt.RunLock(run):  # released: the next writer gets it
        pass


def _try_lock(run):
    try:
        with ckpt.RunLock(run):
            return "locked"
    except UserError as e:
        return str(e)


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
    with pytest.raises(UserError, match="no such folder"):
        load_run(tmp_path / "nothing")


def test_optimizer_moments_follow_their_parameters_by_name_when_the_order_changes(tmp_path):
    from torch import nn

    from cvformers.errors import UserError
    from cvformers.train import param_groups
    from cvformers.train.checkpoint import align_optimizer_state

    class Before(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(4, 3), nn.Linear(3, 3)

    class After(nn.Module):  # the same parameters, registered in the other order
        def __init__(self):
            super().__init__()
            self.second, self.first = nn.Linear(3, 3), nn.Linear(4, 3)

    def trained_optimizer(model):
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
        sum(p.square().sum() * (i + 1) for i, p in enumerate(model.parameters())).backward()
        opt.step()
        return opt

    torch.manual_seed(0)
    before = Before()
    saved = trained_optimizer(before).state_dict()
    moments = {name: saved["state"][i]["exp_avg"] for i, name in
               enumerate(n for g in saved["param_groups"] for n in g["names"])}
    after = After()
    after.load_state_dict(before.state_dict())
    opt = torch.optim.AdamW(param_groups(after, 0.1), lr=1e-2)
    opt.load_state_dict(align_optimizer_state(saved, opt, tmp_path))
    names = {p: n for n, p in after.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            assert torch.equal(opt.state[p]["exp_avg"], moments[names[p]]), names[p]

    # a checkpoint without names: taken as it is when the shapes fit, refused in one line when not
    for group in saved["param_groups"]:
        del group["names"]
    same_order = torch.optim.AdamW(param_groups(Before(), 0.1), lr=1e-2)
    assert align_optimizer_state(saved, same_order, tmp_path) is saved
    with pytest.raises(UserError, match="orders its parameters differently"):
        align_optimizer_state(saved, torch.optim.AdamW(param_groups(After(), 0.1), lr=1e-2), tmp_path)
