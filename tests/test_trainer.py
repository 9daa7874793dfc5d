"""The training loop: schedule, data order, accumulation, overfitting, exact resume, run folders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from trainer_toys import ToyData, toy_setup

from cvformers.train.checkpoint import load_trainer_state
from cvformers.config import ConfigError
from cvformers.errors import UserError
from cvformers.train import TrainConfig, Trainer, lr_at, param_groups, train_config_from
from cvformers.train.schedule import EpochBatchSampler
from cvformers.tasks import TaskArgs


def small(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=3, log_every=4, eval_every=0, checkpoint_every=100)
    return TrainConfig(**{**base, **kw})


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


# --- schedule -----------------------------------------------------------------------------

def test_lr_schedule_known_values():
    kw = dict(lr=1.0, total_steps=11, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.5)
    assert lr_at(1, **kw) == pytest.approx(1.0)
    assert lr_at(2, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    # halfway through the decay (step 2 + 8/2): midpoint between 1 and 0.1
    assert lr_at(6, **kw) == pytest.approx(0.55)
    assert lr_at(10, **kw) == pytest.approx(0.1)  # last step reaches lr * min_lr_ratio
    assert lr_at(50, **kw) == pytest.approx(0.1)
    assert lr_at(0, lr=3e-4, total_steps=1, warmup_steps=0) == pytest.approx(3e-4)
    values = [lr_at(s, **kw) for s in range(2, 11)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_batch_sampler_shards_and_resumes():
    full = list(EpochBatchSampler(20, batch_size=4, seed=3, epoch=1))
    assert len(full) == 5 and sorted(sum(full, [])) == list(range(20))
    # two ranks of 2 cover the single-process batch of 4, rank 0 first
    r0 = list(EpochBatchSampler(20, batch_size=2, seed=3, epoch=1, rank=0, world_size=2))
    r1 = list(EpochBatchSampler(20, batch_size=2, seed=3, epoch=1, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == full
    # accumulation 2 x 2 == one batch of 4
    acc = list(EpochBatchSampler(20, batch_size=2, grad_accum=2, seed=3, epoch=1))
    assert [acc[i] + acc[i + 1] for i in range(0, len(acc), 2)] == full
    # starting at step 3 skips exactly the first 3 steps
    assert list(EpochBatchSampler(20, batch_size=4, seed=3, epoch=1, start_step=3)) == full[3:]
    # another epoch is another order; odd sizes drop the tail so every rank has equal batches
    assert list(EpochBatchSampler(20, batch_size=4, seed=3, epoch=2)) != full
    assert len(list(EpochBatchSampler(23, batch_size=2, world_size=2, rank=1))) == 5


def test_param_groups_skip_decay_for_bias_norm_embed():
    model = toy_setup(small()).model
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"head.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"embed.weight", "embed.bias", "norm.weight", "norm.bias", "head.bias"}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_train_config_merges_defaults_toml_cli_strictly(tmp_path):
    args = TaskArgs(out=tmp_path, config={"train": {"steps": 7, "lr": 0.5}}, lr=0.25)
    cfg = train_config_from(args, TrainConfig(batch_size=3, steps=99))
    assert (cfg.steps, cfg.lr, cfg.batch_size) == (7, 0.25, 3)
    with pytest.raises(ConfigError, match="train.stpes"):
        train_config_from(TaskArgs(out=tmp_path, config={"train": {"stpes": 1}}))
    with pytest.raises(ConfigError, match="amp"):
        train_config_from(TaskArgs(out=tmp_path, config={"train": {"amp": "fp8"}}))


# --- the loop -----------------------------------------------------------------------------

def test_tiny_model_overfits(tmp_path):
    cfg = small(steps=150, lr=2e-2, warmup_steps=10, log_every=10, eval_every=150, weight_decay=0.0)
    metrics = Trainer(toy_setup(cfg, n=32), tmp_path / "run").fit()
    lines = [json.loads(ln) for ln in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first = next(ln for ln in lines if ln["split"] == "train")
    assert metrics["loss"] < 0.02 < first["loss"]
    assert metrics["eval_loss"] < first["loss"]
    assert {"step", "loss", "lr", "items_per_s", "elapsed", "abs_err", "grad_norm"} <= set(first)
    assert lines[-1] == {"step": 150, "split": "eval", "loss": metrics["eval_loss"], "abs_err": metrics["eval_abs_err"]}


def test_grad_accumulation_equals_big_batch(tmp_path):
    big = Trainer(toy_setup(small(batch_size=8)), tmp_path / "big")
    big.fit()
    acc = Trainer(toy_setup(small(batch_size=4, grad_accum=2)), tmp_path / "acc")
    acc.fit()
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_resume_is_bit_exact(tmp_path, dropout):
    cfg = small(steps=20, batch_size=8, checkpoint_every=6, eval_every=5)  # 64 items: 8 steps an epoch
    straight = toy_setup(cfg, dropout=dropout)
    Trainer(straight, tmp_path / "straight").fit()

    first = toy_setup(cfg, dropout=dropout)
    Trainer(first, tmp_path / "split").fit(until=11)  # stops mid-epoch 1, between checkpoints
    assert load_trainer_state(tmp_path / "split")["step"] == 11
    second = toy_setup(cfg, dropout=dropout, seed=99)  # a fresh model: everything comes from the run
    Trainer(second, tmp_path / "split", resume=True).fit()

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert second.model.steps_seen == list(range(11, 20))
    assert second.train_data.epochs == [1, 2]
    logged = [json.loads(ln) for ln in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(ln) for ln in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    # the eval lines match too (train lines average a window that the resume cut in two)
    assert [ln for ln in logged if ln["split"] == "eval"] == [ln for ln in ref if ln["split"] == "eval"]


def test_resume_extends_steps_and_trims_stale_metrics(tmp_path):
    run = tmp_path / "run"
    Trainer(toy_setup(small(steps=8, checkpoint_every=4)), run).fit()
    Trainer(toy_setup(small(steps=12, checkpoint_every=4)), run, resume=True).fit()
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]
    state = load_trainer_state(run)
    assert state["step"] == 12 and state["data"] == {"epoch": 1, "offset": 4, "items_per_step": 8}


def test_refuses_to_overwrite_and_resume_needs_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(toy_setup(small()), run, resume=True).fit()
    Trainer(toy_setup(small(steps=2)), run).fit()
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="--resume.*another --out"):
        Trainer(toy_setup(small(steps=2)), run).fit()
    assert (run / "model.safetensors").read_bytes() == before


def test_run_folder_contents_and_callback(tmp_path):
    seen = []
    setup = toy_setup(
        small(steps=6, checkpoint_every=3), extra_config={"data": {"spec": "toy"}},
        extra_files={"tokenizer.json": b"{}"}, on_checkpoint=lambda m, d, s: seen.append((d, s)),
    )
    Trainer(setup, tmp_path / "run").fit()
    from cvformers.config import load_toml

    cfg = load_toml(tmp_path / "run/config.toml")
    assert cfg["kind"] == "toy-regressor" and cfg["model"]["hidden"] == 16
    assert cfg["train"]["steps"] == 6 and cfg["data"] == {"spec": "toy"}
    assert (tmp_path / "run/tokenizer.json").read_bytes() == b"{}"
    assert seen == [(tmp_path / "run", 3), (tmp_path / "run", 6)]


def test_dataset_smaller_than_a_step_is_a_clear_error(tmp_path):
    setup = toy_setup(small(batch_size=8))
    setup.train_data = ToyData(5)
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        Trainer(setup, tmp_path / "run").fit()


def test_bf16_autocast_runs(tmp_path):
    metrics = Trainer(toy_setup(small(steps=3, amp="bf16")), tmp_path / "run").fit()
    assert math.isfinite(metrics["loss"])


class NoisyData(ToyData):
    """Draws augmentation noise from the global RNG in __getitem__ (inside the loader workers)."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "x": item["x"] + 0.1 * torch.randn(item["x"].shape)}


