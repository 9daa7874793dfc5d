"""Vision backbones: key layout, fast path == explicit path, Swin's shifted-window mask, the
registry, input-size handling, and that each family can fit one batch."""

import math

import pytest
import torch

from cvformers.config import ConfigError, dumps_toml, to_dict, tomllib
from cvformers.errors import UserError
from cvformers.models.swin import SwinBlock, shifted_window_mask
from cvformers.models.vision import (
    PRESETS,
    ImageClassifier,
    build_backbone,
    classifier_config,
    create_model,
    model_rows,
    random_crop,
)
from cvformers.models.vit import resize_pos_embed
from cvformers.nn.layers import count_parameters
from cvformers.nn import vision_layers
from cvformers.nn.vision_layers import ViTAttention, ViTBlock, diagonal_mask, shift_diagonally
from cvformers.registry import build_model

torch.set_num_threads(1)

TINY = {  # one small config per family: fast, but with every structural feature on
    "vit": dict(image_size=16, patch_size=4, in_chans=1, num_classes=4, embed_dim=32, depth=2, num_heads=4),
    "mixer": dict(image_size=16, patch_size=4, in_chans=1, num_classes=4, embed_dim=32, depth=2,
                  tokens_mlp_dim=16, channels_mlp_dim=64),
    "convmixer": dict(image_size=16, patch_size=2, in_chans=1, num_classes=4, dim=32, depth=2, kernel_size=3),
    "swin": dict(image_size=16, patch_size=2, in_chans=1, num_classes=4, embed_dim=16, depths=(2, 2),
                 num_heads=(2, 4), window_size=4, drop_path=0.0),
    "mixer_attention": dict(image_size=16, patch_size=4, in_chans=1, num_classes=4, embed_dim=32, depth=3,
                            mixer_depth=1, num_heads=4, tokens_mlp_dim=16, channels_mlp_dim=64),
    "convmixer_mixer": dict(image_size=16, patch_size=2, in_chans=1, num_classes=4, dim=32, depth=3, conv_depth=2,
                            kernel_size=3, tokens_mlp_dim=16, channels_mlp_dim=64),
}

def test_vit_state_dict_matches_timm_layout():
    model = create_model("vit_tiny_patch16_224")
    sd = model.state_dict()
    expected_shapes = {
        "cls_token": (1, 1, 192), "pos_embed": (1, 197, 192), "patch_embed.proj.weight": (192, 3, 16, 16),
        "patch_embed.proj.bias": (192,), "blocks.0.norm1.weight": (192,), "blocks.0.attn.qkv.weight": (576, 192),
        "blocks.0.attn.qkv.bias": (576,), "blocks.0.attn.proj.weight": (192, 192), "blocks.0.norm2.bias": (192,),
        "blocks.11.mlp.fc1.weight": (768, 192), "blocks.11.mlp.fc2.weight": (192, 768), "norm.weight": (192,),
        "head.weight": (1000, 192), "head.bias": (1000,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    per_block = {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")}
    assert per_block == {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                         "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                         "mlp.fc2.weight", "mlp.fc2.bias"}
    assert len(sd) == 4 + 12 * 12 + 4  # cls, pos, proj w/b; 12 blocks; norm w/b, head w/b
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6
    assert model.blocks[0].mlp.act.approximate == "none"  # exact GELU

def test_patch_norm_embeds_normalised_patches():
    """patch_norm: LayerNorm over each flattened P×P×C patch, Linear, LayerNorm — checked by hand."""
    from cvformers.nn.vision_layers import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(4, 3, 16, norm=True)
    torch.nn.init.normal_(embed.norm_in.weight)  # non-trivial affine, so a wrong patch order shows
    images = torch.rand(2, 3, 8, 12)
    patch = images[1, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)  # grid row 1, column 2: token 1·3 + 2
    expected = embed.norm_out(embed.proj(embed.norm_in(patch)))
    out = embed(images)
    assert out.shape == (2, 6, 16)
    torch.testing.assert_close(out[1, 5], expected)
    vit = create_model("vit_nano_patch4_28", num_classes=10)
    assert {"patch_embed.norm_in.weight", "patch_embed.norm_out.weight"} <= set(vit.state_dict())
    assert vit.pos_embed.std() > 0.5  # init = "pytorch": unit-normal position embeddings

def test_mixer_state_dict_matches_timm_layout():
    sd = create_model("mixer_b16_224").state_dict()
    assert tuple(sd["stem.proj.weight"].shape) == (768, 3, 16, 16)
    assert tuple(sd["blocks.0.mlp_tokens.fc1.weight"].shape) == (384, 196)
    assert tuple(sd["blocks.0.mlp_tokens.fc2.weight"].shape) == (196, 384)
    assert tuple(sd["blocks.11.mlp_channels.fc1.weight"].shape) == (3072, 768)
    assert {"blocks.0.norm1.weight", "blocks.0.norm2.weight", "norm.weight", "head.weight"} <= set(sd)
    assert not any("pos_embed" in k for k in sd)  # Mixer has no position embedding

@pytest.mark.parametrize("bias", [False, True])
def test_attention_sdpa_equals_explicit_weights(bias):
    torch.manual_seed(0)
    attn = ViTAttention(32, 4).eval()
    x = torch.randn(3, 10, 32, requires_grad=True)
    b = torch.randn(4, 10, 10) if bias else None
    fast = attn(x, bias=b)
    (fast_grad,) = torch.autograd.grad(fast.square().sum(), x)
    slow, weights = attn(x, bias=b, return_weights=True)
    (slow_grad,) = torch.autograd.grad(slow.square().sum(), x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, slow_grad, atol=1e-5, rtol=1e-5)
    assert weights.shape == (3, 4, 10, 10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 10))

def test_locality_attention_masks_the_diagonal_and_learns_its_temperature():
    """LSA (Lee et al. 2021 §3.2): SDPA and the explicit path agree, no token attends to itself,
    the temperature gets a gradient, and the output is the definition written out."""
    torch.manual_seed(0)
    attn = ViTAttention(32, 4, locality=True).eval()
    x = torch.randn(3, 10, 32)
    fast = attn(x)
    slow, weights = attn(x, return_weights=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert weights.diagonal(dim1=-2, dim2=-1).abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 10))
    torch.testing.assert_close(attn.log_scale.exp(), torch.tensor(8**-0.5))  # starts at 1/sqrt(d)
    fast.square().sum().backward()
    assert attn.log_scale.grad is not None and attn.log_scale.grad != 0
    with torch.no_grad():  # the definition, written out: softmax(q kᵀ · e^t, diagonal masked) v
        attn.log_scale.fill_(0.3)
        q, k, v = attn.qkv(x).view(3, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1) * math.exp(0.3)).masked_fill(torch.eye(10, dtype=torch.bool), -math.inf)
        want = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 10, 32))
        torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("scale", [None, 1.0, 0.7])
