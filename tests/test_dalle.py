"""The DALL-E transformer: loss, heads, CFG caption drop, KV cache, sizes."""

import math

import pytest
import torch

from cvformers.config import ConfigError
from cvformers.models.dalle import DALLE, PRESETS, DalleConfig, meta_model
from cvformers.nn.layers import count_parameters
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


def fit(model: DALLE, data: dict, steps: int) -> tuple[dict, dict]:
    """AdamW on one batch -> (metrics of the first step, metrics of the last)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        loss, metrics = model.loss(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics)
    return history[0], history[-1]


def test_overfits_one_batch():
    model = tiny(caption_drop_prob=0.0)
    first, last = fit(model, batch(model, b=4), 60)
    assert last["image_loss"] < 0.3 * first["image_loss"]


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
    assert 11.5e9 < count_parameters(model) < 12.5e9  # "a 12-billion parameter" transformer
    assert model.cfg.schedule()[-1] == "conv" and model.cfg.schedule()[1] == "column"


def test_registry_and_config_errors():
    model = build_model("dalle", {**PRESETS["tiny"], "attention": "row"})
    assert isinstance(model, DALLE)
    with pytest.raises(ConfigError):
        build_model("dalle", {"attention": "diagonal"})
    with pytest.raises(ConfigError):
        build_model("dalle", {"depth": 3, "attention": ["row", "conv"]})


# --- pair ids (factorised image tokenizers) -----------------------------------------------


def test_pair_ids_sum_embeddings_and_multiply_probabilities():
    model = tiny(num_image_tokens=64, image_inner_vocab=8)
    emb, head = model.image_emb, model.image_head
    ids = torch.tensor([[9, 17]])  # (1, 1) and (2, 1)
    want = torch.stack([emb.outer.weight[1] + emb.inner.weight[1], emb.outer.weight[2] + emb.inner.weight[1]])
    torch.testing.assert_close(emb(ids)[0], want)
    h = torch.randn(2, 5, model.cfg.dim)
    joint = head(h).log_softmax(-1).view(2, 5, 8, 8)
    parts = head.outer(h).log_softmax(-1)[..., :, None] + head.inner(h).log_softmax(-1)[..., None, :]
    torch.testing.assert_close(joint, parts)
    assert set(k for k in model.state_dict() if k.startswith("image_")) >= {
        "image_emb.outer.weight", "image_emb.inner.weight", "image_head.outer.weight", "image_head.inner.weight"}
    with pytest.raises(ValueError, match="image_inner_vocab"):
        tiny(num_image_tokens=64, image_inner_vocab=7)


def test_pair_head_draws_a_pair_never_seen_in_training_and_a_joint_head_does_not():
    """Caption token 0 picks the outer part, token 1 the inner; the pairs (a, a) never occur in
    training. The two-head model predicts them from their parts; one joint softmax never does."""
    torch.set_num_threads(1)

    def first_ids(inner_vocab: int) -> list[int]:
        model = tiny(num_image_tokens=16, image_inner_vocab=inner_vocab, caption_drop_prob=0.0)
        T = model.cfg.text_len

        def make(pairs):
            text = torch.tensor([[a, 4 + b] + [8 + i for i in range(T - 2)] for a, b in pairs])
            return {"text": text, "codes": torch.tensor([a * 4 + b for a, b in pairs])[:, None, None].expand(-1, 4, 4)}

        _, last = fit(model, make([(a, b) for a in range(4) for b in range(4) if a != b]), 150)
        assert last["image_loss"] < 0.05  # both fit the training pairs
        with torch.no_grad():
            h = model.eval()(make([(a, a) for a in range(4)])["text"])
            return model.image_head(h[:, T - 1]).argmax(-1).tolist()

    assert first_ids(4) == [0, 5, 10, 15]
    assert not set(first_ids(0)) & {0, 5, 10, 15}


def test_bf16_autocast_agrees_with_fp32():
    """The trainer's ``amp = "bf16"`` option: under bf16 autocast the DALL-E loss is within 0.1% of
    fp32 and the gradient points the same way (cosine > 0.999; here 8e-6 relative and 0.99999), so it is
    a safe speed option on GPUs (on this CPU bf16 products are far slower than fp32)."""
    model = tiny(caption_drop_prob=0.0)
    data = batch(model, b=4)
    results = []
    for amp in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = model.loss(data)
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss32, grad32), (loss16, grad16) = results
    assert abs(loss16 - loss32) < 1e-3 * loss32
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.999
