"""model_info: exact parameters, hand-counted FLOPs, activation memory against torch's own accounting."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

from cvformers.cli import main
from cvformers.config import ConfigError
from cvformers.errors import UserError
from cvformers.models.dalle import DALLE, DalleConfig
from cvformers.models.dalle_info import attended_pairs, model_info, resolve_dalle_config
from cvformers.nn.attention import build_pattern


def small_cfg(**kw) -> DalleConfig:
    base = dict(num_text_tokens=120, text_len=8, num_image_tokens=64, grid_size=8, dim=32, depth=4, heads=2,
                dim_head=16, caption_drop_prob=0.0)
    return DalleConfig(**{**base, **kw})


@pytest.mark.parametrize("attention", ["full", "paper"])
def test_params_equal_built_model(attention):
    cfg = small_cfg(attention=attention, mlp_ratio=3.0)
    info = model_info(cfg)
    model = DALLE(cfg)
    assert info.params == sum(p.numel() for p in model.parameters())
    assert info.params_blocks == sum(p.numel() for p in model.blocks.parameters())
    assert info.params_embedding + info.params_blocks + info.params_other == info.params


@pytest.mark.parametrize("name", ["full", "row", "column", "conv"])
@pytest.mark.parametrize("text,h,w,kernel", [(1, 3, 3, 3), (4, 6, 6, 5), (3, 5, 7, 11), (2, 7, 4, 3)])
def test_attended_pairs_equal_dense_mask(name, text, h, w, kernel):
    pattern = build_pattern(name, text, h, w, conv_kernel=kernel)
    assert attended_pairs(name, text, h, w, kernel) == int(pattern.dense_mask().sum())


def test_flops_hand_count_tiny():
    # dim 8, 2 heads x 4 (inner 8), MLP hidden 32, T = 2 text + 2x2 image tokens: S = 6, N = 4
    cfg = DalleConfig(num_text_tokens=10, text_len=2, num_image_tokens=5, grid_size=2, dim=8, depth=2, heads=2,
                      dim_head=4, mlp_ratio=4.0, attention=["full", "column"])
    info = model_info(cfg)
    # per token per layer: qkv 2·8·24 + out 2·8·8 + mlp 2·(8·32 + 32·8) = 384 + 128 + 1024 = 1536
    assert info.flops_linear == 1536 * 6 * 2
    # pairs: causal text 1+2 = 3, image->text 4·2 = 8; full image 4·5/2 = 10 -> 21; column 2·(1+2) = 6 -> 17
    assert info.attended_pairs == {"full": 21, "column": 17}
    # scores + values: 2·2·d_head·heads = 32 FLOPs per pair
    assert info.flops_attention == 32 * (21 + 17)
    # heads over the loss positions: 2·8·(10·(2-1) + 5·4) = 480
    assert info.flops_heads == 480
    assert info.flops_per_token == pytest.approx((18432 + 1216 + 480) / 6)
    assert info.train_flops_per_token == pytest.approx(3 * info.flops_per_token)


def _live_bytes_timeline(fn):
    """Run fn under the profiler; -> (result, bytes live at the end, peak bytes), counted from the start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    fd, trace = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(trace)
    deltas = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return out, live, peak


@pytest.mark.parametrize("attention", ["full", "paper"])
def test_activation_memory_matches_torch(attention):
    # grid 16 with 8 text tokens: row and column take their blocked paths, conv (11x11) the masked one
    torch.manual_seed(0)
    cfg = small_cfg(grid_size=16, attention=attention)
    model = DALLE(cfg).train()
    B = 2
    batch = {"text": torch.randint(0, 100, (B, cfg.text_len)), "codes": torch.randint(0, 64, (B, 16, 16))}
    model.loss(batch)[0].backward()  # warm-up: pattern index caches, allocator
    model.zero_grad(set_to_none=True)

    (loss, _), live, _ = _live_bytes_timeline(lambda: model.loss(batch))
    predicted = model_info(cfg).activation_bytes["fp32"]
    assert live / B == pytest.approx(predicted, rel=0.15)

    # with checkpointing: peak = forward's kept inputs + the backward's largest recomputed set (+ grads)
    del loss
    ckpt = small_cfg(grid_size=16, attention=attention, checkpoint_activations=True)
    model = DALLE(ckpt).train()
    model.loss(batch)[0].backward()
    model.zero_grad(set_to_none=True)
    (loss, _), kept, _ = _live_bytes_timeline(lambda: model.loss(batch))
    _, _, backward_peak = _live_bytes_timeline(lambda: loss.backward())
    grads = sum(p.numel() * 4 for p in model.parameters())
    measured = (kept + backward_peak - grads) / B
    assert measured == pytest.approx(model_info(ckpt).activation_bytes["fp32+ckpt"], rel=0.3)
    assert model_info(ckpt).activation_bytes["fp32+ckpt"] < 0.5 * predicted


def test_bf16_autocast_memory_matches_torch():
    torch.manual_seed(0)
    cfg = small_cfg(grid_size=16, attention="paper")
    model = DALLE(cfg).train()
    B = 2
    batch = {"text": torch.randint(0, 100, (B, cfg.text_len)), "codes": torch.randint(0, 64, (B, 16, 16))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(batch)[0].backward()
        model.zero_grad(set_to_none=True)
        (loss, _), live, _ = _live_bytes_timeline(lambda: model.loss(batch))
    info = model_info(cfg)
    assert live == pytest.approx(B * info.activation_bytes["bf16"] + info.autocast_weight_bytes, rel=0.15)
    assert 0.5 * info.activation_bytes["fp32"] < info.activation_bytes["bf16"] < info.activation_bytes["fp32"]


def test_paper_preset_on_meta_device():
    info = model_info(resolve_dalle_config("paper"))
    assert info.config.depth == 64 and info.config.heads == 62 and info.seq_len == 256 + 1024
    assert 12.0e9 < info.params < 12.5e9  # "a 12-billion parameter ... transformer" (abstract)
    # the blocks dominate: training FLOPs per token within 5% of the 6·N rule
    assert info.train_flops_per_token == pytest.approx(6 * info.params_blocks, rel=0.05)
    assert info.schedule.count("conv") == 1 and info.schedule.count("column") == 16


def test_resolve_config_sources(tmp_path):
    assert resolve_dalle_config("tiny").dim == 64
    toml = tmp_path / "exp.toml"
    toml.write_text('[model]\npreset = "small"\ndepth = 6\n')
    cfg = resolve_dalle_config(toml)
    assert (cfg.dim, cfg.depth) == (256, 6)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('kind = "dalle"\n[model]\ndim = 48\nheads = 3\ndim_head = 16\n')
    assert resolve_dalle_config(run).dim == 48

    with pytest.raises(UserError, match="unknown config"):
        resolve_dalle_config("nope")
    (run / "config.toml").write_text('kind = "clip"\n[model]\n')
    with pytest.raises(UserError, match="clip"):
        resolve_dalle_config(run)
    toml.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ConfigError, match="width"):
        resolve_dalle_config(toml)


def test_cli(capsys):
    assert main(["model-info", "tiny", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOPs per token" in out and "checkpointing" in out
    assert main(["model-info", "no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err
