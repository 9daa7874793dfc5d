"""The web page's settings, input checks and handlers without a browser (the browser drives it in
test_serve_browser.py), the one-line refusals of `cvformers serve`, and the generator plug-in."""

from __future__ import annotations

import dataclasses

import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cvformers.cli import main
from cvformers.config import ConfigError
from cvformers.errors import UserError
from cvformers.serve import handlers
from cvformers.serve.config import EXAMPLE_PROMPTS, GENERATOR_KINDS, ServeConfig


@pytest.fixture(scope="module")
def models():
    return handlers.Models(ServeConfig())


@pytest.fixture(scope="module")
def small_models():
    """Low limits, so that the values a fuzzer finds valid draw quickly."""
    return handlers.Models(ServeConfig(max_images=2, max_candidates=4))


@pytest.fixture
def outputs(tmp_path):
    return handlers.Outputs(tmp_path / "grids", ServeConfig())


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from cvformers.data.shapes import parse_caption, render
    from cvformers.images import save_png

    return save_png(render(parse_caption("a large red circle")), tmp_path_factory.mktemp("up") / "red-circle.png")


def _free_port() -> int:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


SAMPLING = dict(seed=0, temperature=0.5, top_k=0, top_p=1.0, guidance=1.25)


def _draw(models, outputs, prompt="a small red circle above a large blue square", num=3, candidates=0, **changes):
    s = {**SAMPLING, **changes}
    return handlers.text_to_image(models, outputs, prompt, "default", num, candidates, s["seed"], s["temperature"],
                                  s["top_k"], s["top_p"], s["guidance"], changes.get("progress"))


def test_config_refuses_impossible_limits():
    ServeConfig()
    for bad in (dict(port=0), dict(port=70000), dict(max_images=0), dict(concurrency=True), dict(models=()),
                dict(max_candidates=4, max_images=8), dict(max_upload_mb=0), dict(classifiers=())):
        with pytest.raises(UserError):
            ServeConfig(**bad)


def test_example_prompts_use_the_shipped_words_and_held_out_pairs(models):
    """Every example is in the shipped model's vocabulary, and some pair a colour with a shape the
    model never saw together (what the page's example label promises)."""
    from cvformers.data.shapes import HELDOUT_PAIRS, parse_caption

    tokenizer = models.generator("default").tokenizer
    held_out = 0
    for prompt in EXAMPLE_PROMPTS:
        assert tokenizer.unknown_words(prompt) == [], prompt
        objects = parse_caption(prompt)["objects"]
        held_out += any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in objects)
    assert held_out >= 3


def test_text_to_image_gives_the_images_asked_for_and_a_grid_with_settings(models, outputs):
    steps = []
    drawn = _draw(models, outputs, num=3, progress=lambda d, t: steps.append((d, t)))
    assert len(drawn.images) == 3 and all(im.size == (128, 128) for im in drawn.images)
    assert steps[-1] == (64, 64) and len(steps) == 64  # one report per sampled id of the 8x8 grid
    with Image.open(drawn.grid) as grid:
        assert grid.text["prompt"] == "a small red circle above a large blue square"
        assert '"guidance": 1.25' in grid.text["cvformers"]
    reranked = _draw(models, outputs, num=2, candidates=8)
    assert len(reranked.images) == 2 and all(c.startswith(f"#{i + 1}  CLIP 0.") for i, c in enumerate(reranked.captions))
    scores = [float(c.split()[-1]) for c in reranked.captions]
    assert scores == sorted(scores, reverse=True)  # best first


def test_text_to_image_holds_requests_to_the_limits(models, outputs):
    cfg = models.cfg
    refusals = [
        (dict(prompt=""), "the prompt is empty"),
        (dict(prompt="a red circle " * 40), f"the limit is {cfg.max_prompt_chars}"),
        (dict(num=cfg.max_images + 1), "number of images must be between 1 and"),
        (dict(num=2.5), "whole number"),
        (dict(candidates=cfg.max_candidates + 1), "candidates must be between 0 and"),
        (dict(num=4, candidates=2), r"candidates \(2\) must be at least the number of images \(4\)"),
        (dict(seed=-1), "seed must be between"),
        (dict(top_p=0), "top_p must be in"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(prompt=None), "the prompt must be text"),
    ]
    for changes, message in refusals:
        with pytest.raises((UserError, ConfigError), match=message):
            _draw(models, outputs, **changes)
    with pytest.raises(UserError, match="unknown model"):
        handlers.text_to_image(models, outputs, "a red plus", "runs/elsewhere", 1, 0, 0, 1, 0, 1, 1)


