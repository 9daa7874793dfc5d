"""CLIP model: loss, temperature clamp, EOT pooling, gradient cache, overfitting, layouts."""

import math

import pytest
import torch
import torch.nn.functional as F

from cvformers.config import ConfigError
from cvformers.models.clip import CLIP, CLIPConfig, clip_config, clip_loss, load_openai_state_dict
from cvformers.registry import build_model

torch.set_num_threads(1)


def tiny(**kw) -> CLIP:
    torch.manual_seed(0)
    return CLIP(clip_config("tiny", vision_width=32, text_width=32, embed_dim=16, context_length=8,
                            vocab_size=50, **kw))


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 32, 32, generator=g), "text": torch.randint(0, 49, (n, 8), generator=g)}


def train(model, data, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(steps):
        loss, _ = model.loss(data)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_loss_is_symmetric_and_matches_hand_computation():
    img = F.normalize(torch.randn(4, 5), dim=-1)
    txt = F.normalize(torch.randn(4, 5), dim=-1)
    scale = torch.tensor(7.0)
    loss, logits = clip_loss(img, txt, scale)
    # by hand: softmax cross-entropy of the diagonal, once over rows, once over columns
    s = [[7.0 * sum(img[i, d].item() * txt[j, d].item() for d in range(5)) for j in range(4)] for i in range(4)]
    rows = sum(-s[i][i] + math.log(sum(math.exp(v) for v in s[i])) for i in range(4)) / 4
    cols = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(4))) for j in range(4)) / 4
    assert loss.item() == pytest.approx((rows + cols) / 2, abs=1e-5)
    swapped, _ = clip_loss(txt, img, scale)  # exchanging the towers' roles changes nothing
    assert swapped.item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(logits, torch.tensor(s), atol=1e-5)


def test_logit_scale_init_and_clamp_at_100():
    model = tiny()
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP §2.5 init
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) ~ 22026
    scale = model.scale()
    assert scale.item() == pytest.approx(100.0, rel=1e-5)
    scale.backward()
    assert model.logit_scale.grad.item() == 0.0  # clipped: no gradient pushes it further


def test_eot_pooling_argmax_and_first_pad():
    model = tiny(text_pool="argmax")
    x = torch.arange(2 * 8, dtype=torch.float).view(2, 8, 1)
    text = torch.tensor([[5, 7, 49, 0, 0, 0, 0, 0], [5, 49, 0, 0, 0, 0, 0, 0]])  # 49 plays EOT
    assert model.pool_text(x, text).flatten().tolist() == [2.0, 9.0]
    model = tiny(text_pool="first_pad", real_vocab_size=40)
    text = torch.tensor([[3, 4, 5, 43, 44, 45, 46, 47], [3, 4, 5, 6, 7, 8, 9, 10]])  # pads are 40 + i
    assert model.pool_text(x, text).flatten().tolist() == [3.0, 15.0]  # first pad; full: last


def test_text_pooling_ignores_tokens_after_eot():
    model = tiny(text_pool="argmax").eval()
    a = torch.tensor([[5, 7, 49, 0, 0, 0, 0, 0]])
    b = torch.tensor([[5, 7, 49, 3, 9, 1, 2, 0]])  # causal: what follows the EOT cannot matter
    assert torch.allclose(model.encode_text(a), model.encode_text(b), atol=1e-6)


def test_gradient_cache_equals_full_batch_loss_and_grads():
    data = batch(n=7)
    plain = tiny()
    loss, _ = plain.loss(data)
    (loss * 0.5).backward()  # as the trainer's 1/grad_accum would scale it
    cached = tiny(micro_batch=3)  # 7 = 3 + 3 + 1
    cached.load_state_dict(plain.state_dict())
    loss_c, metrics = cached.loss(data)
    (loss_c * 0.5).backward()
    assert loss_c.item() == pytest.approx(loss.item(), abs=1e-6)
    for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
        assert q.grad is not None, name
        assert (p.grad - q.grad).abs().max().item() <= 1e-5, name


def test_tiny_clip_overfits_eight_pairs():
    model = tiny()
    data = batch(n=8, seed=3)
    train(model, data, steps=60)
    model.eval()
    _, metrics = model.loss(data)
    assert metrics["acc_i2t"] == 1.0 and metrics["acc_t2i"] == 1.0, metrics


def test_openai_state_dict_layout_and_round_trip():
    model = tiny(quick_gelu=True)
    keys = set(model.state_dict())
    for key in ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                "visual.ln_pre.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
                "visual.transformer.resblocks.1.mlp.c_proj.bias", "visual.ln_post.bias", "visual.proj",
                "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.ln_1.weight",
                "transformer.resblocks.1.attn.out_proj.weight", "ln_final.weight", "text_projection",
                "logit_scale"]:
        assert key in keys, key
    # a checkpoint rebuilt from its weights alone has the same shape and outputs
    sd = {**model.state_dict(), "input_resolution": torch.tensor(32)}
    rebuilt = load_openai_state_dict(sd, quick_gelu=True, text_heads=2, vision_heads=2)
    assert rebuilt.cfg.vision_layers == 2 and rebuilt.cfg.text_layers == 2 and rebuilt.cfg.context_length == 8
    model.eval()
    data = batch(2)
    assert torch.allclose(rebuilt.encode_image(data["image"]), model.encode_image(data["image"]), atol=1e-6)


def test_registry_kind_and_grey_images():
    model = build_model("clip", {"embed_dim": 16, "vision_width": 32, "text_width": 32})
    assert isinstance(model, CLIP) and isinstance(model.cfg, CLIPConfig)
    out = model.encode_image(torch.rand(2, 1, 32, 32))  # MNIST-like input through the RGB tower
    assert out.shape == (2, 16)


