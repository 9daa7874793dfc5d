"""DALL-E's per-resblock gradient scaling (fp16 on GPUs), its logic checked on CPU in fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_toys import ToyBlocks, ToyBlocksConfig, toy_blocks_setup

from cvformers.errors import UserError
from cvformers.train import TrainConfig, Trainer
from cvformers.train.grad_scaling import GradScaleConfig, PerBlockGradScaler


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    return {"x": x, "y": torch.tanh(x.sum(1))}


def _model():
    torch.manual_seed(0)
    return ToyBlocks(ToyBlocksConfig(depth=3))


def test_each_group_is_scaled_by_its_own_scale_and_unscales_to_the_plain_gradient():
    plain, scaled = _model(), _model()
    plain.loss(_batch())[0].backward()
    scaler = PerBlockGradScaler(scaled, list(scaled.blocks))
    scaler.scales = torch.tensor([2.0**10, 2.0**3, 2.0**15, 2.0**-2], dtype=torch.float64)
    scaler.scale_loss(scaled.loss(_batch())[0]).backward()
    # before unscaling, each parameter's gradient carries its own group's scale
    assert torch.allclose(scaled.embed.weight.grad, plain.embed.weight.grad * 2**10, rtol=1e-5)
    assert torch.allclose(scaled.head.weight.grad, plain.head.weight.grad * 2**10, rtol=1e-5)
    assert torch.allclose(scaled.blocks[1].fc.weight.grad, plain.blocks[1].fc.weight.grad * 2**15, rtol=1e-5)
    assert torch.allclose(scaled.blocks[2].fc.weight.grad, plain.blocks[2].fc.weight.grad * 2**-2, rtol=1e-5)
    assert scaler.unscale()
    for (name, a), b in zip(scaled.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8), name


def test_inf_in_one_block_skips_the_step_halves_its_scale_and_counts():
    model = _model()
    cfg = GradScaleConfig(init_scale=1024.0, growth=2.0, backoff=0.5, min_scale=1.0, max_scale=2.0**20)
    scaler = PerBlockGradScaler(model, list(model.blocks), cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    scaler.scale_loss(model.loss(_batch())[0]).backward()
    model.blocks[1].fc.weight.grad[0, 0] = float("inf")  # an overflow inside block 1
    assert not scaler.step(optimizer)
    assert scaler.skipped == 1 and scaler.last_bad == [2]  # group 2 = blocks[1]
    assert scaler.scales.tolist() == [2048.0, 2048.0, 512.0, 2048.0]  # it backs off, the others grow
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update

    optimizer.zero_grad()
    scaler.scale_loss(model.loss(_batch())[0]).backward()
    assert scaler.step(optimizer) and scaler.skipped == 1
    assert scaler.scales.tolist() == [4096.0, 4096.0, 1024.0, 4096.0]
    assert not torch.equal(before["embed.weight"], model.embed.weight)


def test_scales_grow_after_good_steps_within_their_clamps():
    model = _model()
    scaler = PerBlockGradScaler(model, list(model.blocks), world_size=2)  # DALL-E's defaults, M = 2 processes
    assert float(scaler.scales[0]) == 2 * 2.0**13
    for _ in range(1000):
        scaler.update()
    assert torch.allclose(scaler.scales, torch.full((4,), 4 * 2.0**13, dtype=torch.float64))  # x2 per 1000 steps
    scaler.last_bad = [0, 1, 2, 3]
    for _ in range(100):
        scaler.update()
    assert scaler.scales.tolist() == [2 * 2.0**7] * 4  # clamped at M x 2^7


def test_the_scales_are_saved_and_restored():
    model = _model()
    scaler = PerBlockGradScaler(model, list(model.blocks))
    scaler.scales[2], scaler.skipped = 3.0, 5
    other = PerBlockGradScaler(_model(), list(_model().blocks))
    other.load_state_dict(scaler.state_dict())
    assert other.scales.tolist() == scaler.scales.tolist() and other.skipped == 5


def test_fp16_on_cpu_is_refused(tmp_path):
    cfg = TrainConfig(steps=1, batch_size=8, warmup_steps=0, amp="fp16")
    with pytest.raises(UserError, match="CUDA"):
        Trainer(toy_blocks_setup(cfg), tmp_path / "r", device="cpu").fit()
