"""The DALL-E transformer: loss, heads, CFG caption drop, KV cache, sizes."""

import math

import pytest
import torch

from cvformers.config import ConfigError
from cvformers.models.dalle import DALLE, PRESETS, DalleConfig, meta_model, num_params
from cvformers.registry import build_model



def tiny(**kw) -> DALLE:
    torch.manual_seed(0)
    return DALLE(DalleConfig(**{**PRESETS["tiny"], "grid_size": 4, "text_len": 6, "num_text_tokens": 40, **kw}))


def batch(model, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    return {"text": torch.randint(0, cfg.num_text_tokens - cfg.text_len, (b, cfg.text_len), generator=g),
            "codes": torch.randint(0, cfg.num_image_tokens, (b, cfg.grid_size, cfg.grid_size), generator=g)}


def test_loss_and_metrics():
    model = tiny()
    loss, m = model.loss(batch(model))
    assert set(m) == {"loss", "text_loss", "image_loss", "image_bits_per_token"}
    assert math.isclose(m["loss"], 0.125 * m["text_loss"] + 0.875 * m["image_loss"], rel_tol=1e-5)
    assert math.isclose(m["image_bits_per_token"], m["image_loss"] / math.log(2), rel_tol=1e-6)
    # near uniform at init: about log(vocab)
    assert abs(m["image_loss"] - math.log(model.cfg.num_image_tokens)) < 0.5
    loss.backward()


def test_overfits_one_batch():
    model = tiny(caption_drop_prob=0.0)
    data = batch(model, b=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, m = model.loss(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or m["image_loss"]
    assert m["image_loss"] < 0.3 * first


def test_image_outputs_only_depend_on_earlier_tokens_and_heads_are_separate():
    model = tiny().eval()
    data = batch(model, b=1)
    T = model.cfg.text_len
    with torch.no_grad():
        h = model(data["text"], data["codes"])
        codes2 = data["codes"].clone()
        codes2[0, -1, -1] = (codes2[0, -1, -1] + 1) % model.cfg.num_image_tokens  # the last id
        h2 = model(data["text"], codes2)
    assert torch.allclose(h[:, :-1], h2[:, :-1], atol=1e-6)  # causal through the whole stack
    assert model.image_head(h[:, T - 1 :]).shape[-1] == model.cfg.num_image_tokens
    assert model.text_head(h[:, :T]).shape[-1] == model.cfg.num_text_tokens


def test_caption_drop_gives_per_position_pads():
    model = tiny(caption_drop_prob=1.0)
    text = batch(model)["text"]
    dropped = model.caption_dropped(text)
    cfg = model.cfg
    want = torch.arange(cfg.text_len) + cfg.num_text_tokens - cfg.text_len
    assert torch.equal(dropped, want.expand_as(text))
    assert torch.equal(model.unconditional_text(2), want.expand(2, -1))


@pytest.mark.parametrize("attention", ["paper", "full", ["column", "conv"]])
def test_prefill_and_decode_equal_full_forward(attention):
    model = tiny(depth=2, attention=attention, conv_kernel=3).eval()
    data = batch(model, b=2)
    T, n = model.cfg.text_len, model.cfg.grid_size**2
    codes = data["codes"].flatten(1)
    with torch.no_grad():
        want = model.image_head(model(data["text"], codes)[:, T - 1 : -1])
        caches = model.new_caches(2)
        got = [model.prefill(data["text"], caches, codes[:, :5])]
        got += [model.decode_step(codes[:, i], T + i, caches) for i in range(5, n - 1)]
    torch.testing.assert_close(torch.stack(got, 1), want[:, 5:], atol=1e-5, rtol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny(checkpoint_activations=ckpt, caption_drop_prob=0.0)
        model.loss(batch(model))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_paper_size_on_meta_device():
    model = meta_model(DalleConfig(**PRESETS["paper"]))
    assert 11.5e9 < num_params(model) < 12.5e9  # "a 12-billion parameter" transformer
    assert model.cfg.schedule()[-1] == "conv" and model.cfg.schedule()[1] == "column"


def test_registry_and_config_errors():
    model = build_model("dalle", {**PRESETS["tiny"], "attention": "row"})
    assert isinstance(model, DALLE)
    with pytest.raises(ConfigError):
        build_model("dalle", {"attention": "diagonal"})
    with pytest.raises(ConfigError):
        build_model("dalle", {"depth": 3, "attention": ["row", "conv"]})
