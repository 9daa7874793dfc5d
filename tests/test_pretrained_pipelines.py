"""diffusers' face of both generators: from_pretrained, pipe(prompts, generator=…).images, to, save_pretrained."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cvformers.config import ConfigError
from cvformers.errors import UserError
from cvformers.pipelines.bundle import LAST_EVAL_KEY, export_bundle
from cvformers.pipelines.pretrained import ImagePipelineOutput
from cvformers.pipelines.text_to_image import TextToImage
from cvformers.pipelines.unclip import UnCLIP

FAST_UNCLIP = {"steps": 2, "prior_steps": 2}  # enough to exercise every stage in well under a second


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


@pytest.fixture(scope="module")
def dalle():
    torch.set_num_threads(1)
    return TextToImage.from_pretrained("default")


@pytest.fixture(scope="module")
def unclip():
    return UnCLIP.from_pretrained("unclip")


def test_dalle_call_gives_pil_images_deterministic_per_generator(dalle):
    out = dalle("a red circle", generator=seeded(0))
    assert isinstance(out, ImagePipelineOutput) and len(out.images) == 1
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (32, 32)
    again = dalle("a red circle", generator=seeded(0))
    assert np.array_equal(pixels(out.images), pixels(again.images))
    other = dalle("a red circle", num_images_per_prompt=2, generator=seeded(1))
    assert not np.array_equal(pixels(out.images), pixels(other.images[:1]))
    assert out.scores.shape == (1,) and out.prompts == ["a red circle"]


def test_a_list_of_prompts_gives_every_image_in_prompt_order(dalle):
    prompts = ["a red circle", "a large blue square"]
    out = dalle(prompts, num_images_per_prompt=2, generator=seeded(0))
    assert len(out.images) == 4 and out.scores.shape == (4,)
    assert out.prompts == [prompts[0]] * 2 + [prompts[1]] * 2
    # one generator draws prompt after prompt: the first prompt's images are those it draws alone
    first = dalle(prompts[0], num_images_per_prompt=2, generator=seeded(0))
    assert np.array_equal(pixels(out.images[:2]), pixels(first.images))
    # the output is also the list of its images, and the earlier keyword still counts images
    assert len(dalle("a red circle", num_images=2, seed=0)) == 2 and out[0] is out.images[0]


def test_to_returns_the_pipeline(dalle, unclip):
    assert dalle.to("cpu") is dalle and unclip.to(torch.device("cpu")) is unclip


def test_dalle_save_pretrained_round_trip_and_model_card(dalle, tmp_path):
    saved = dalle.save_pretrained(tmp_path / "bundle")
    loaded = TextToImage.from_pretrained(saved)
    a = dalle(["a red circle", "a small green triangle"], num_images_per_prompt=2, generator=seeded(3))
    b = loaded(["a red circle", "a small green triangle"], num_images_per_prompt=2, generator=seeded(3))
    assert np.array_equal(pixels(a.images), pixels(b.images)) and torch.equal(a.scores, b.scores)
    assert loaded.sampling == dalle.sampling
    card = (saved / "README.md").read_text()
    # the card's figures are the bundle's own: data and steps from each part's config.toml
    assert "| (root) | dalle |" in card and "| shapes, 32 px | 2000 |" in card and "| 3000 |" in card
    assert "docs/results.md" in card and "none stored" in card
    # saving again over the bundle it wrote is allowed, and gives the same weights
    again = loaded.save_pretrained(saved)
    assert (again / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()


def test_save_pretrained_keeps_the_training_log_figure(tmp_path):
    """A run folder's last logged evaluation reaches the card and survives a second save."""
    import shutil

    from cvformers.loading import default_bundle

    run = tmp_path / "run"
    shutil.copytree(default_bundle("default"), run)
    lines = [{"step": 100, "split": "train", "loss": 9.0}, {"step": 500, "split": "eval", "loss": 3.25},
             {"step": 600, "split": "train", "loss": 8.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    first = TextToImage.from_pretrained(run).save_pretrained(tmp_path / "b1")
    second = TextToImage.from_pretrained(first).save_pretrained(tmp_path / "b2")
    exported = export_bundle(run, tmp_path / "b3")  # `cvformers bundle` carries it too
    third = TextToImage.from_pretrained(exported).save_pretrained(tmp_path / "b4")
    for bundle in (first, second, third):
        assert "| step 500: loss 3.25 |" in (bundle / "README.md").read_text()
    from safetensors import safe_open

    with safe_open(str(second / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[LAST_EVAL_KEY])["loss"] == 3.25


def test_save_pretrained_never_replaces_what_it_did_not_write(dalle, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.txt").write_text("mine")
    with pytest.raises(UserError, match="not a bundle"):
        dalle.save_pretrained(out)
    assert [p.name for p in out.iterdir()] == ["thesis.txt"]


def test_unclip_call_round_trip(unclip, tmp_path):
    prompts = ["a red triangle above a blue circle", "a green square"]
    out = unclip(prompts, num_images_per_prompt=2, generator=seeded(0), **FAST_UNCLIP)
    assert len(out.images) == 4 and out.images[0].size == (32, 32) and out.scores.shape == (4,)
    again = unclip(prompts, num_images_per_prompt=2, generator=seeded(0), **FAST_UNCLIP)
    assert np.array_equal(pixels(out.images), pixels(again.images))
    saved = unclip.save_pretrained(tmp_path / "u")
    assert UnCLIP.from_pretrained(saved).sampling == unclip.sampling
    loaded = UnCLIP.from_pretrained(saved)
    same = loaded(prompts, num_images_per_prompt=2, generator=seeded(0), **FAST_UNCLIP)
    assert np.array_equal(pixels(out.images), pixels(same.images))
    card = (saved / "README.md").read_text()
    assert "| prior | unclip_prior |" in card and "| decoder | unclip_latent_decoder |" in card and "| 12000 |" in card


def test_diffusers_setting_names(dalle, unclip):
    a = unclip("a green square", generator=seeded(0), num_inference_steps=2, guidance_scale=2.0, prior_steps=2)
    b = unclip("a green square", generator=seeded(0), steps=2, guidance=2.0, prior_steps=2)
    c = unclip("a green square", generator=seeded(0), steps=2, guidance=4.0, prior_steps=2)
    assert np.array_equal(pixels(a.images), pixels(b.images)) and not np.array_equal(pixels(a.images), pixels(c.images))
    d = dalle("a red circle", generator=seeded(0), guidance_scale=2.0)
    e = dalle("a red circle", generator=seeded(0), guidance=2.0)
    assert np.array_equal(pixels(d.images), pixels(e.images))
    with pytest.raises(UserError, match="not both"):
        dalle("a red circle", guidance_scale=2.0, guidance=3.0)
    with pytest.raises(ConfigError, match="num_inference_steps"):  # DALL-E draws one id per step: no such setting
        dalle("a red circle", num_inference_steps=10)


def test_bad_calls_are_one_line_user_errors(dalle, unclip):
    for pipe in (dalle, unclip):
        with pytest.raises(UserError, match="prompt list is empty"):
            pipe([])
        with pytest.raises(UserError, match="not both"):
            pipe("a red circle", num_images_per_prompt=2, num_images=2)
        with pytest.raises(UserError, match="empty"):
            pipe(["a red circle", "  "], generator=seeded(0), **(FAST_UNCLIP if pipe is unclip else {}))
        with pytest.raises(UserError, match="string or a list"):
            pipe(None)
