"""Sampling with the KV cache, CFG, image prompts, reranking, loading a run folder, the CLI."""

import shutil

import pytest
import torch
from PIL import Image

from cvformers.cli import main
from cvformers.config import save_toml, to_dict
from cvformers.errors import UserError
from cvformers.models.dalle import DALLE, DalleConfig
from cvformers.models.dalle_sampling import SamplingConfig, filter_logits, guided_logits, sample_codes, sample_from_logits
from cvformers.pipelines.text_to_image import TextToImage
from cvformers.text import BPETokenizer
from cvformers.loading import save_weights
from cvformers.vae.dvae import DiscreteVAE, DVAEConfig

CAPTIONS = ["a red circle", "a blue square", "a small green triangle", "a large red square above a circle"]



def write_run(path, kind, model):
    path.mkdir(parents=True, exist_ok=True)
    save_toml({"kind": kind, "model": to_dict(model.cfg)}, path / "config.toml")
    save_weights(model, path / "model.safetensors")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A complete (untrained) dalle run folder with the layout TextToImage.load reads."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("dalle_run")
    vae = DiscreteVAE(DVAEConfig(image_size=8, channels=3, vocab_size=16, n_hid=8, n_blk_per_group=1,
                                 group_count=2, n_init=8))
    tok = BPETokenizer.train(CAPTIONS * 4, vocab_size=270, text_len=12)
    cfg = DalleConfig(num_text_tokens=tok.num_text_tokens, text_len=12, num_image_tokens=16, grid_size=4,
                      dim=32, depth=2, heads=2, dim_head=16, conv_kernel=3, attention=["column", "conv"])
    write_run(root, "dalle", DALLE(cfg))
    write_run(root / "vae", "dvae", vae)
    tok.save(root / "tokenizer.json")
    return root


@pytest.fixture(scope="module")
def pipe(run):
    return TextToImage.load(run)


def test_generate_returns_images(pipe):
    images = pipe("a red circle", num_images=3, seed=0)
    assert len(images) == 3 and all(isinstance(im, Image.Image) and im.size == (8, 8) for im in images)


def test_seed_reproducible(pipe):
    a = pipe.generate("a blue square", num_images=4, seed=1).codes
    b = pipe.generate("a blue square", num_images=4, seed=1).codes
    c = pipe.generate("a blue square", num_images=4, seed=2).codes
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kv_cache_sampling_equals_recomputing_the_prefix(pipe):
    """Greedy decoding with and without the cache picks the same ids: the cached step sees
    exactly the tokens its attention pattern allows."""
    a = pipe.generate("a small green triangle", num_images=2, temperature=0, use_cache=True).codes
    b = pipe.generate("a small green triangle", num_images=2, temperature=0, use_cache=False).codes
    assert torch.equal(a, b)


@pytest.mark.parametrize("prompt_rows", [0, 1])
def test_noise_drawn_a_row_ahead_gives_the_ids_of_one_draw_per_step(pipe, prompt_rows):
    """sample_codes draws each grid row's Gumbel noise at once: the same ids as a plain loop that
    calls sample_from_logits (one draw of the generator) at every step, from the same seed."""
    model, G = pipe.model, pipe.model.cfg.grid_size
    text = pipe.encode_prompt("a red circle").expand(3, -1)
    prompt = torch.randint(0, model.cfg.num_image_tokens, (3, prompt_rows * G)) if prompt_rows else None
    got = sample_codes(model, text, SamplingConfig(top_k=8), prompt_codes=prompt, generator=torch.Generator().manual_seed(7))
    g, T, start = torch.Generator().manual_seed(7), model.cfg.text_len, prompt_rows * G
    want = torch.zeros(3, G * G, dtype=torch.long)
    if prompt is not None:
        want[:, :start] = prompt
    with torch.no_grad():
        caches = model.new_caches(3)
        logits = model.prefill(text, caches, want[:, :start] if start else None)
        for i in range(start, G * G):
            want[:, i] = sample_from_logits(logits, 1.0, top_k=8, generator=g)
            if i + 1 < G * G:
                logits = model.decode_step(want[:, i], T + i, caches)
    assert torch.equal(got.flatten(1), want)