def test_short_masked_attention_fast_path_equals_sdpa(monkeypatch, scale):
    """The explicit path that training takes with a 2-D float mask at few tokens (LSA) computes
    what SDPA computes, forward and gradients, through the layer and on its own."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 10, 8, requires_grad=True) for _ in range(3))
    mask = diagonal_mask(10, q.device, q.dtype)
    assert vision_layers._explicit_is_faster(q, mask, 0.0)
    assert not vision_layers._explicit_is_faster(q.detach(), mask, 0.0)  # inference keeps SDPA
    fast, _ = vision_layers.attention(q, k, v, mask, scale=scale)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    torch.testing.assert_close(fast, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    attn = ViTAttention(32, 4, locality=True).train()
    x = torch.randn(3, 10, 32, requires_grad=True)
    outs, grads = [], []
    for max_tokens in (64, 0):  # explicit path, then SDPA
        monkeypatch.setattr(vision_layers, "EXPLICIT_MASKED_MAX_TOKENS", max_tokens)
        out = attn(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (x, attn.log_scale, attn.qkv.weight, attn.qkv.bias)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

def test_shifted_patches_see_the_image_moved_along_each_diagonal():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 4, 4] = 1.0
    image[0, 0, 0, 0] = 2.0  # moves out of the frame in three of the four copies
    out = shift_diagonally(image, 2)
    assert out.shape == (1, 5, 8, 8)
    ones = sorted(tuple(i.tolist()) for i in (out[0] == 1.0).nonzero())
    assert ones == [(0, 4, 4), (1, 6, 6), (2, 6, 2), (3, 2, 6), (4, 2, 2)]
    assert (out[0] == 2.0).nonzero().tolist() == [[0, 0, 0], [1, 2, 2]]
    with pytest.raises(ValueError, match="patch_norm"):
        build_backbone("vit", {**TINY["vit"], "shifted_patches": True})

def test_small_data_vit_overfits_one_batch():
    torch.manual_seed(0)
    cfg = classifier_config("vit_nano_patch4_28")
    cfg.backbone = {**TINY["vit"], "patch_norm": True, "shifted_patches": True, "locality_attention": True}
    cfg.crop_padding, cfg.hflip, cfg.label_smoothing = 0, False, 0.0
    model = ImageClassifier(cfg).train()
    assert model.backbone.patch_embed.proj.in_features == 5 * 4 * 4  # the image and its 4 shifted copies
    loss, metrics = fit_one_batch(model)
    assert metrics["acc"] == 1.0 and loss < 0.1, loss

def test_vit_forward_equals_attention_path():
    torch.manual_seed(0)
    vit = build_backbone("vit", TINY["vit"]).eval()
    x = torch.rand(2, 1, 16, 16)
    tokens, maps = vit.forward_features(x, return_attention=True)
    torch.testing.assert_close(vit(x), vit.forward_head(tokens), atol=1e-5, rtol=1e-5)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 17, 17)
    block = ViTBlock(32, 4).eval()
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(block(h), block(h, return_weights=True)[0], atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize("options", [{}, {"patch_norm": True, "shifted_patches": True, "locality_attention": True},
                                     {"qkv_bias": False, "drop_path": 0.2}])
def test_vit_class_token_path_equals_every_token_path(options):
    """The last block updates only the class token when that is all that is read: the output and
    every parameter's gradient equal the full computation's, at the trained size and a smaller one,
    in training mode (drop path draws the same per-image masks)."""
    torch.manual_seed(0)
    vit = build_backbone("vit", {**TINY["vit"], **options}).train()
    for size in (16, 8):
        x = torch.rand(3, 1, size, size)
        torch.manual_seed(1)
        fast = vit(x)
        torch.manual_seed(1)
        full = vit.forward_head(vit.forward_features(x))
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
        g_fast = torch.autograd.grad(fast.square().sum(), list(vit.parameters()))
        g_full = torch.autograd.grad(full.square().sum(), list(vit.parameters()))
        for a, b in zip(g_fast, g_full):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    block = ViTBlock(32, 4).eval()
    h = torch.randn(2, 5, 32)
    out = block(h, queries=2)
    assert out.shape == (2, 2, 32)
    torch.testing.assert_close(out, block(h)[:, :2], atol=1e-5, rtol=1e-5)
    # the patch tokens do reach the class token through the last block's keys and values
    h2 = h.clone()
    h2[:, 3] += torch.randn(32)  # not a constant: LayerNorm would remove it
    assert not torch.allclose(block(h2, queries=1), out[:, :1])


def test_vit_interpolates_position_embeddings_for_other_sizes():
    vit = build_backbone("vit", TINY["vit"]).eval()
    assert vit(torch.rand(1, 1, 24, 24)).shape == (1, 4)
    with pytest.raises(ValueError, match="multiples of 4"):
        vit(torch.rand(1, 1, 18, 18))
    pe = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pe, (4, 4)) is pe
    bigger = resize_pos_embed(pe, (6, 6))
    assert bigger.shape == (1, 37, 8) and torch.equal(bigger[:, 0], pe[:, 0])
    # a checkpoint at another resolution loads, with its grid interpolated
    other = build_backbone("vit", {**TINY["vit"], "image_size": 24})
    other.load_state_dict(vit.state_dict())
    assert other.pos_embed.shape == (1, 37, 32)

def _swin_block(shift: int) -> SwinBlock:
    torch.manual_seed(0)
    return SwinBlock(8, 2, resolution=8, window=4, shift=shift, mlp_ratio=2.0, qkv_bias=True,
                     dropout=0.0, attn_dropout=0.0, drop_path=0.0).eval()

def _influence(block: SwinBlock, src: tuple[int, int]) -> torch.Tensor:
    """Which output tokens change when the input token at ``src`` is perturbed: [H, W] bool."""
    torch.manual_seed(1)
    x = torch.randn(1, 8, 8, 8)
    y = x.clone()
    y[0, src[0], src[1]] += torch.randn(8)  # not a constant: LayerNorm would remove it
    with torch.no_grad():
        return (block(x) - block(y)).abs().amax(-1)[0] > 1e-6

def test_swin_windows_do_not_mix():
    changed = _influence(_swin_block(shift=0), (0, 0))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True  # the top-left window only
    assert torch.equal(changed, expected)

def test_swin_shifted_window_mask_blocks_wrapped_neighbours():
    # After the cyclic shift by 2, the window at the bottom-right corner holds tokens from all four
    # corners of the map. The mask must keep (0, 0) from reaching (7, 7), (0, 7) or (7, 0).
    changed = _influence(_swin_block(shift=2), (0, 0))
    assert not changed[7, 7] and not changed[0, 7] and not changed[7, 0]
    assert changed[0, 0] and changed[1, 1]  # its own region (rows/cols 0-1) still attends to it
    assert changed.sum() == 4  # exactly the 2x2 region that stayed together
    # without the mask the wrapped corners would mix
    unmasked = _swin_block(shift=2)
    unmasked.attn_mask = None
    assert _influence(unmasked, (0, 0))[7, 7]
    # and a token in the middle of the map influences a whole shifted window, across the old borders
    assert _influence(_swin_block(shift=2), (3, 3))[4, 4]

def test_shifted_window_mask_values():
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window is untouched by the roll
    assert (mask[3] < 0).any() and torch.equal(mask[3], mask[3].T)

@pytest.mark.parametrize("family", list(TINY))
def test_each_family_overfits_one_batch(family):
    torch.manual_seed(0)
    cfg = classifier_config("vit_nano_patch4_28")
    cfg.family, cfg.backbone = family, dict(TINY[family])
    cfg.crop_padding, cfg.hflip, cfg.label_smoothing = 0, False, 0.0
    loss, metrics = fit_one_batch(ImageClassifier(cfg).train())
    assert metrics["acc"] == 1.0 and loss < 0.1, (family, loss)

def fit_one_batch(model, steps: int = 60) -> tuple[float, dict]:
    """Adam on one batch of 8 random images, 4 labels -> (eval loss, eval metrics) on it."""
    batch = {"image": torch.rand(8, 1, 16, 16), "label": torch.arange(8) % 4}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss, metrics = model.eval().loss(batch)
    return loss.item(), metrics

def test_hybrid_split_is_a_config_value():
    m = build_backbone("mixer_attention", TINY["mixer_attention"])
    kinds = [type(b).__name__ for b in m.blocks]
    assert kinds == ["MixerBlock", "ViTBlock", "ViTBlock"]
    c = build_backbone("convmixer_mixer", TINY["convmixer_mixer"])
    assert [type(b).__name__ for b in c.blocks] == ["ConvMixerLayer", "ConvMixerLayer", "MixerBlock"]
    with pytest.raises(ConfigError, match="mixer_depth"):
        build_backbone("mixer_attention", {**TINY["mixer_attention"], "mixer_depth": 9})

def test_convmixer_runs_channels_last():
    m = build_backbone("convmixer", TINY["convmixer"])
    assert m.blocks[0].pointwise.weight.is_contiguous(memory_format=torch.channels_last)
    assert m.forward_features(torch.rand(2, 1, 16, 16)).is_contiguous(memory_format=torch.channels_last)

def test_registry_errors_name_what_is_known():
    with pytest.raises(UserError, match="vit_tiny_patch4_28"):
        create_model("vit_gigantic")
    with pytest.raises(ConfigError, match="num_clases"):
        create_model("vit_nano_patch4_28", num_clases=10)
    assert create_model("vit_nano_patch4_28", num_classes=7).head.out_features == 7

def test_list_models_counts_parameters():
    rows = {r["name"]: r for r in model_rows()}
    assert set(rows) == set(PRESETS)
    assert rows["vit_nano_patch4_28"]["params"] == count_parameters(create_model("vit_nano_patch4_28"))
    assert abs(rows["vit_base_patch16_224"]["params"] - 86.6e6) < 0.1e6  # ViT-B/16: 86M (paper table 1)
    assert abs(rows["mixer_b16_224"]["params"] - 59.9e6) < 0.2e6  # Mixer-B/16: 59M (paper table 1)
    assert abs(rows["swin_tiny_patch4_window7_224"]["params"] - 28.3e6) < 0.3e6  # Swin-T: 28M

def test_wrong_size_is_resized_with_notice_or_refused():
    mixer = build_backbone("mixer", TINY["mixer"])
    with pytest.raises(ValueError, match="takes 16x16 images only"):
        mixer(torch.rand(1, 1, 20, 20))
    cfg = classifier_config("mixer_nano_patch4_28")
    clf = ImageClassifier(cfg).eval()
    with pytest.warns(UserWarning, match="resized 32x32"):
        assert clf(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    with pytest.warns(UserWarning, match="converted 3-channel"):
        clf(torch.rand(1, 3, 28, 28))
    with pytest.raises(UserError, match="4 channels"):
        clf(torch.rand(1, 4, 28, 28))

def test_classifier_kind_round_trips_through_toml():
    torch.manual_seed(0)
    cfg = classifier_config("swin_nano_patch2_window7_28")
    model = ImageClassifier(cfg).eval()
    table = tomllib.loads(dumps_toml({"kind": "classifier", "model": to_dict(cfg)}))
    rebuilt = build_model(table["kind"], table["model"]).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model(x), rebuilt(x))

def test_random_crop_shifts_within_padding():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(random_crop(x, 0), x)
    out = random_crop(x, 2)
    assert out.shape == x.shape
    for i in range(16):  # every crop is the padded image at some offset in [0, 4]^2
        padded = torch.nn.functional.pad(x[i], (2,) * 4)
        assert any(torch.equal(out[i], padded[:, dy : dy + 8, dx : dx + 8]) for dy in range(5) for dx in range(5))
