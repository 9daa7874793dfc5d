"""Attention pictures: rollout is a row-stochastic product, maps come from the explicit path,
and the figures (ViT maps, Mixer token-mixing units) are written from a run or a preset."""

import pytest
import torch

from cvformers.errors import UserError
from cvformers.models.vision import ImageClassifier, classifier_config
from cvformers.pipelines.attention import (
    attention_figure,
    attention_picture,
    attention_rollout,
    mixer_token_mixing_figure,
    patch_attention,
    vit_attention,
    vit_attention_figure,
)

torch.set_num_threads(1)


def _random_maps(layers=3, heads=2, tokens=5):
    torch.manual_seed(0)
    return [torch.randn(heads, tokens, tokens).softmax(-1) for _ in range(layers)]


def test_rollout_rows_sum_to_one():
    rollout = attention_rollout(_random_maps())
    torch.testing.assert_close(rollout.sum(-1), torch.ones(5))
    assert (rollout >= 0).all()


def test_rollout_matches_hand_computation():
    maps = _random_maps(layers=2)
    eye = torch.eye(5)
    a1, a2 = (0.5 * m.mean(0) + 0.5 * eye for m in maps)  # rows already sum to 1
    torch.testing.assert_close(attention_rollout(maps), a2 @ a1)
    # identity attention (every token looks at itself) flows nowhere
    torch.testing.assert_close(attention_rollout([torch.eye(5)[None]] * 3), eye)
    # without the residual term: the plain product of head-averaged maps
    torch.testing.assert_close(attention_rollout(maps, residual=False), maps[1].mean(0) @ maps[0].mean(0))


def test_vit_attention_maps_shapes_and_query_selection():
    clf = ImageClassifier(classifier_config("vit_nano_patch4_28"))
    maps = vit_attention(clf.backbone, torch.rand(1, 28, 28))
    assert len(maps) == 6 and maps[0].shape == (4, 50, 50)
    torch.testing.assert_close(maps[2].sum(-1), torch.ones(4, 50))
    per = patch_attention(maps, 1 + 3 * 7 + 2, (7, 7))  # query patch (3, 2)
    assert per.shape == (6, 4, 7, 7)
    torch.testing.assert_close(per[1, 0].flatten(), maps[1][0, 24, 1:])


def test_figures_are_written(tmp_path):
    clf = ImageClassifier(classifier_config("vit_nano_patch4_28")).eval()
    with torch.no_grad():
        fig = vit_attention_figure(clf, torch.rand(1, 28, 28), query=(0, 6))
    path = fig.save(tmp_path / "vit.png")
    from PIL import Image

    w, h = Image.open(path).size
    assert w > 500 and h > 500
    with pytest.raises(UserError, match="outside the 7x7"):
        vit_attention_figure(clf, torch.rand(1, 28, 28), query=(7, 0))
    mixer = ImageClassifier(classifier_config("mixer_nano_patch4_28")).backbone
    assert mixer.token_mixing_weights(0).shape == (64, 7, 7)
    mixer_token_mixing_figure(mixer, blocks=[0, 7], units=4).save(tmp_path / "mixer.png")
    with pytest.raises(UserError, match="blocks 0..7"):
        mixer_token_mixing_figure(mixer, blocks=[8])


def test_attention_figure_from_preset_and_image_file(tmp_path):
    from cvformers.images import save_png

    image = save_png(torch.rand(3, 40, 40), tmp_path / "x.png")  # wrong size and channels: resized
    out = attention_figure("vit_nano_patch4_28", image, tmp_path / "attn.png")
    assert out.is_file()
    with pytest.raises(UserError, match="attention pictures exist for vit and mixer"):
        attention_figure("convmixer_256_8_28", image, tmp_path / "c.png")
    with pytest.raises(UserError, match="neither a run folder nor a model preset"):
        attention_figure("no_such_model", image, tmp_path / "c.png")


def test_attention_picture_in_memory_matches_the_written_figure(tmp_path):
    """The in-memory picture (what a web page shows) is the figure the command writes, pixel for
    pixel; a PIL image is taken like a file; a Mixer needs no image, a ViT does."""
    from PIL import Image

    from cvformers.images import save_png

    torch.manual_seed(0)
    clf = ImageClassifier(classifier_config("vit_nano_patch4_28")).eval()
    path = save_png(torch.rand(3, 28, 28), tmp_path / "x.png")
    shown = attention_picture(clf, Image.open(path)).render()
    attention_picture(clf, path).save(tmp_path / "attn.png")
    assert shown.tobytes() == Image.open(tmp_path / "attn.png").convert("RGB").tobytes()
    assert shown.size[0] > 500
    mixer = ImageClassifier(classifier_config("mixer_nano_patch4_28")).eval()
    assert attention_picture(mixer, units=4).render().size[0] > 100
    with pytest.raises(UserError, match="need an image"):
        attention_picture(clf, None)