def test_guidance_scale_one_is_plain_conditional(pipe):
    a = pipe.generate("a red circle", num_images=3, seed=5, guidance=1.0).codes
    b = pipe.generate("a red circle", num_images=3, seed=5).codes
    assert torch.equal(a, b)
    cond, uncond = torch.randn(2, 4, 16).unbind(0)
    assert torch.equal(guided_logits(cond, uncond, 1.0), cond)
    # the batched forward: conditional rows of the [cond | uncond] batch equal a cond-only batch
    model = pipe.model
    text = pipe.encode_prompt("a red circle").expand(2, -1)
    both = torch.cat([text, model.unconditional_text(2)])
    got = model.prefill(both, model.new_caches(4))[:2]
    want = model.prefill(text, model.new_caches(2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_guided_sampling_runs_and_differs(pipe):
    a = pipe.generate("a red circle", num_images=2, seed=3, guidance=3.0).codes
    b = pipe.generate("a red circle", num_images=2, seed=3).codes
    assert a.shape == b.shape == (2, 4, 4)


def test_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert filter_logits(logits, top_k=2).isinf().tolist() == [[True, False, False, True]]
    assert filter_logits(logits, top_p=0.01).isinf().tolist() == [[True, False, True, True]]
    g = torch.Generator().manual_seed(0)
    assert all(sample_from_logits(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(5))
    assert sample_from_logits(logits, 0.0).item() == 1


def test_sampling_draws_from_the_softmax_of_the_filtered_logits():
    """Gumbel-max sampling: frequencies match softmax(logits / T) over the kept ids, never a filtered id."""
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0]).expand(40_000, 5)
    g = torch.Generator().manual_seed(0)
    ids = sample_from_logits(logits, 0.8, top_k=3, generator=g)
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    expected = torch.tensor([1.0, 3.0, 2.0, -float("inf"), -float("inf")]).div(0.8).softmax(-1)
    assert freq[3:].sum() == 0
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_progress_counts_every_step_of_every_batch(run):
    """progress(done, total) climbs by one per sampled id across batches and ends at total; an
    image prompt's fixed rows are not steps. The callback does not change the images."""
    pipe = TextToImage.load(run)
    pipe.batch_size = 2  # 5 candidates: batches of 2, 2 and 1
    calls = []
    out = pipe.generate("a red circle", num_images=5, seed=3, progress=lambda d, t: calls.append((d, t)))
    steps = 16  # a 4x4 grid of ids per batch
    assert calls == [(d, 3 * steps) for d in range(1, 3 * steps + 1)]
    assert torch.equal(out.codes, pipe.generate("a red circle", num_images=5, seed=3).codes)
    calls.clear()
    pipe.generate("a red circle", num_images=1, image_prompt=torch.rand(3, 8, 8), prompt_rows=3,
                  progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_image_prompt_keeps_the_top_rows(pipe):
    image = torch.rand(3, 8, 8)
    prompt_ids = pipe.vae.encode(image[None])
    out = pipe.generate("a red circle", num_images=2, image_prompt=image, prompt_rows=2)
    assert torch.equal(out.codes[:, :2], prompt_ids[:, :2].expand(2, -1, -1))
    full = sample_codes(pipe.model, pipe.encode_prompt("x").expand(1, -1), prompt_codes=prompt_ids.flatten(1))
    assert not full.is_inference()  # sampled under inference mode, handed back as a normal tensor
    assert torch.equal(full, prompt_ids)  # every row given: nothing to sample


class BrightnessReranker:
    def score(self, images, texts):
        return images.mean(dim=(1, 2, 3))


def test_reranker_keeps_the_best(run):
    pipe = TextToImage.load(run, reranker=BrightnessReranker())
    out = pipe.generate("a red circle", num_images=2, candidates=6, seed=0)
    assert len(out.images) == 2 and out.scores.shape == (2,)
    assert out.scores[0] >= out.scores[1]
    all6 = pipe.generate("a red circle", num_images=6, seed=0)
    assert torch.allclose(out.scores, all6.scores[:2])
    images, scores = pipe("a red circle", num_images=2, candidates=4, return_scores=True)
    assert len(images) == 2 and len(scores) == 2


def test_bad_input(pipe, run, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="empty"):
        pipe("   ")
    with pytest.raises(UserError, match="at least 1"):
        pipe("a red circle", num_images=0)
    with pytest.raises(UserError, match="reranker"):
        pipe("a red circle", num_images=2, candidates=4)
    with pytest.raises(UserError, match="unknown model"):
        TextToImage.load("no-such-model")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "vae" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="vae/model.safetensors is missing"):
        TextToImage.load(broken)
    pads = torch.arange(pipe.tokenizer.vocab_size, pipe.tokenizer.num_text_tokens)[None]
    monkeypatch.setattr(pipe.tokenizer, "encode", lambda text: pads)
    with pytest.raises(UserError, match="padding"):
        pipe("\u200b")


def test_grid_png_has_the_prompt(pipe, tmp_path):
    out = pipe.generate("a blue square", num_images=4, seed=0)
    path = out.save_grid(tmp_path / "grid.png")
    assert Image.open(path).text["prompt"] == "a blue square"


def test_cli_generate(run, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert main(["generate", "a red circle", "--model", str(run), "--num", "2", "--out", str(out),
                 "--top-k", "4", "--guidance", "2"]) == 0
    assert Image.open(out).text["prompt"] == "a red circle"
    assert main(["generate", "", "--model", str(run), "--out", str(out)]) == 2
    assert main(["generate", "a red circle", "--model", str(run), "--num", "0", "--out", str(out)]) == 2
    assert main(["generate", "a red circle", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("cvformers: error:") == 3


def test_bundle_clip_folder_reranks_and_scores_land_beside_the_grid(run, tmp_path):
    """A dalle folder with a clip/ run inside reranks by itself (the shipped default does)."""
    import json

    from cvformers.models.clip import CLIP, clip_config
    from cvformers.pipelines.rerank import ClipReranker

    bundle = tmp_path / "bundle"
    shutil.copytree(run, bundle)
    tok = BPETokenizer.load(run / "tokenizer.json")
    torch.manual_seed(0)
    clip = CLIP(clip_config("tiny", image_size=8, patch_size=4, context_length=12, vocab_size=tok.num_text_tokens,
                            real_vocab_size=tok.vocab_size, embed_dim=16, vision_width=32, text_width=32))
    write_run(bundle / "clip", "clip", clip)
    tok.save(bundle / "clip" / "tokenizer.json")

    pipe = TextToImage.load(bundle)
    assert isinstance(pipe.reranker, ClipReranker)
    out = pipe.generate("a red circle", num_images=2, candidates=5, seed=0)
    all5 = pipe.generate("a red circle", num_images=5, seed=0)
    assert torch.allclose(out.scores, all5.scores.sort(descending=True).values[:2], atol=1e-6)
    grid = out.save_grid(tmp_path / "g.png")
    sidecar = json.loads((tmp_path / "g.scores.json").read_text())
    assert sidecar["clip_scores"] == pytest.approx(out.scores.tolist(), abs=1e-5)
    assert json.loads(Image.open(grid).text["clip_scores"]) == pytest.approx(out.scores.tolist(), abs=1e-5)


def test_bundle_export_loads_and_samples_the_same(run, tmp_path):
    from cvformers.pipelines.bundle import export_bundle

    exact = export_bundle(run, tmp_path / "b32", half=False)
    half = export_bundle(run, tmp_path / "b16")
    assert not (exact / "trainer_state.pt").exists()
    ref = TextToImage.load(run).generate("a red circle", num_images=2, seed=3, temperature=0)
    same = TextToImage.load(exact).generate("a red circle", num_images=2, seed=3, temperature=0)
    assert torch.equal(ref.codes, same.codes) and torch.equal(ref.images, same.images)
    small = TextToImage.load(half)
    assert next(small.model.parameters()).dtype == torch.float32  # fp16 on disk, fp32 in memory
    assert (half / "model.safetensors").stat().st_size < 0.6 * (exact / "model.safetensors").stat().st_size
    assert main(["bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_bundle_never_deletes_what_it_did_not_write(run, tmp_path, capsys):
    """--out equal to, above or inside an input, or a folder that is not a bundle, is refused
    before anything is written; a bad --clip leaves the previous bundle whole."""
    runs = tmp_path / "runs"
    dalle = runs / "dalle"
    shutil.copytree(run, dalle)
    (runs / "other").mkdir()
    (runs / "other" / "notes.txt").write_text("keep me")
    before = _tree(runs)
    for out in (dalle, runs, dalle / "inside", tmp_path):
        assert main(["bundle", str(dalle), "--out", str(out)]) == 2
        assert "overlaps the input" in capsys.readouterr().err
    assert main(["bundle", str(dalle), "--out", str(runs / "other")]) == 2
    assert "is not a bundle" in capsys.readouterr().err
    assert _tree(runs) == before

    bundle = tmp_path / "out" / "bundle"
    assert main(["bundle", str(dalle), "--out", str(bundle)]) == 0
    first = _tree(bundle)
    bad_clip = tmp_path / "badclip"
    bad_clip.mkdir()
    (bad_clip / "config.toml").write_text('kind = "clip"\n')
    assert main(["bundle", str(dalle), "--clip", str(bad_clip), "--out", str(bundle)]) == 2
    assert "model.safetensors is missing" in capsys.readouterr().err
    assert _tree(bundle) == first  # untouched
    assert main(["bundle", str(dalle), "--out", str(bundle), "--fp32"]) == 0  # a bundle is replaced whole
    assert _tree(bundle) != first and sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]
    assert _tree(runs) == before
