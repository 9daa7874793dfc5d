"""DALL-E 2 (unCLIP): the prior, the decoder, the upsampler, their tasks, the bundle, the pipeline and the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from cvformers.config import ConfigError, from_dict
from cvformers.diffusion.decoder import (DecoderConfig, LatentDecoder, LatentDecoderConfig, UnCLIPDecoder, Upsampler,
                                         UpsamplerConfig, gaussian_blur)
from cvformers.diffusion.prior import DiffusionPrior, PriorConfig, clip_space
from cvformers.diffusion.samplers import DiffusionSamplingConfig
from cvformers.errors import UserError

TINY_UNET = {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [8], "heads": 2, "dropout": 0.0}


def tiny_decoder(**overrides) -> UnCLIPDecoder:
    table = {"clip_dim": 8, "vocab_size": 20, "text_len": 5, "text_width": 16, "num_steps": 50, "unet": TINY_UNET,
             **overrides}
    return UnCLIPDecoder(from_dict(DecoderConfig, table, "model"))


def test_a_tiny_prior_learns_text_to_image_embeddings_and_keeps_the_closer_draw():
    torch.manual_seed(0)
    prior = DiffusionPrior(PriorConfig(clip_dim=8, vocab_size=20, text_len=5, width=32, layers=2, heads=2,
                                       num_steps=100, cond_drop_prob=0.0))
    text = torch.randint(0, 20, (4, 5))
    text_emb, image_emb = torch.randn(4, 8), torch.randn(4, 8)
    opt = torch.optim.Adam(prior.parameters(), 2e-3)
    for _ in range(250):
        loss, _ = prior.loss({"text": text, "clip_text": text_emb, "clip_image": image_emb})
        opt.zero_grad()
        loss.backward()
        opt.step()
    drawn = prior.eval().sample(text, text_emb, DiffusionSamplingConfig(steps=20, clip=False), candidates=2)
    cos = torch.nn.functional.normalize(drawn, dim=-1) @ torch.nn.functional.normalize(image_emb, dim=-1).T
    assert bool((cos.diagonal() > 0.9).all()), cos  # each caption gets its own image embedding back ...
    assert bool((cos.argmax(dim=1) == torch.arange(4)).all())  # ... and not another caption's
    assert drawn.norm(dim=-1).mean().item() == pytest.approx(math.sqrt(8), rel=0.2)  # in clip_space's scale


def test_prior_guidance_mixes_the_text_and_null_rows():
    torch.manual_seed(0)
    prior = DiffusionPrior(PriorConfig(clip_dim=8, vocab_size=20, text_len=5, width=16, layers=1, heads=2, num_steps=50))
    text, te, z = torch.randint(0, 20, (2, 5)), torch.randn(2, 8), torch.randn(2, 8)
    t = torch.tensor([10, 30])
    cond = prior(z, t, text, te)
    null = prior(z, t, text, te, keep_text=torch.zeros(2, dtype=torch.bool))
    z0, _ = prior.denoise_fn(text, te, 3.0)(z, t)
    assert torch.allclose(z0, null + 3.0 * (cond - null), atol=1e-5)
    assert (cond - null).abs().max() > 1e-4  # the null condition is not the text
    other = prior(z, t, text, te * -1)
    assert (other - cond).abs().max() > 1e-4  # the text embedding is read


def test_decoder_is_deterministic_given_embedding_and_noise_and_reads_the_embedding():
    torch.manual_seed(0)
    decoder = tiny_decoder().eval()
    for p in decoder.parameters():  # leave the zero-initialised output so the conditions matter
        torch.nn.init.normal_(p, std=0.1)
    emb, text = torch.randn(2, 8), torch.randint(0, 20, (2, 5))
    s = DiffusionSamplingConfig(steps=4, guidance=2.0, seed=3)
    a, b = decoder.sample(emb, text, s), decoder.sample(emb, text, s)
    assert torch.equal(a, b)
    other = decoder.sample(torch.randn(2, 8), text, s)
    assert (other - a).abs().max() > 1e-3
    noise = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)  # one x_T for both rows: only the embedding differs
    same = decoder.sample(emb[:1].expand(2, -1), None, s, noise=noise)
    assert torch.equal(same[0], same[1])


def test_decoder_drops_the_embedding_and_caption_as_the_paper():
    decoder = tiny_decoder(emb_drop_prob=0.1, caption_drop_prob=0.5)
    assert decoder.cfg.unet.cond_dim == 8 and decoder.cfg.unet.context_dim == 16  # derived, not configured
    torch.manual_seed(0)
    batch = {"clip_image": torch.randn(4000, 8), "text": torch.randint(0, 20, (4000, 5))}
    inputs = decoder.training_inputs(batch, torch.zeros(4000, 3, 16, 16))
    emb_dropped = (inputs["cond"].abs().sum(-1) == 0).float().mean().item()
    caption_dropped = (inputs["context"][:, 4:].abs().sum((1, 2)) == 0).float().mean().item()
    assert emb_dropped == pytest.approx(0.1, abs=0.02) and caption_dropped == pytest.approx(0.5, abs=0.03)
    assert inputs["context"].shape == (4000, 4 + 5, 16)  # four CLIP tokens, then the caption's
    assert torch.allclose(inputs["cond"][inputs["cond"].abs().sum(-1) > 0].norm(dim=-1), torch.tensor(math.sqrt(8)))
    with pytest.raises(ConfigError, match="not labels"):
        tiny_decoder(unet={**TINY_UNET, "num_classes": 3})


def test_upsampler_reads_a_blurred_low_resolution_image():
    blurred = gaussian_blur(torch.rand(3, 3, 12, 12), torch.tensor([0.5, 1.0, 2.0]))
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([1.0])), flat, atol=1e-6)  # a blur keeps a flat image
    assert blurred[2].std() < blurred[0].std()  # a wider σ blurs more
    up = Upsampler(from_dict(UpsamplerConfig, {"low_res": 8, "num_steps": 20, "unet": TINY_UNET}, "model"))
    assert up.cfg.unet.cond_channels == 3 and up.unet.input_conv.in_channels == 6
    inputs = up.training_inputs({}, torch.rand(2, 3, 16, 16) * 2 - 1)
    assert inputs["cond_image"].shape == (2, 3, 16, 16)
    assert up.eval().sample(torch.rand(2, 3, 8, 8), DiffusionSamplingConfig(steps=2)).shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match="enlarges 8x8"):
        up.sample(torch.rand(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="below the output side"):
        from_dict(UpsamplerConfig, {"low_res": 16, "unet": TINY_UNET}, "model")


def test_slerp_and_clip_space():
    from cvformers.pipelines.unclip import slerp

    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b / 2)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]), atol=1e-6)  # on the circle, halfway
    assert torch.allclose(clip_space(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]) * math.sqrt(2))


# --- the tasks, the bundle, the pipeline and the CLI on tiny runs ------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from cvformers import cli

    root = tmp_path_factory.mktemp("unclip")
    common = ("[data]\nsize = 48\neval_size = 16\n\n[unclip]\nsample_steps = 2\n\n"
              "[train]\nsteps = 2\nbatch_size = 8\ncheckpoint_every = 2\neval_every = 0\nwarmup_steps = 1\n")
    unet = "\n[model.unet]\nbase_channels = 16\nchannel_mults = [1, 2]\nattention_resolutions = [16]\nheads = 2\n"
    (root / "decoder.toml").write_text(common.replace("size = 48", "size = 48\nimage_size = 16")
                                       + "\n[model]\nnum_steps = 50\ntext_layers = 1\n" + unet.replace("[16]", "[8]"))
    (root / "prior.toml").write_text(common + "\n[model]\nnum_steps = 100\nwidth = 32\nlayers = 1\nheads = 2\n")
    (root / "upsampler.toml").write_text(common.replace("size = 48", "size = 48\nimage_size = 32")
                                         + "\n[model]\nnum_steps = 50\n" + unet)
    runs = root / "runs"
    for stage in ("decoder", "prior", "upsampler"):
        assert cli.main(["train", f"unclip-{stage}", "--out", str(runs / stage),
                         "--config", str(root / f"{stage}.toml")]) == 0
    return runs


def test_tasks_cache_the_clip_embeddings_and_copy_the_clip(tiny_runs, capsys):
    from cvformers import cli

    decoder = tiny_runs / "decoder"
    assert (decoder / "clip_embeddings_train.safetensors").is_file() and (decoder / "clip" / "model.safetensors").is_file()
    assert (decoder / "ema.safetensors").is_file() and (decoder / "samples.png").is_file()
    capsys.readouterr()
    assert cli.main(["train", "unclip-decoder", "--out", str(decoder), "--resume", "--steps", "3"]) == 0
    assert "CLIP-embedding" not in capsys.readouterr().err  # read from the cache, not computed again


def test_bundle_load_generate_vary_and_the_cli(tiny_runs, tmp_path, capsys):
    from PIL import Image

    from cvformers import cli
    from cvformers.pipelines.unclip import UnCLIP

    bundle = tmp_path / "bundle"
    assert cli.main(["bundle", "--unclip", str(tiny_runs), "--out", str(bundle)]) == 0
    assert {p.name for p in bundle.iterdir()} == {"config.toml", "prior", "decoder", "upsampler", "clip"}
    pipe = UnCLIP.load(bundle)
    assert pipe.image_size == 32 and pipe.upsampler is not None
    fast = dict(steps=2, prior_steps=2, upsampler_steps=2)
    result = pipe.generate("a red circle", num_images=2, candidates=3, **fast)
    assert result.images.shape == (2, 3, 32, 32) and bool((result.scores[:-1] >= result.scores[1:]).all())
    again = pipe.generate("a red circle", num_images=2, candidates=3, **fast)
    assert torch.equal(result.images, again.images)  # same seed, same images
    guided = pipe.generate("a red circle", num_images=2, candidates=3, prior_guidance=3.0, **fast)
    assert not torch.equal(result.images, guided.images) and guided.settings["prior_guidance"] == 3.0
    assert pipe.vary(result.images[0], 2, **fast).images.shape == (2, 3, 32, 32)
    assert pipe.interpolate(result.images[0], result.images[1], 3, **fast).shape == (3, 3, 32, 32)
    from cvformers.eval.generation import caption_fidelity

    report = caption_fidelity(pipe, "heldout", n_captions=2, per_caption=1, **fast)  # the checker reads 32-px scenes
    assert report["images"] == 2 and 0.0 <= report["fidelity"] <= 1.0

    out = tmp_path / "g.png"
    assert cli.main(["generate", "a red circle", "--model", str(bundle), "--num", "2", "--steps", "2",
                     "--prior-guidance", "2", "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 2 * 128
    capsys.readouterr()
    for argv, message in [
        (["generate", "a red circle", "--model", str(bundle), "--top-k", "5"], "DALL-E settings"),
        (["generate", " ", "--model", str(bundle), "--steps", "2"], "the prompt is empty"),
        (["generate", "a red circle", "--model", "default", "--prior-guidance", "3"], "diffusion settings"),
        (["vary", str(tmp_path / "missing.png"), "--model", str(bundle)], "not found"),
        (["text-diff", str(out), "--caption", "a", "--to", "b", "--amounts", "0,2", "--model", str(bundle)],
         "amounts must be numbers in \\[0, 1\\]"),
        (["interpolate", str(out), str(out), "--steps", "1", "--model", str(bundle)], "between 2 and 64"),
        (["bundle", "--unclip", str(tmp_path), "--out", str(tmp_path / "b2")], "no prior/ run"),
        (["bundle", "--unclip", str(tiny_runs), "--out", str(tiny_runs / "decoder")], "overlaps"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and pytest.importorskip("re").search(message, err), (argv, err)


def test_another_reranker_chooses_the_candidates_kept(tiny_runs, tmp_path):
    from cvformers import cli
    from cvformers.pipelines.unclip import UnCLIP

    class Brightest:  # prefers bright images, which the shared CLIP has no reason to
        def score(self, images, prompt):
            return images.mean(dim=(1, 2, 3))

    fast = dict(steps=2, prior_steps=2, upsampler_steps=2, seed=1)
    everything = UnCLIP.load(tiny_runs).generate("a red circle", num_images=4, **fast)
    pipe = UnCLIP.load(tiny_runs, reranker=Brightest())
    kept = pipe.generate("a red circle", num_images=2, candidates=4, **fast)
    brightness = everything.images.mean(dim=(1, 2, 3))
    assert torch.allclose(kept.scores, brightness.sort(descending=True).values[:2])
    assert torch.equal(kept.images[0], everything.images[int(brightness.argmax())])
    assert cli.main(["generate", "a red circle", "--model", str(tiny_runs), "--num", "1", "--candidates", "2",
                     "--steps", "2", "--clip", "default/clip", "--out", str(tmp_path / "g.png")]) == 0


def test_sampling_without_the_prior_decodes_the_caption_text_embedding(tiny_runs, tmp_path, capsys):
    from cvformers import cli
    from cvformers.config import ConfigError
    from cvformers.pipelines.unclip import UnCLIP, UnCLIPSamplingConfig

    pipe = UnCLIP.load(tiny_runs)
    fast = dict(steps=2, prior_steps=2, upsampler_steps=2, seed=4)
    drawn = pipe.generate("a red circle", num_images=2, prior="text", **fast)
    assert drawn.settings["prior"] == "text"
    text, text_embedding = pipe.encode_prompt("a red circle")
    decoded = pipe.decode(text_embedding.expand(2, -1), text.expand(2, -1), pipe.sampling.override(**fast))
    assert all(any(torch.equal(image, other) for other in decoded) for image in drawn.images)
    assert not torch.equal(drawn.images, pipe.generate("a red circle", num_images=2, **fast).images)
    with pytest.raises(ConfigError, match="sampling.prior must be one of diffusion, text"):
        UnCLIPSamplingConfig(prior="none")
    capsys.readouterr()
    assert cli.main(["generate", "a red circle", "--model", "default", "--prior", "text"]) == 2
    assert "diffusion settings" in capsys.readouterr().err
    assert cli.main(["eval", "fidelity", "--model", str(tiny_runs), "--prior", "text", "--captions", "2",
                     "--per-caption", "1", "--candidates", "2", "--steps", "2"]) == 0
    assert '"images": 2' in capsys.readouterr().out


def test_a_reranker_run_is_bundled_and_scores_the_candidates(tiny_runs, tmp_path, capsys):
    import shutil

    from cvformers import cli
    from cvformers.loading import resolve_run
    from cvformers.pipelines.rerank import ClipReranker
    from cvformers.pipelines.unclip import UnCLIP

    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs, runs)
    shutil.copytree(resolve_run("default/clip"), runs / "reranker")  # another CLIP than the one shared
    bundle = tmp_path / "bundle"
    assert cli.main(["bundle", "--unclip", str(runs), "--out", str(bundle)]) == 0
    assert (bundle / "reranker" / "tokenizer.json").is_file()
    pipe = UnCLIP.load(bundle)
    assert isinstance(pipe.reranker, ClipReranker) and pipe.reranker.model is not pipe.clip
    fast = dict(steps=2, prior_steps=2, upsampler_steps=2, seed=1)
    kept = pipe.generate("a red circle", num_images=2, candidates=4, **fast)
    reference = ClipReranker.load("default/clip")  # the fp16 copy scores within fp16 rounding
    assert torch.allclose(kept.scores, reference.score(kept.images, "a red circle"), atol=2e-3)
    # a saved pipeline keeps its reranker, and the bundle without one reranks with the shared CLIP
    again = UnCLIP.load(pipe.save_pretrained(tmp_path / "saved"))
    assert isinstance(again.reranker, ClipReranker)
    assert UnCLIP.load(tiny_runs).reranker is None
    shutil.rmtree(runs / "reranker")
    shutil.copytree(tiny_runs / "prior", runs / "reranker")
    capsys.readouterr()
    assert cli.main(["bundle", "--unclip", str(runs), "--out", str(tmp_path / "b2")]) == 2
    assert "where a CLIP reranker belongs" in capsys.readouterr().err


def test_a_bundle_with_a_missing_part_is_refused_in_one_line(tiny_runs, tmp_path):
    import shutil

    from cvformers.pipelines.unclip import UnCLIP

    broken = tmp_path / "broken"
    shutil.copytree(tiny_runs, broken)
    (broken / "prior" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="prior run: config.toml or model.safetensors is missing"):
        UnCLIP.load(broken)
    shutil.rmtree(broken / "prior")
    with pytest.raises(UserError, match="the prior/ folder is missing"):
        UnCLIP.load(broken)


def test_a_prior_and_a_decoder_of_different_clips_are_refused(tiny_runs, tmp_path):
    import shutil

    from cvformers.loading import resolve_run
    from cvformers.pipelines.unclip import UnCLIP

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_runs, mixed)
    other = resolve_run("unclip") / "clip" / "model.safetensors"  # another CLIP than default/clip
    shutil.copyfile(other, mixed / "decoder" / "clip" / "model.safetensors")
    with pytest.raises(UserError, match="trained with different CLIPs"):
        UnCLIP.load(mixed)


# --- the latent decoder -------------------------------------------------------------------------------


def shipped_vqvae():
    from cvformers.loading import load_vae

    return load_vae("default/vae")


def tiny_latent_decoder(vae) -> LatentDecoder:
    from cvformers.config import to_dict

    table = {"clip_dim": 8, "vocab_size": 20, "text_len": 5, "text_width": 16, "num_steps": 50, "vae": to_dict(vae.cfg),
             "unet": {**TINY_UNET, "image_size": vae.cfg.grid_size, "in_channels": 72, "attention_resolutions": [4]}}
    model = LatentDecoder(from_dict(LatentDecoderConfig, table, "model"))
    model.vae.load_state_dict(vae.state_dict())
    return model


def test_latent_decoder_maps_code_ids_into_a_box_and_snaps_back_to_them():
    from cvformers.data.shapes import ShapesDataset

    vae = shipped_vqvae()
    decoder = tiny_latent_decoder(vae)
    data = ShapesDataset("test", image_size=32)
    ids = vae.encode(torch.stack([data[i]["image"] for i in range(6)]))
    x0 = decoder.clean_sample({"image_ids": ids})
    assert x0.shape == (6, 72, 8, 8) and float(x0.min()) >= -1 and float(x0.max()) <= 1
    assert float(x0.amin(dim=(0, 2, 3)).min()) < 0.9  # not all squashed to one end of the box
    assert torch.equal(decoder.nearest_ids(x0), ids)  # each cell is its own code again
    # a small error in every channel snaps to the same codes, or to near-twins that draw the same
    noisy = decoder.nearest_ids(x0 + 0.02 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    assert float((noisy == ids).float().mean()) > 0.9
    assert float((vae.decode(noisy) - vae.decode(ids)).abs().mean()) < 0.01
    # what it draws is the tokenizer's decoding of those codes
    assert torch.allclose(decoder.to_images(x0), vae.decode(ids))
    weights = decoder.channel_weights()  # structure (64 channels) and colour (8) weigh the same in the loss
    assert float(weights.mean()) == pytest.approx(1.0) and float(weights[:64].sum()) == pytest.approx(float(weights[64:].sum()))
    with pytest.raises(ConfigError, match="latent grid is 72x8x8"):
        from_dict(LatentDecoderConfig, {"vae": {**vae.cfg.__dict__}, "unet": TINY_UNET}, "model")


def test_latent_decoder_samples_images_deterministically_from_its_embedding():
    vae = shipped_vqvae()
    decoder = tiny_latent_decoder(vae).eval()
    assert decoder.image_size == 32 and decoder.image_shape == (72, 8, 8)
    emb = torch.randn(2, 8)
    s = DiffusionSamplingConfig(steps=3, guidance=2.0, seed=0)
    noise = torch.randn(2, 72, 8, 8)
    a = decoder.sample(emb, torch.randint(0, 20, (2, 5)), s, noise=noise)
    b = decoder.sample(emb, torch.randint(0, 20, (2, 5)) * 0, s, noise=noise)
    again = decoder.sample(emb, torch.randint(0, 20, (2, 5)) * 0, s, noise=noise)
    assert a.shape == (2, 3, 32, 32) and torch.equal(b, again)
    loss, metrics = decoder.loss({"image_ids": torch.randint(0, vae.num_tokens, (4, 8, 8)), "clip_image": torch.randn(4, 8),
                                  "text": torch.randint(0, 20, (4, 5))})
    loss.backward()
    assert all(p.grad is None for p in decoder.vae.parameters())  # the tokenizer stays frozen
    assert decoder.unet.input_conv.weight.grad is not None


def test_latent_decoder_task_bundle_and_refusals(tiny_runs, tmp_path, capsys):
    import shutil

    from cvformers import cli
    from cvformers.pipelines.unclip import UnCLIP

    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs / "prior", runs / "prior")
    config = tmp_path / "latent.toml"
    config.write_text("[data]\nsize = 48\neval_size = 16\n\n[unclip]\nsample_steps = 2\n\n"
                      "[train]\nsteps = 2\nbatch_size = 8\ncheckpoint_every = 2\neval_every = 0\nwarmup_steps = 1\n\n"
                      "[model]\nnum_steps = 50\ntext_layers = 1\n\n[model.unet]\nbase_channels = 16\n"
                      "channel_mults = [1, 2]\nnum_res_blocks = 1\nheads = 2\n")
    decoder = runs / "decoder"
    assert cli.main(["train", "unclip-decoder", "--vae", "default/vae", "--config", str(config), "--out", str(decoder)]) == 0
    assert (decoder / "vae" / "model.safetensors").is_file() and (decoder / "vae_ids_train.safetensors").is_file()
    capsys.readouterr()
    assert cli.main(["train", "unclip-decoder", "--out", str(decoder), "--resume", "--steps", "3"]) == 0
    assert "tokenizing" not in capsys.readouterr().err  # the ids come from the cache
    for argv, message in [
        (["train", "unclip-decoder", "--out", str(decoder), "--resume", "--steps", "4", "--vae", "default/vae"],
         "keeps its own tokenizer"),
        (["train", "unclip-decoder", "--vae", "default/clip", "--out", str(tmp_path / "x")], "not an image tokenizer"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    bundle = tmp_path / "bundle"
    assert cli.main(["bundle", "--unclip", str(runs), "--out", str(bundle)]) == 0
    pipe = UnCLIP.load(bundle)
    assert isinstance(pipe.decoder, LatentDecoder) and pipe.image_size == 32
    out = pipe.generate("a red circle", num_images=2, steps=2, prior_steps=2)
    assert out.images.shape == (2, 3, 32, 32)


# --- the shipped bundle -------------------------------------------------------------------------------


def test_shipped_unclip_variations_keep_the_clip_content_of_their_source():
    """Variations (§3.1) decode the source's CLIP image embedding: each must be closer, in that CLIP,
    to its own source than to the other source."""
    from cvformers.data.shapes import ShapesDataset
    from cvformers.pipelines.unclip import UnCLIP

    pipe = UnCLIP.load("unclip")
    data = ShapesDataset("test", image_size=32)
    sources = torch.stack([data[0]["image"], data[3]["image"]])
    source_emb = pipe.encode_images(sources)
    assert (source_emb[0] @ source_emb[1]).item() < 0.9  # two different scenes
    for i in range(2):
        drawn = pipe.vary(sources[i], 2, steps=10, seed=i).images
        sims = pipe.encode_images(drawn) @ source_emb.T  # [2 variations, 2 sources]
        assert bool((sims[:, i] > sims[:, 1 - i]).all()), sims


def test_shipped_unclip_generates_from_the_cli(tmp_path, capsys):
    from PIL import Image

    from cvformers import cli

    out = tmp_path / "u.png"
    assert cli.main(["generate", "a red circle", "--model", "unclip", "--num", "1", "--steps", "5", "--out", str(out)]) == 0
    assert Image.open(out).size == (128, 128)  # one image, written as itself, enlarged to the default tile
