"""open_clip / OpenAI weight compatibility: same state dict, same embeddings, same token ids.

Needs open_clip_torch (which needs torchvision); set up its environment with
``scripts/setup_openclip_env.sh`` and run
``.venv-openclip/bin/python -m pytest -m compat tests/test_clip_compat.py``.
"""

import pytest
import torch

try:
    import open_clip
except Exception as e:  # ImportError, or torchvision failing to import beside this torch
    pytest.skip(f"open_clip not importable here ({type(e).__name__}: {e}); "
                "run in the env of scripts/setup_openclip_env.sh", allow_module_level=True)

from cvformers.clip_tokenizer import ClipTokenizer
from cvformers.models.clip import OPENAI_MEAN, OPENAI_STD, load_openai_state_dict

pytestmark = pytest.mark.compat

CAPTIONS = ["a photo of a cat.", "A RED circle & a blue   square!!", "naïve café 123 don't", "x " * 90]


def _compare(ref, quick_gelu: bool, image_size: int):
    torch.manual_seed(0)
    ref.eval()
    model = load_openai_state_dict(ref.state_dict(), quick_gelu=quick_gelu)
    assert model.cfg.image_size == image_size
    images = torch.rand(2, 3, image_size, image_size)  # cvformers takes [0,1] pixels ...
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    text = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)
    with torch.no_grad():
        ref_img = ref.encode_image((images - mean) / std)  # ... open_clip normalised ones
        ref_txt = ref.encode_text(text)
        img, txt = model.encode_image(images), model.encode_text(text)
    assert (img - ref_img).abs().max().item() <= 1e-4
    assert (txt - ref_txt).abs().max().item() <= 1e-4
    assert torch.allclose(model.scale(), ref.logit_scale.exp())


def test_vit_b_32_random_init_matches_open_clip():
    ref = open_clip.create_model("ViT-B-32", pretrained=None)  # exact GELU in open_clip's config
    _compare(ref, quick_gelu=False, image_size=224)


def test_small_quickgelu_config_matches_open_clip():
    ref = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=2, head_width=64),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
        quick_gelu=True,
    )
    _compare(ref, quick_gelu=True, image_size=32)


def test_clip_tokenizer_matches_open_clip():
    ours = ClipTokenizer.load()  # finds the vocabulary inside the installed open_clip
    theirs = open_clip.get_tokenizer("ViT-B-32")
    texts = CAPTIONS + ["emoji 😀 ümlaut 北京", "hello_world <end_of_text> x", ""]
    assert torch.equal(ours(texts), theirs(texts))
