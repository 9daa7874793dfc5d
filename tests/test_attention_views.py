"""Attention pictures of the shipped CLIP's ViT image tower, held to the fused forward pass."""

import torch
from einops import rearrange
import torch.nn.functional as F

from cvformers.cli import main
from cvformers.images import save_png
from cvformers.loading import load_clip
from cvformers.pipelines.attention import clip_attention_figure

torch.set_num_threads(1)


def test_clip_tower_attention_maps_are_the_weights_forward_uses():
    clip, _ = load_clip("default/clip")
    clip = clip.float()
    visual, cfg = clip.visual, clip.cfg
    images = torch.rand(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    maps = visual.attention_maps(images)
    tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
    assert len(maps) == cfg.vision_layers
    assert all(m.shape == (2, cfg.vision_heads, tokens, tokens) for m in maps)
    assert all(torch.allclose(m.sum(-1), torch.ones(2, cfg.vision_heads, tokens), atol=1e-5) for m in maps)
    # the written-out weights times v are the first block's fused SDPA output
    block = visual.transformer.resblocks[0]
    x = block.ln_1(visual.tokens(images))
    v = F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)[2]
    v = rearrange(v, "b n (h d) -> b h n d", h=block.attn.heads)
    mixed = block.attn.out_proj(rearrange(maps[0] @ v, "b h n d -> b n (h d)"))
    assert torch.allclose(mixed, block.attn(x), atol=1e-5)


def test_attention_cli_draws_the_shipped_clip(tmp_path):
    clip, _ = load_clip("default/clip")
    image = torch.zeros(3, 32, 32)
    image[:, 8:16, 8:16] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    fig = clip_attention_figure(clip.float(), image)
    heads = [label for label, _ in fig.sections[1][1][0]]
    assert heads == [f"head {h}" for h in range(clip.cfg.vision_heads)]
    path = save_png(image, tmp_path / "red.png")
    out = tmp_path / "attn.png"
    assert main(["attention", str(path), "--model", "default/clip", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["attention", "--model", "default/clip", "--out", str(out)]) == 2  # no image


def test_dalle_image_to_text_attention_of_the_shipped_model(tmp_path):
    from cvformers.pipelines.attention import dalle_text_attention
    from cvformers.pipelines.text_to_image import TextToImage

    pipe = TextToImage.load("default")
    model, cfg = pipe.model, pipe.model.cfg
    text = pipe.encode_prompt("a red circle")
    codes = torch.randint(0, cfg.num_image_tokens, (1, cfg.grid_size ** 2))
    maps = model.eval().attention_maps(text, codes)
    S = cfg.text_len + cfg.grid_size ** 2
    assert len(maps) == cfg.depth and all(m.shape == (1, cfg.heads, S, S) for m in maps)
    for m, block in zip(maps, model.blocks):
        assert torch.allclose(m.float().sum(-1), torch.ones(1, cfg.heads, S), atol=1e-3)
        assert (m[0][:, ~block.attn.pattern.dense_mask()] == 0).all()  # nothing outside the sparse pattern

    image, words, heat = dalle_text_attention(pipe, "a red circle above a blue square")
    assert words == ["a", "red", "circle", "above", "a", "blue", "square"]
    assert heat.shape == (7, cfg.grid_size, cfg.grid_size) and image.shape[-1] == pipe.image_size
    assert ((heat >= 0) & (heat.sum(0) <= 1 + 1e-4)).all() and heat.sum() > 0
    out = tmp_path / "dalle.png"
    assert main(["attention", "--model", "default", "--prompt", "a red circle", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["attention", "--model", "default", "--out", str(out)]) == 2  # no prompt
    assert main(["attention", "--model", "default/clip", "--prompt", "a red circle", "--out", str(out)]) == 2