def test_loader_workers_are_seeded_deterministically(tmp_path):
    runs = []
    for name in ("a", "b"):
        setup = toy_setup(small(steps=10, num_workers=2))  # 8 steps an epoch: workers restart once
        setup.train_data = NoisyData(64)
        Trainer(setup, tmp_path / name).fit()
        runs.append(weights(tmp_path / name))
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    clean = toy_setup(small(steps=10, num_workers=2))
    Trainer(clean, tmp_path / "clean").fit()
    assert not torch.equal(weights(tmp_path / "clean")["head.weight"], runs[0]["head.weight"])


# --- hooks ----------------------------------------------------------------------------------


def test_hook_state_is_saved_and_resumed_bit_exactly(tmp_path):
    from cvformers.train.checkpoint import checkpoint_dir
    from cvformers.train.hooks import EMA, EMAConfig, TrainerHook

    class Calls(TrainerHook):
        name = "calls"

        def __init__(self):
            self.steps, self.evals, self.saved = [], [], []

        def after_step(self, model, step):
            self.steps.append(step)

        def on_evaluate(self, model, step):
            self.evals.append(step)
            return {"seen": float(len(self.steps))}

        def on_checkpoint(self, model, run_dir, step):
            self.saved.append(step)

    cfg = small(steps=12, checkpoint_every=4, eval_every=6)
    straight_ema = EMA(EMAConfig(decay=0.9))
    Trainer(toy_setup(cfg, dropout=0.3, hooks=[straight_ema]), tmp_path / "straight").fit()

    first_ema, calls = EMA(EMAConfig(decay=0.9)), Calls()
    Trainer(toy_setup(cfg, dropout=0.3, hooks=[first_ema, calls]), tmp_path / "split").fit(until=8)
    assert calls.steps == list(range(8)) and calls.evals == [6] and calls.saved == [4, 8]
    assert sorted(p.name for p in checkpoint_dir(tmp_path / "split").iterdir()) == [
        "ema.safetensors", "model.safetensors", "trainer_state.pt"]
    resumed_ema = EMA(EMAConfig(decay=0.9))
    Trainer(toy_setup(cfg, dropout=0.3, seed=5, hooks=[resumed_ema]), tmp_path / "split", resume=True).fit()

    assert resumed_ema.updates == straight_ema.updates == 12
    for k, v in straight_ema.shadow.items():
        assert torch.equal(v, resumed_ema.shadow[k]), k
    # the average differs from the weights, and trails them
    final = weights(tmp_path / "straight")
    assert not torch.equal(straight_ema.shadow["head.weight"], final["head.weight"])
    evals = [json.loads(ln) for ln in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [e.get("seen") for e in evals if e["split"] == "eval"] == [6.0, None]  # hook metrics are logged


def test_ema_warmup_and_copy():
    from torch import nn

    from cvformers.train.hooks import EMA, EMAConfig

    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(EMAConfig(decay=0.99))
    ema.on_fit_start(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.after_step(model, 0)  # first decay min(0.99, 1/10) = 0.1: the average moves 90% of the way
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9))
    copy = ema.averaged(model)
    assert torch.allclose(copy.weight, torch.full((1, 2), 0.9)) and torch.equal(model.weight, torch.ones(1, 2))
    with pytest.raises(ValueError, match="ema.decay"):
        EMAConfig(decay=1.0)