def test_uploads_are_checked_for_type_size_and_content(tmp_path, picture):
    cfg = ServeConfig(max_upload_mb=0.001, max_image_side=64)
    assert handlers.check_upload(picture, cfg) == picture
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "big.png").write_bytes(b"0" * 2048)
    Image.new("RGB", (100, 10)).save(tmp_path / "wide.png")
    for name, message in (("notes.txt", "not an accepted image type"), ("broken.png", "not a readable image"),
                          ("big.png", "the limit is 0.001 MB"), ("wide.png", "100x10 pixels; the limit is 64"),
                          ("gone.png", "did not arrive")):
        with pytest.raises(UserError, match=message):
            handlers.check_upload(tmp_path / name, cfg)
    with pytest.raises(UserError, match="upload an image first"):
        handlers.check_upload(None, cfg)


def test_image_prompt_keeps_the_upload_rows(models, outputs, picture):
    drawn = handlers.image_prompt(models, outputs, picture, "a large red circle", "default", 8, 2, 0)
    assert len(drawn.images) == 2
    # all 8 rows kept: nothing is sampled, both images are the upload's own ids decoded
    assert drawn.images[0].tobytes() == drawn.images[1].tobytes()
    with pytest.raises(UserError, match="prompt rows must be between 0 and 8"):
        handlers.image_prompt(models, outputs, picture, "a large red circle", "default", 9, 2, 0)


def test_zero_shot_rows_are_probabilities_per_image(models, picture, tmp_path):
    from cvformers.data.shapes import parse_caption, render
    from cvformers.images import save_png

    square = save_png(render(parse_caption("a large green square")), tmp_path / "square.png")
    rows = handlers.zero_shot(models, [str(picture), str(square)], "circle, square, plus", "a picture of a {}")
    assert [r["label"] for r in rows] == ["circle", "square", "plus"] * 2
    for image in ("1: red-circle.png", "2: square.png"):
        assert sum(r["probability"] for r in rows if r["image"] == image) == pytest.approx(1, abs=1e-5)
    best = {r["image"]: r["label"] for r in sorted(rows, key=lambda r: r["probability"])}
    assert best == {"1: red-circle.png": "circle", "2: square.png": "square"}  # the shipped CLIP knows shapes
    for files, labels, templates, message in (([], "a,b", "{}", "at least one image"),
                                              ([picture], " , ", "{}", "label list is empty"),
                                              ([picture], "a,b", "  \n", "give a template"),
                                              ([picture], "a,b", "no slot", "has no '{}'"),
                                              ([picture], ",".join("x" * 40), "{}", "the limit is 32"),
                                              ([picture] * 9, "a,b", "{}", "the limit is 8")):
        with pytest.raises(UserError, match=message):
            handlers.zero_shot(models, files, labels, templates)


def test_attention_picture_for_an_upload(models, picture):
    image = handlers.attention(models, picture, "vit_nano_patch4_28")
    assert image.size[0] > 500
    with pytest.raises(UserError, match="unknown classifier"):
        handlers.attention(models, picture, "runs/other")


@dataclasses.dataclass(frozen=True)
class FakeSampling:
    candidates: int = 0
    seed: int | None = 0
    guidance: float = 1.0


class FakeGenerator:
    """Another generator with the face the page uses: load(path), .sampling (the settings it takes),
    generate(...) -> .images, .scores."""

    loaded: list = []
    sampling = FakeSampling()

    @classmethod
    def load(cls, path):
        cls.loaded.append(path)
        return cls()

    def generate(self, prompt, num_images, candidates=0, seed=None, progress=None, **sampling):
        from cvformers.pipelines.text_to_image import Generation

        assert set(sampling) == {"guidance"}  # only the settings its sampling config has
        progress(1, 1)
        return Generation(prompt, torch.full((num_images, 3, 4, 4), 0.5), torch.zeros(num_images, 2, 2),
                          torch.linspace(1, 0, num_images), {"sampling": sampling})


