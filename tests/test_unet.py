"""The DDPM U-Net (cvformers.models.unet) and its blocks (cvformers.nn.unet_blocks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cvformers.models.unet import UNet, UNetConfig
from cvformers.nn.layers import count_parameters
from cvformers.nn.unet_blocks import (
    ResBlock,
    SpatialSelfAttention,
    group_norm,
    timestep_embedding,
)


def small(**kw) -> UNetConfig:
    """A U-Net that runs in milliseconds: 16 channels, two levels, no dropout."""
    args = {"image_size": 32, "in_channels": 3, "base_channels": 16, "channel_mults": (1, 2), "num_res_blocks": 1,
                "attention_resolutions": (16,), "heads": 2, "dropout": 0.0}
    return UNetConfig(**{**args, **kw})


def batch(cfg: UNetConfig, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    return x, torch.randint(0, 1000, (b,), generator=g)


@torch.no_grad()
def randomise_zero_layers(model: torch.nn.Module, seed: int = 0) -> None:
    """Give random weights to every conv that starts at zero (the output conv, and the last conv of
    every residual / attention branch): until then nothing but the input reaches the output, so
    no conditioning could change it."""
    g = torch.Generator().manual_seed(seed)
    zeroed = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and not m.weight.any()]
    assert zeroed, "expected zero-initialised convs"
    for m in zeroed:
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


# --- timestep embedding -----------------------------------------------------------------------
def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :4], torch.ones(4)) and torch.equal(emb[0, 4:], torch.zeros(4))
    # frequency i is 10000^(-i/4): at t=1 the first pair is (cos 1, sin 1), the second uses 0.1
    assert emb[1, 0].item() == pytest.approx(math.cos(1.0)) and emb[1, 4].item() == pytest.approx(math.sin(1.0))
    assert emb[1, 1].item() == pytest.approx(math.cos(0.1)) and emb[1, 5].item() == pytest.approx(math.sin(0.1))
    assert emb[2, 3].item() == pytest.approx(math.cos(500 * 10000 ** -0.75), abs=1e-5)
    assert torch.allclose(emb[:, :4] ** 2 + emb[:, 4:] ** 2, torch.ones(3, 4))  # cos² + sin² = 1


def test_timestep_embedding_odd_dim_and_float_t():
    emb = timestep_embedding(torch.tensor([3.5, 7.0]), 7)
    assert emb.shape == (2, 7)
    assert torch.equal(emb[:, -1], torch.zeros(2))  # the padding column
    assert emb[0, 0].item() == pytest.approx(math.cos(3.5))
    assert torch.allclose(timestep_embedding(torch.tensor([7]), 7), emb[1:])  # int and float t agree


# --- blocks -----------------------------------------------------------------------------------
def test_group_norm_picks_a_divisor():
    assert [group_norm(c).num_groups for c in (8, 12, 48, 64, 96, 7)] == [8, 12, 24, 32, 32, 7]
    assert group_norm(12, groups=8).num_groups == 6


def test_res_block_starts_as_identity_and_projects_the_skip():
    x, emb = torch.randn(2, 12, 6, 6), torch.randn(2, 20)
    assert torch.equal(ResBlock(12, 12, 20)(x, emb), x)
    block = ResBlock(12, 24, 20)
    assert torch.allclose(block(x, emb), block.skip(x))
    with torch.no_grad():
        block.conv2.weight.normal_()
    a, b = block(x, emb), block(x, emb + 1)
    assert a.shape == (2, 24, 6, 6) and not torch.allclose(a, b)  # the embedding reaches the output


def test_attention_reads_context_only_when_built_for_it():
    attn = SpatialSelfAttention(16, heads=4, context_dim=10)
    x, ctx = torch.randn(2, 16, 5, 5), torch.randn(2, 3, 10)
    assert torch.equal(attn(x, ctx), x)  # zero-initialised output projection
    with torch.no_grad():
        attn.proj.weight.normal_()
    assert attn(x, ctx).shape == x.shape and not torch.allclose(attn(x, ctx), attn(x))
    with pytest.raises(ValueError, match="context_dim"):
        SpatialSelfAttention(16, heads=4)(x, ctx)


# --- the U-Net --------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    small(image_size=28, in_channels=1, base_channels=8, attention_resolutions=(14,)),
    small(image_size=32, in_channels=3, base_channels=16),
], ids=["28px-1ch", "32px-3ch"])
def test_output_shape_equals_input_shape(cfg):
    model = UNet(cfg)
    randomise_zero_layers(model)
    x, t = batch(cfg)
    out = model(x, t)
    assert out.shape == x.shape and out.abs().sum() > 0


def test_output_is_zero_at_init_and_not_after_one_step():
    cfg = small(dropout=0.1)
    model = UNet(cfg)
    x, t = batch(cfg)
    assert torch.equal(model(x, t), torch.zeros_like(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.mse_loss(model(x, t), torch.randn_like(x)).backward()
    opt.step()
    assert model(x, t).abs().max() > 0


def test_labels_cond_and_context_each_change_the_output():
    cfg = small(num_classes=5, cond_dim=6, context_dim=7)
    model = UNet(cfg).eval()
    randomise_zero_layers(model)
    x, t = batch(cfg)
    g = torch.Generator().manual_seed(1)
    labels, cond, context = torch.tensor([1, 3]), torch.randn(2, 6, generator=g), torch.randn(2, 4, 7, generator=g)
    with torch.no_grad():
        base = model(x, t)
        assert not torch.allclose(model(x, t, labels=labels), base)
        assert not torch.allclose(model(x, t, cond=cond), base)
        assert not torch.allclose(model(x, t, context=context), base)
        assert not torch.allclose(model(x, t + 100), base)  # and so does t
        both = model(x, t, labels=labels, cond=cond, context=context)
        assert both.shape == x.shape


def test_missing_label_is_the_no_label_row_and_missing_cond_is_zero():
    cfg = small(num_classes=4, cond_dim=3)
    model = UNet(cfg).eval()
    randomise_zero_layers(model)
    x, t = batch(cfg)
    with torch.no_grad():
        default = model(x, t)
        assert torch.equal(default, model(x, t, labels=torch.full((2,), 4)))
        assert not torch.allclose(default, model(x, t, labels=torch.zeros(2, dtype=torch.long)))
        assert torch.equal(default, model(x, t, labels=torch.full((2,), 4), cond=torch.zeros(2, 3)))


def test_inputs_the_config_has_no_place_for_raise():
    cfg = small()
    model = UNet(cfg)
    x, t = batch(cfg)
    with pytest.raises(ValueError, match="context_dim"):
        model(x, t, context=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="num_classes"):
        model(x, t, labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="cond_dim"):
        model(x, t, cond=torch.randn(2, 4))
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, 3, 15, 15), t[:1])


def test_scalar_t_is_broadcast():
    cfg = small()
    model = UNet(cfg).eval()
    randomise_zero_layers(model)
    x, _ = batch(cfg)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor(7)), model(x, torch.tensor([7, 7])))


@pytest.mark.parametrize("kw, field", [
    ({"image_size": 30, "channel_mults": (1, 2, 2)}, "unet.image_size"),
    ({"base_channels": 0}, "unet.base_channels must be >= 1, got 0"),
    ({"attention_resolutions": (4,)}, "unet.attention_resolutions"),
    ({"channel_mults": ()}, "unet.channel_mults"),
    ({"heads": 3}, "unet.heads"),
    ({"num_classes": -1}, "unet.num_classes"),
    ({"dropout": 1.0}, "unet.dropout"),
])
def test_config_refuses_bad_values(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        UNetConfig(**kw)


def test_defaults_are_valid_and_keep_ddpm_layout():
    model = UNet(UNetConfig())
    # at 32 px with mults (1, 2, 2) attention runs at 16×16, i.e. in level 1 of both paths
    has_attention = [b.attn is not None for level in model.down for b in level.blocks]
    assert has_attention == [False, False, True, True, False, False]
    assert [len(level.blocks) for level in model.up] == [3, 3, 3]
    assert [level.resample is None for level in model.down] == [False, False, True]
    assert [level.resample is None for level in model.up] == [False, False, True]
    # DDPM's CIFAR-10 network (ch 128, mults 1,2,2,2) has 35.7 million parameters (appendix B); the
    # adaptive group norm (a scale as well as a shift per channel, see ResBlock) adds the second half
    # of every embedding projection: 2.56M more
    cifar = UNet(UNetConfig(base_channels=128, channel_mults=(1, 2, 2, 2)))
    extra = sum(block.res.emb_proj.out_features // 2 * (block.res.emb_proj.in_features + 1)
                for part in (cifar.down, cifar.up) for level in part for block in level.blocks)
    extra += sum(r.emb_proj.out_features // 2 * (r.emb_proj.in_features + 1) for r in (cifar.middle.res1, cifar.middle.res2))
    assert round((count_parameters(cifar) - extra) / 1e5) == 357


def test_tiny_unet_overfits_one_pair():
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=16, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), heads=2, dropout=0.0)
    model = UNet(cfg)
    x0, noise, t = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16), torch.tensor([300])
    alpha_bar = 0.5
    x_t = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * noise  # q(x_t | x_0), DDPM eq. 4
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = F.mse_loss(model(x_t, t), noise)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


def test_the_embedding_reaches_a_narrow_block():
    """With 8 channels GroupNorm normalises each channel alone: an embedding *added* before it
    would vanish (DDPM's form). The scale-and-shift after the norm must reach the output."""
    from cvformers.nn.unet_blocks import ResBlock

    torch.manual_seed(0)
    block = ResBlock(8, 8, emb_dim=16)
    torch.nn.init.normal_(block.conv2.weight, std=0.1)
    x = torch.randn(2, 8, 6, 6)
    a, b = block(x, torch.randn(2, 16)), block(x, torch.randn(2, 16))
    assert (a - b).abs().max() > 1e-2
