"""The decode step's prepared products (oneDNN packed weights) against F.linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvformers.models.dalle import DALLE, PRESETS, DalleConfig
from cvformers.nn.decode_linear import DecodeLinear, can_pack

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def linear(i=256, o=1024, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(i, o)


@needs_onednn
def test_packed_products_equal_f_linear():
    lin = linear()
    x, residual = torch.randn(8, 256), torch.randn(8, 1024)
    fast = DecodeLinear(lin, rows=8)
    assert fast.packed is not None
    with torch.no_grad():
        want = F.linear(x, lin.weight, lin.bias)
        torch.testing.assert_close(fast(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.gelu(x), F.gelu(want), atol=1e-5, rtol=1e-5)  # the exact (erf) GELU
        torch.testing.assert_close(fast.add(x, residual), residual + want, atol=1e-5, rtol=1e-5)
        # a weight packed for 8 rows still takes a batch of another size
        torch.testing.assert_close(fast(x[:3]), want[:3], atol=1e-5, rtol=1e-5)


def test_where_packing_does_not_apply_the_plain_path_runs():
    assert not can_pack(linear(64, 64).weight)  # too small to pay for oneDNN's call
    assert not can_pack(linear().double().weight)  # fp32 only
    assert DecodeLinear(linear(), rows=1).packed is None  # one row: nothing to gain
    assert DecodeLinear(linear(), rows=None).packed is None
    lin = linear(64, 64)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(DecodeLinear(lin, rows=4).add(x, x), x + F.linear(x, lin.weight, lin.bias))


@needs_onednn
def test_a_changed_weight_is_packed_again():
    lin = linear()
    x = torch.randn(8, 256)
    with torch.no_grad():
        before = DecodeLinear(lin, rows=8)(x)
        lin.weight.mul_(2.0)  # an in-place change, as an optimizer step or load_state_dict makes
        after = DecodeLinear(lin, rows=8)(x)
        torch.testing.assert_close(after, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


@needs_onednn
def test_autograd_takes_the_differentiable_path():
    lin = linear()
    x = torch.randn(8, 256, requires_grad=True)
    DecodeLinear(lin, rows=8).gelu(x).sum().backward()
    want = torch.autograd.grad(F.gelu(F.linear(x, lin.weight, lin.bias)).sum(), x)[0]
    torch.testing.assert_close(x.grad, want)
    assert lin.weight.grad is not None


@needs_onednn
@pytest.mark.parametrize("attention", ["full", "paper"])
def test_packed_decode_equals_full_forward_at_a_packing_width(attention):
    """Width 256 (the issue's reference config): qkv and the MLP are packed, the output projection not."""
    torch.manual_seed(0)
    cfg = {**PRESETS["small"], "grid_size": 4, "text_len": 6, "num_text_tokens": 40, "num_image_tokens": 64,
           "depth": 2, "attention": attention, "conv_kernel": 3}
    model = DALLE(DalleConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 34, (4, 6), generator=g)
    codes = torch.randint(0, 64, (4, 16), generator=g)
    with torch.no_grad():
        want = model.image_head(model(text, codes)[:, 5:-1])
        caches = model.new_caches(4)
        w = caches[0].weights
        assert w.qkv.packed is not None and w.fc1.packed is not None and w.proj.packed is None
        got = [model.prefill(text, caches, codes[:, :3])]
        got += [model.decode_step(codes[:, i], 6 + i, caches) for i in range(3, 15)]
    torch.testing.assert_close(torch.stack(got, 1), want[:, 3:], atol=1e-5, rtol=0)