def test_a_new_generator_kind_plugs_in_by_one_entry(tmp_path, monkeypatch, outputs):
    run = tmp_path / "unclip-run"
    run.mkdir()
    (run / "config.toml").write_text('kind = "fake"\n')
    with pytest.raises(UserError, match="holds a 'fake' model; the text-to-image tab draws with: dalle"):
        handlers.Models(ServeConfig(models=(str(run),)))
    monkeypatch.setitem(GENERATOR_KINDS, "fake", (__name__, "FakeGenerator"))
    models = handlers.Models(ServeConfig(models=("default", str(run))))
    drawn = handlers.text_to_image(models, outputs, "a red plus", str(run), 3, 0, 1, 0.5, 0, 1, 1, lambda d, t: None)
    assert FakeGenerator.loaded == [str(run)] and len(drawn.images) == 3
    assert drawn.captions[0] == "#1  CLIP 1.000" and drawn.grid.is_file()


def test_cli_refuses_bad_settings_in_one_line(capsys, monkeypatch):
    for argv, message in ((["serve", "--port", "0"], "port must be in 1..65535"),
                          (["serve", "--port", "http"], "is not a port number")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the ui extra were not installed
    assert main(["serve", "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[ui]'" in err


def test_cli_refuses_a_port_in_use_before_loading_anything(capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"cvformers: error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port or --host\n"


def test_cli_refuses_a_model_that_does_not_draw(capsys):
    pytest.importorskip("gradio")
    for argv, message in ((["--model", "default/clip"], "holds a 'clip' model"),
                          (["--classifier", "no_such_run"], "neither a run folder nor a model preset"),
                          (["--clip", "no_such_clip"], "not found: no_such_clip")):
        assert main(["serve", "--port", str(_free_port()), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_build_app_offers_each_tab_as_an_endpoint_sharing_one_queue_slot():
    gr = pytest.importorskip("gradio")
    from cvformers.serve import build_app

    app = build_app(ServeConfig(concurrency=1))
    assert isinstance(app, gr.Blocks)
    public = {f.api_name: f for f in app.fns.values() if f.api_name in ("generate", "image_prompt", "zero_shot",
                                                                        "attention")}
    assert set(public) == {"generate", "image_prompt", "zero_shot", "attention"}
    assert {(f.concurrency_id, f.concurrency_limit) for f in public.values()} == {("cpu", 1)}


def test_on_page_turns_errors_into_messages_without_tracebacks():
    gr = pytest.importorskip("gradio")
    from cvformers.serve.app import _on_page

    def refuse():
        raise UserError("the prompt is empty")

    def crash():
        raise RuntimeError("secret internals")

    with pytest.raises(gr.Error, match="the prompt is empty"):
        _on_page(refuse)()
    with pytest.raises(gr.Error) as caught:
        _on_page(crash)()
    assert "secret internals" not in str(caught.value) and "RuntimeError" in str(caught.value)
    assert _on_page(lambda x: x + 1)(1) == 2


# whatever a script sends to an endpoint: numbers of any size and kind, text, nothing
_ANY = st.one_of(st.none(), st.booleans(), st.integers(-10**400, 10**400), st.integers(0, 6),
                 st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 3), st.text(max_size=8))
_VALID = (2, 0, 0, 0.5, 0, 1.0, 1.25)  # images, candidates, seed, temperature, top-k, top-p, guidance


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.one_of(st.none(), st.text(max_size=40), st.sampled_from(EXAMPLE_PROMPTS)),
       field=st.integers(0, len(_VALID) - 1), value=_ANY)
def test_any_form_value_gives_images_or_a_sentence(small_models, tmp_path, prompt, field, value):
    """Any value in any one field of the generate endpoint (the others valid) either draws or is
    refused with a UserError or ConfigError (the sentence the page shows), never another exception."""
    values = list(_VALID)
    values[field] = value
    outputs = handlers.Outputs(tmp_path / "grids", small_models.cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # words the model does not know
            drawn = handlers.text_to_image(small_models, outputs, prompt, "default", *values)
    except (UserError, ConfigError) as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert 1 <= len(drawn.images) <= small_models.cfg.max_images and drawn.grid.is_file()
