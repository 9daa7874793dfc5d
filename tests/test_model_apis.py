"""timm's create_model / list_models / reset_classifier and open_clip's create_model_and_transforms /
get_tokenizer, on cvformers' models; Swin weights of the layout before timm's still load."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cvformers
from cvformers.config import save_toml, to_dict
from cvformers.errors import UserError
from cvformers.loading import load_run, read_weights, save_weights
from cvformers.models.swin import SwinConfig, SwinTransformer
from cvformers.models.vision import PRESETS, ImageClassifier, build_backbone, classifier_config

torch.set_num_threads(1)
OLD_SWIN_RUN = Path(__file__).parent / "data" / "swin_classifier_old_layout"

TINY = {  # one small config per family (a preset name each, for create_model)
    "vit_nano_patch4_28": dict(embed_dim=32, depth=1, num_heads=2),
    "mixer_nano_patch4_28": dict(embed_dim=32, depth=1, tokens_mlp_dim=16, channels_mlp_dim=32),
    "convmixer_256_8_ks3_p4_28": dict(dim=32, depth=1),
    "swin_pico_patch2_window7_28": dict(embed_dim=16, depths=(2, 1), num_heads=(2, 2)),
    "mixer_attention_pico_patch4_28": dict(embed_dim=32, depth=2, mixer_depth=1, num_heads=2, tokens_mlp_dim=16,
                                           channels_mlp_dim=32),
    "convmixer_mixer_256_8_ks3_p4_28": dict(dim=32, depth=2, conv_depth=1, tokens_mlp_dim=16, channels_mlp_dim=32),
}
IMAGES = torch.rand(2, 1, 28, 28)


# --- timm ------------------------------------------------------------------------------------

def test_list_models_filters_like_timm():
    vits = cvformers.list_models("vit_*")
    assert vits == sorted(n for n in PRESETS if n.startswith("vit_")) and len(vits) >= 5
    assert cvformers.list_models() == sorted(PRESETS)
    small = cvformers.list_models(["vit_*", "swin_*"], exclude_filters="*_224")
    assert small and all(n.startswith(("vit_", "swin_")) and not n.endswith("_224") for n in small)
    assert cvformers.list_models("resnet*") == [] and cvformers.list_models(pretrained=True) == []


def test_unknown_name_and_pretrained_are_one_line_user_errors():
    with pytest.raises(UserError, match="did you mean .*vit_tiny_patch4_28") as e:
        cvformers.create_model("vit_tiny_patch4_2")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no pretrained weights"):
        cvformers.create_model("vit_nano_patch4_28", pretrained=True)


@pytest.mark.parametrize("name", list(TINY))
def test_reset_classifier_on_every_backbone(name):
    model = cvformers.create_model(name, num_classes=3, **TINY[name]).eval()
    assert model(IMAGES).shape == (2, 3) and model.get_classifier().out_features == 3
    features = model.forward_features(IMAGES)
    model.reset_classifier(5)
    assert model(IMAGES).shape == (2, 5) and model.cfg.num_classes == 5
    assert model.get_classifier() is model.get_submodule(model.classifier_name)
    assert torch.equal(model.forward_features(IMAGES), features)  # the trunk is untouched
    model.reset_classifier(0)
    assert model(IMAGES).shape == (2, model.num_features) and isinstance(model.get_classifier(), torch.nn.Identity)
    # the reset model's config rebuilds the same architecture: its weights load strictly
    build_backbone(PRESETS[name][0], model.cfg).load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(UserError, match="num_classes"):
        model.reset_classifier(-1)


def test_swin_head_is_timms_head_fc():
    model = cvformers.create_model("swin_pico_patch2_window7_28", **TINY["swin_pico_patch2_window7_28"])
    keys = set(model.state_dict())
    assert {"head.fc.weight", "patch_embed.proj.weight", "patch_embed.norm.weight",
            "layers.1.downsample.reduction.weight"} <= keys
    assert not any(k.startswith("layers.0.downsample") for k in keys)


def test_checkpoint_path_safetensors(tmp_path):
    name, sizes = "vit_nano_patch4_28", TINY["vit_nano_patch4_28"]
    source = cvformers.create_model(name, num_classes=4, **sizes).eval()
    save_weights(source, tmp_path / "w.safetensors")
    loaded = cvformers.create_model(name, checkpoint_path=tmp_path / "w.safetensors", num_classes=4, **sizes).eval()
    assert torch.equal(loaded(IMAGES), source(IMAGES))
    # another number of classes: the trunk loads, the head starts new
    fresh = cvformers.create_model(name, checkpoint_path=tmp_path / "w.safetensors", num_classes=6, **sizes).eval()
    assert torch.equal(fresh.forward_features(IMAGES), source.forward_features(IMAGES))
    assert fresh(IMAGES).shape == (2, 6)
    # the head size is not guessed: without num_classes the preset's 10 does not fit
    with pytest.raises(UserError, match="pass num_classes"):
        cvformers.create_model(name, checkpoint_path=tmp_path / "w.safetensors", **sizes)
    with pytest.raises(UserError, match="do not fit this architecture") as e:
        cvformers.create_model(name, checkpoint_path=tmp_path / "w.safetensors", num_classes=4, embed_dim=48,
                               depth=1, num_heads=2)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="do not fit this architecture"):
        cvformers.create_model("mixer_nano_patch4_28", checkpoint_path=tmp_path / "w.safetensors", num_classes=4)


def _classifier_run(path, preset, **backbone):
    cfg = classifier_config(preset, **backbone)
    model = ImageClassifier(cfg).eval()
    path.mkdir()
    save_toml({"kind": "classifier", "model": to_dict(cfg)}, path / "config.toml")
    save_weights(model, path / "model.safetensors")
    return model


def test_checkpoint_path_run_folder(tmp_path):
    name, sizes = "swin_pico_patch2_window7_28", TINY["swin_pico_patch2_window7_28"]
    run_model = _classifier_run(tmp_path / "run", name, **sizes)
    model = cvformers.create_model(name, checkpoint_path=tmp_path / "run", **sizes).eval()
    x = (IMAGES - 0.5) / 0.5  # what the classifier feeds its backbone
    assert torch.equal(model(x), run_model.backbone(x))
    with pytest.raises(UserError, match=r"embed_dim 16 there, 48 here") as e:
        cvformers.create_model(name, checkpoint_path=tmp_path / "run", **{**sizes, "embed_dim": 48})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="its backbone is a swin, this model's a vit"):
        cvformers.create_model("vit_nano_patch4_28", checkpoint_path=tmp_path / "run")
    with pytest.raises(UserError, match="not a run folder|weights file not found"):
        cvformers.create_model(name, checkpoint_path=tmp_path / "nothing")


def test_swin_weights_of_the_layout_before_timms_still_load():
    """tests/data/swin_classifier_old_layout was written by cvformers' Swin with the patch merging at the
    end of each stage (and bare patch_embed / patch_norm / head layers), with the logits that model gave."""
    expected, _ = read_weights(OLD_SWIN_RUN / "expected.safetensors")
    model, _ = load_run(OLD_SWIN_RUN)  # through the shape check and strict load of the run loader
    with torch.no_grad():
        torch.testing.assert_close(model(expected["images"]), expected["logits"], rtol=0, atol=1e-6)
    # and by a plain load_state_dict of the old keys into a bare Swin
    state, _ = read_weights(OLD_SWIN_RUN / "model.safetensors")
    old = {k[len("backbone."):]: v for k, v in state.items()}
    assert "layers.0.downsample.reduction.weight" in old and "head.weight" in old
    swin = SwinTransformer(model.backbone.cfg).eval()
    swin.load_state_dict(old, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(swin((expected["images"] - 0.5) / 0.5), expected["logits"], rtol=0, atol=1e-6)
    assert isinstance(swin.cfg, SwinConfig)


# --- open_clip -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_parts():
    return cvformers.create_model_and_transforms("default/clip")


def _picture(path):
    """A non-square picture with structure (a red disc on a gradient), so crops and resizes matter."""
    y, x = np.mgrid[0:45, 0:60]
    rgb = np.stack([x * 4, y * 5, np.full_like(x, 90)], -1).astype(np.uint8)
    rgb[(x - 25) ** 2 + (y - 20) ** 2 < 120] = (230, 20, 20)
    Image.fromarray(rgb).save(path)
    return path


def test_preprocess_embeds_as_the_zero_shot_path(clip_parts, tmp_path):
    from cvformers.pipelines.zero_shot import ZeroShotClassifier

    model, _, preprocess = clip_parts
    tokenizer = cvformers.get_tokenizer("default/clip")
    path = _picture(tmp_path / "disc.png")
    image = preprocess(Image.open(path))
    assert image.shape == (3, model.cfg.image_size, model.cfg.image_size) and 0 <= image.min() <= image.max() <= 1
    clf = ZeroShotClassifier(model, tokenizer, ["red circle", "blue square", "green triangle"])
    with torch.no_grad():
        ours = model.scale() * model.encode_image(image[None], normalize=True) @ clf.class_embeddings.t()
    torch.testing.assert_close(ours, clf.logits([path]), rtol=0, atol=1e-6)


def test_preprocess_train_crops_at_random(clip_parts, tmp_path):
    from cvformers.pipelines.clip_factory import ClipImageTransform

    model, preprocess_train, preprocess = clip_parts
    picture = Image.open(_picture(tmp_path / "disc.png"))
    draws = [preprocess_train(picture) for _ in range(4)]
    assert all(d.shape == preprocess(picture).shape for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    seeded = [ClipImageTransform(32, train=True, seed=5)(picture) for _ in range(2)]
    assert torch.equal(*seeded)
    transform = ClipImageTransform(32, train=True, seed=0)
    for _ in range(50):  # inside the picture, 90-100% of its area (up to rounding), ratio in [3/4, 4/3]
        left, top, right, bottom = transform.crop_box(60, 45)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 60 and 0 <= top < bottom <= 45
        assert 0.87 <= w * h / (60 * 45) <= 1.0 and 0.7 <= w / h <= 1.4


def test_get_tokenizer_reads_the_clip_runs_tokenizer(clip_parts):
    from cvformers.loading import load_clip

    _, reference = load_clip("default/clip")
    tokenizer = cvformers.get_tokenizer("default/clip")
    texts = ["a red circle", "a large blue square above a small green triangle"]
    assert torch.equal(tokenizer(texts), reference.encode(texts))
    assert torch.equal(tokenizer("a red circle"), reference.encode(["a red circle"]))
    assert tokenizer.words() == reference.words()  # the wrapped tokenizer's methods stay reachable
    with pytest.raises(UserError, match="not a CLIP"):
        cvformers.get_tokenizer("default/vae")
    with pytest.raises(UserError, match="not a CLIP"):
        cvformers.create_model_and_transforms("default/vae")


def test_an_ema_saved_in_the_old_swin_layout_resumes_under_the_new_keys():
    from safetensors.torch import load_file

    from cvformers.loading import load_run
    from cvformers.train.hooks import EMA, EMAConfig

    model = load_run(OLD_SWIN_RUN)[0]
    old = load_file(str(OLD_SWIN_RUN / "model.safetensors"))  # keys of the earlier layout
    ema = EMA(EMAConfig(decay=0.9))
    ema.load_state_dict({**{f"shadow.{k}": v for k, v in old.items() if v.is_floating_point()},
                         "updates": torch.tensor(3)})
    assert set(ema.shadow) != {k for k, v in model.state_dict().items() if v.is_floating_point()}
    ema.on_fit_start(model)
    tracked = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    assert set(ema.shadow) == set(tracked) and ema.updates == 3
    for key, value in tracked.items():
        torch.testing.assert_close(ema.shadow[key], value.float())
    ema.after_step(model, 1)  # and it goes on averaging
