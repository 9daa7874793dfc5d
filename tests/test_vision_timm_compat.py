"""timm checkpoints load into cvformers' ViT, Mixer and Swin with strict=True and give the same outputs.

Needs timm, which needs a torchvision that imports beside torch: run it in the environment made
by ``scripts/setup_timm_env.sh``:
    .venv-timm/bin/python -m pytest -m compat tests/test_vision_timm_compat.py
Skipped (with the reason) wherever timm is absent.
"""

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed here; run scripts/setup_timm_env.sh and "
                                          "use .venv-timm/bin/python -m pytest -m compat")

from cvformers.models.vision import create_model  # noqa: E402

pytestmark = pytest.mark.compat


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "mixer_b16_224"])
def test_timm_weights_load_strict_and_match(name):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    # timm zero-initialises some tensors (cls/pos embeddings, heads); make every weight random so
    # that a wrongly mapped key cannot hide behind zeros.
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = create_model(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(reference.state_dict())
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(images)
        got = ours(images)
    assert got.shape == expected.shape == (2, 1000)
    assert (got - expected).abs().max().item() <= 1e-5


def test_timm_vit_attention_weights_path_matches():
    """Our explicit attention-weights path gives timm's output too (not only the SDPA path)."""
    torch.manual_seed(1)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    ours = create_model("vit_tiny_patch16_224").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        tokens, maps = ours.forward_features(images, return_attention=True)
        assert (ours.forward_head(tokens) - reference(images)).abs().max().item() <= 1e-5
    assert len(maps) == 12 and maps[0].shape == (1, 3, 197, 197)


def _randomise(model):
    """timm zero-initialises some tensors; make every weight random so a wrongly mapped key shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("name, timm_kwargs", [
    ("swin_tiny_patch4_window7_224", None),  # timm's own preset of the same name
    # our CPU preset, as a timm SwinTransformer of the same config: the last stage fits one window
    ("swin_micro_patch4_window4_32", dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=96,
                                          depths=(2, 2), num_heads=(3, 6), window_size=4)),
])
def test_timm_swin_state_dict_loads_strict_and_matches(name, timm_kwargs, tmp_path):
    """Swin keeps timm's layout (downsample opening stages 1…, patch_embed.proj, head.fc): a timm
    state dict loads with strict=True, key for key, and gives the same logits; so does the same
    state saved as safetensors and given to cvformers.create_model(checkpoint_path=…)."""
    from safetensors.torch import save_file
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    import cvformers

    torch.manual_seed(0)
    reference = _randomise(timm.create_model(name, pretrained=False) if timm_kwargs is None
                           else TimmSwin(**timm_kwargs))
    ours = create_model(name).eval()
    assert set(ours.state_dict()) == set(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    size = ours.cfg.image_size
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "timm.safetensors")
    loaded = cvformers.create_model(name, checkpoint_path=tmp_path / "timm.safetensors").eval()
    with torch.no_grad():
        assert (loaded(images) - expected).abs().max().item() <= 1e-5