def test_registry_backbone_as_image_tower():
    pytest.importorskip("cvformers.models.vision")
    model = tiny(image_encoder="mixer_nano_patch4_32")
    assert any(k.startswith("visual.trunk.") for k in model.state_dict())
    assert "visual.head.proj.weight" in model.state_dict()
    loss, _ = model.loss(batch(4))
    loss.backward()
    assert model.visual.head.proj.weight.grad is not None


def test_hard_negative_loss_matches_hand_computation_and_trains_binding():
    model = tiny()
    data = batch(n=4, seed=5)
    data["negative_text"] = torch.randint(0, 49, (4, 8), generator=torch.Generator().manual_seed(9))
    loss, _ = model.loss(data)
    img = model.encode_image(data["image"], normalize=True)
    txt = model.encode_text(torch.cat([data["text"], data["negative_text"]]), normalize=True)
    logits = model.scale() * img @ txt.t()  # [4, 8]: each image against 4 captions and 4 negatives
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :4].t(), labels)) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    train(model, data, steps=60)
    with torch.no_grad():
        _, metrics = model.loss(data)
    assert metrics["acc_vs_negative"] == 1.0 and metrics["acc_i2t"] == 1.0, metrics
    with pytest.raises(ConfigError, match="micro_batch"):
        tiny(micro_batch=2).loss(data)


def test_negative_image_loss_matches_hand_computation_and_learns_to_rank_the_true_picture():
    model = tiny()
    data = batch(n=4, seed=5)
    data["negative_image"] = torch.rand(data["image"].shape, generator=torch.Generator().manual_seed(3))
    loss, _ = model.loss(data)
    img = model.encode_image(torch.cat([data["image"], data["negative_image"]]), normalize=True)
    txt = model.encode_text(data["text"], normalize=True)
    logits = model.scale() * img @ txt.t()  # [8, 4]: 4 images and their 4 negatives against 4 captions
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits[:4], labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    train(model, data, steps=60)
    with torch.no_grad():
        _, metrics = model.loss(data)
    assert metrics["acc_vs_negative_image"] == 1.0 and metrics["acc_t2i"] == 1.0, metrics
    assert "acc_vs_negative" not in metrics  # no negative captions in this batch


def test_train_clip_with_hard_negatives_from_the_cli(tmp_path, capsys):
    import json

    from cvformers.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nsize = 32\neval_size = 16\n[text]\nbpe_train_captions = 200\nhard_negatives = true\n"
                   "hard_negative_images = true\n[train]\neval_every = 0\nlog_every = 1\n")
    out = tmp_path / "run"
    assert main(["train", "clip", "--data", "shapes", "--out", str(out), "--steps", "2",
                 "--batch-size", "8", "--config", str(cfg)]) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("acc_vs_negative" in row and "acc_vs_negative_image" in row for row in logged)
    # other data have no scene records to make a wrong caption from: refused, exit status 2
    assert main(["train", "clip", "--data", "mnist", "--out", str(tmp_path / "x"),
                 "--steps", "1", "--config", str(cfg)]) == 2
    assert "hard_negatives" in capsys.readouterr().err


def test_colourless_captions_replace_a_fixed_share_of_training_captions(tmp_path, capsys):
    from cvformers.cli import main
    from cvformers.data.shapes import ShapesDataset
    from cvformers.tasks.clip import ColourlessCaptions

    data = ShapesDataset("train", size=400)
    wrapped = ColourlessCaptions(data, 0.5)
    changed = [i for i in range(len(data)) if wrapped[i]["caption"] != data[i]["caption"]]
    assert 150 < len(changed) < 250
    again = ColourlessCaptions(data, 0.5)  # a later epoch, or a resumed run
    assert [again[i]["caption"] for i in changed] == [wrapped[i]["caption"] for i in changed]
    i = changed[0]
    assert torch.equal(wrapped[i]["image"], data[i]["image"]) and wrapped[i]["record"] == data[i]["record"]
    assert all(wrapped[i]["caption"] == data[i]["caption"] for i in range(len(data)) if i not in changed)

    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nsize = 32\neval_size = 16\n[text]\nbpe_train_captions = 200\ncolourless_captions = 0.5\n"
                   "[train]\neval_every = 0\n")
    assert main(["train", "clip", "--data", "shapes", "--out", str(tmp_path / "run"), "--steps", "2",
                 "--batch-size", "8", "--config", str(cfg)]) == 0
    assert main(["train", "clip", "--data", "mnist", "--out", str(tmp_path / "x"),
                 "--steps", "1", "--config", str(cfg)]) == 2
    assert "colourless_captions" in capsys.readouterr().err
    cfg.write_text("[text]\ncolourless_captions = 1.5\n")
    assert main(["train", "clip", "--data", "shapes", "--out", str(tmp_path / "y"),
                 "--steps", "1", "--config", str(cfg)]) == 2
    assert "between 0 and 1" in capsys.readouterr().err


def test_image_tower_last_block_on_the_class_token_equals_every_token():
    """The last block updates the class token alone: embedding and every gradient equal the full path's."""
    from cvformers.models.clip_visual import ClipVisionTransformer

    torch.manual_seed(0)
    tower = ClipVisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=4, embed_dim=8, in_channels=1)
    images = torch.randn(3, 1, 16, 16)
    fast = tower(images)
    full = tower.ln_post(tower.transformer(tower.tokens(images))[:, 0]) @ tower.proj
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    g_fast = torch.autograd.grad(fast.square().sum(), list(tower.parameters()))
    g_full = torch.autograd.grad(full.square().sum(), list(tower.parameters()))
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unmasked"):
        tower.transformer.resblocks[0].attn(torch.randn(1, 5, 32), causal=True, queries=1)
