"""Diffusion: schedules and closed forms, DDPM and DDIM samplers, guidance, the model and its task."""

from __future__ import annotations

import pytest
import torch

from cvformers.config import ConfigError
from cvformers.diffusion.samplers import DiffusionSamplingConfig, ddim_sample, ddim_timesteps, ddpm_sample
from cvformers.diffusion.schedules import (Schedule, beta_schedule, eps_from_x0, q_sample, v_target, x0_eps_from_v,
                                           x0_from_eps)


def test_linear_schedule_is_ddpms():
    s = Schedule.make("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-05, rel=1e-3)  # the value diffusers' DDPMScheduler holds
    short = Schedule.make("linear", 100)  # rescaled ends: the chain still ends in noise
    assert short.alphas_cumprod[-1].item() < 1e-3


def test_cosine_schedule():
    betas = beta_schedule("cosine", 1000)
    ac = torch.cumprod(1 - betas, 0)
    assert bool((betas <= 0.999).all()) and bool((ac[1:] < ac[:-1]).all())
    assert ac[0].item() == pytest.approx(0.99997, abs=2e-5) and ac[-1].item() < 1e-4
    with pytest.raises(ValueError, match="unknown noise schedule"):
        beta_schedule("sigmoid", 10)


def test_closed_form_equals_iterating_the_chain():
    """q(x_t | x_0) by eq. 4 against t applications of q(x_t | x_{t-1}), in mean and spread."""
    s = Schedule.make("linear", 200)
    x0 = torch.tensor([0.8, -0.5, 0.0])
    g = torch.Generator().manual_seed(0)
    x = x0.expand(40000, 3).clone()
    t = 60
    for i in range(t + 1):
        b = s.betas[i]
        x = (1 - b).sqrt() * x + b.sqrt() * torch.randn(x.shape, generator=g)
    closed = q_sample(s, x0.expand(40000, 3), torch.full((40000,), t), torch.randn(40000, 3, generator=g))
    assert torch.allclose(x.mean(0), closed.mean(0), atol=0.01)
    assert torch.allclose(x.std(0), closed.std(0), rtol=0.02)
    ac = s.alphas_cumprod[t]
    assert torch.allclose(closed.mean(0), ac.sqrt() * x0, atol=0.01)


def test_parameterisations_invert_each_other():
    s = Schedule.make("cosine", 100)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    xt = q_sample(s, x0, t, noise)
    assert torch.allclose(x0_from_eps(s, xt, t, noise), x0, atol=1e-4)
    assert torch.allclose(eps_from_x0(s, xt, t, x0), noise, atol=1e-3)
    x0_v, eps_v = x0_eps_from_v(s, xt, t, v_target(s, x0, t, noise))
    assert torch.allclose(x0_v, x0, atol=1e-5) and torch.allclose(eps_v, noise, atol=1e-5)


def _toy_denoiser(s: Schedule):
    """A fixed stand-in for a network: ε̂ = 0.3 x_t + 0.1 sin(t)."""

    def denoise(xt, t):
        eps = 0.3 * xt + 0.1 * torch.sin(t.float()).view(-1, 1, 1, 1)
        return x0_from_eps(s, xt, t, eps), eps

    return denoise


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_with_eta_1_on_all_steps_is_ddpm(clip):
    s = Schedule.make("linear", 50)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    ref = ddpm_sample(_toy_denoiser(s), s, x.clone(), variance="beta_tilde", clip=clip,
                      generator=torch.Generator().manual_seed(5))
    got = ddim_sample(_toy_denoiser(s), s, x.clone(), steps=50, eta=1.0, clip=clip,
                      generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    other = ddpm_sample(_toy_denoiser(s), s, x.clone(), variance="beta", clip=clip,
                        generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(other, ref, atol=1e-4)  # the variance choice matters


def test_ddim_eta_0_is_deterministic_and_steps_are_checked():
    s = Schedule.make("linear", 100)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    a = ddim_sample(_toy_denoiser(s), s, x.clone(), steps=10, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(_toy_denoiser(s), s, x.clone(), steps=10, eta=0.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert ddim_timesteps(100, 10) == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    for steps in (0, 101):
        with pytest.raises(ConfigError, match="sampling.steps must be between 1 and"):
            ddim_timesteps(100, steps)


@pytest.mark.parametrize("kw, message", [
    ({"sampler": "euler"}, "unknown sampler"), ({"steps": 0}, "sampling.steps"), ({"eta": float("nan")}, "sampling.eta"),
    ({"guidance": -1.0}, "sampling.guidance"), ({"seed": -2}, "sampling.seed"), ({"variance": "large"}, "variance"),
])
def test_sampling_config_is_checked(kw, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionSamplingConfig(**kw)


# --- the model, its task and the CLI ---------------------------------------------------------------

TINY_UNET = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
             "heads": 2, "dropout": 0.0}


def tiny_model(num_classes=0, prediction="eps", num_steps=50):
    from cvformers.diffusion.model import DDPM, DDPMConfig

    torch.manual_seed(0)
    unet = {**TINY_UNET, "image_size": 16, "in_channels": 1, "num_classes": num_classes}
    return DDPM(DDPMConfig(unet=unet, num_steps=num_steps, prediction=prediction))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_tiny_ddpm_learns_one_image(prediction):
    model = tiny_model(prediction=prediction)
    image = torch.zeros(1, 1, 16, 16)
    image[..., 4:12, 4:12] = 1.0
    batch = {"image": image.expand(16, -1, -1, -1)}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.3 * sum(losses[:20]) / 20


def test_guidance_1_is_the_conditional_model_and_labels_are_checked():
    model = tiny_model(num_classes=3).eval()
    for p in model.unet.parameters():  # leave the zero-initialised start so labels matter
        torch.nn.init.normal_(p, std=0.05)
    torch.nn.init.normal_(model.unet.label_embed.weight, std=2.0)
    labels = torch.tensor([0, 2])
    plain = model.sample(2, DiffusionSamplingConfig(steps=5, guidance=1.0), labels=labels)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 10])
    cond, null_inputs = model.label_inputs(labels)
    x0_a, eps_a = model.denoise_fn(cond, null_inputs, 1.0)(x, t)
    assert torch.equal(eps_a, model.unet(x, t, labels=labels))  # one forward, the conditional rows only
    _, eps_strong = model.denoise_fn(cond, null_inputs, 4.0)(x, t)
    null = torch.full_like(labels, 3)
    eps_u = model.unet(x, t, labels=null)
    assert torch.allclose(eps_strong, eps_u + 4.0 * (eps_a - eps_u), atol=1e-5)  # Ho & Salimans eq. 6, one batch
    assert plain.shape == (2, 1, 16, 16) and (eps_strong - eps_a).abs().max() > 1e-3
    with pytest.raises(ConfigError, match=r"labels must be in \[0, 3\)"):
        model.sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match="guidance needs a conditional model"):
        tiny_model().sample(1, DiffusionSamplingConfig(guidance=2.0))


def _train(tmp_path, out, extra=()):
    from cvformers import cli

    cfg = tmp_path / "ddpm.toml"
    cfg.write_text("[model]\nnum_steps = 50\n\n[model.unet]\n" + "\n".join(
        f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_UNET.items())
        + "\n\n[data]\nsize = 64\neval_size = 16\nimage_size = 16\n\n[ddpm]\nsample_steps = 2\n"
        + "\n[train]\nbatch_size = 8\ncheckpoint_every = 2\neval_every = 0\nlog_every = 1\nwarmup_steps = 1\n")
    return cli.main(["train", "ddpm", "--data", "shapes", "--out", str(out), "--config", str(cfg), *extra])


def test_train_resume_and_sample_from_the_cli(tmp_path, capsys):
    from safetensors.torch import load_file

    from cvformers import cli

    assert _train(tmp_path, tmp_path / "straight", ["--steps", "4"]) == 0
    assert _train(tmp_path, tmp_path / "split", ["--steps", "4", "--until", "2"]) == 0
    assert cli.main(["train", "ddpm", "--out", str(tmp_path / "split"), "--resume"]) == 0
    for name in ("model.safetensors", "ema.safetensors"):  # the weights and their average, bit for bit
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "split" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    run = tmp_path / "straight"
    assert (run / "samples.png").is_file()
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "ddpm", "--model", str(run), "--steps", "3", "--num", "4", "--label", "1",
                     "--guidance", "2", "--out", str(out), "--tile-size", "0"]) == 0
    from PIL import Image

    assert Image.open(out).size == (4 * 16 + 5 * 2, 16 + 2 * 2)
    capsys.readouterr()
    for flags, message in ((["--sampler", "euler"], "unknown sampler"), (["--steps", "51"], "more than the 50 steps"),
                           (["--label", "9"], r"labels must be in \[0, 4\)"), (["--label", "x"], "--label takes class ids"),
                           (["--prompt", "a red circle"], "not trained on captions")):
        assert cli.main(["sample", "ddpm", "--model", str(run), "--num", "2", "--out", str(out), *flags]) == 2
        assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")


def test_resblock_fused_norm_path_equals_the_module_by_module_formula():
    """ResBlock's GroupNorm -> (scale, shift) -> in-place SiLU path against the plain formula, values
    and gradients (the in-place SiLU must not corrupt what autograd saved)."""
    import torch.nn.functional as F

    from cvformers.nn.unet_blocks import ResBlock

    torch.manual_seed(0)
    block = ResBlock(8, 12, emb_dim=16, groups=4)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, emb = torch.randn(2, 8, 6, 6, requires_grad=True), torch.randn(2, 16)

    def reference(x):
        h = block.conv1(F.silu(block.norm1(x)))
        scale, shift = block.emb_proj(F.silu(emb)).chunk(2, dim=1)
        h = block.norm2(h) * (1 + scale[..., None, None]) + shift[..., None, None]
        return block.skip(x) + block.conv2(F.silu(h))

    want = reference(x)
    (grad_want,) = torch.autograd.grad(want.square().sum(), x)
    got = block(x, emb)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(grad_got, grad_want, atol=1e-4)


# --- caption conditioning ---------------------------------------------------------------------------

def test_caption_tokens_and_pooled_token_reach_the_unet_and_a_dropped_caption_is_zero():
    from cvformers.diffusion.caption import CaptionDDPM, CaptionDDPMConfig

    torch.manual_seed(0)
    unet = {**TINY_UNET, "image_size": 16, "in_channels": 1}
    model = CaptionDDPM(CaptionDDPMConfig(unet=unet, num_steps=50, vocab_size=20, text_len=5, text_width=8,
                                          text_heads=2)).eval()
    assert model.cfg.unet.context_dim == 8 and model.cfg.unet.cond_dim == 8
    for p in model.unet.parameters():  # leave the zero-initialised start so the conditioning matters
        torch.nn.init.normal_(p, std=0.05)
    text = torch.tensor([[1, 2, 3, 15, 16], [4, 5, 14, 15, 16]])
    inputs = model.caption_conditions(text, 2, keep=torch.tensor([True, False]))
    assert inputs["context"].shape == (2, 5, 8) and torch.equal(inputs["cond"], inputs["context"][:, -1])
    assert inputs["context"][1].abs().max() == 0 and inputs["context"][0].abs().max() > 0
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 10])
    with_text = model.unet(x, t, **model.caption_conditions(text, 2))
    assert not torch.allclose(with_text[0], model.unet(x, t, **model.caption_conditions(None, 2))[0], atol=1e-4)
    with pytest.raises(ValueError, match=r"caption ids must be in \[0, 20\)"):
        model.caption_conditions(torch.full((1, 5), 20), 1)


def test_caption_ddpm_trains_and_samples_from_a_prompt_on_the_cli(tmp_path, capsys):
    from cvformers import cli

    cfg = tmp_path / "caption.toml"
    cfg.write_text("[model]\nnum_steps = 50\ntext_width = 16\ntext_heads = 2\n\n[model.unet]\n" + "\n".join(
        f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_UNET.items())
        + "\n\n[data]\nsize = 64\neval_size = 16\nimage_size = 16\n\n"
        + "[ddpm]\nsample_steps = 2\nconditional = \"caption\"\nbpe_vocab_size = 450\n"
        + "\n[train]\nbatch_size = 8\ncheckpoint_every = 3\neval_every = 0\nlog_every = 1\nwarmup_steps = 1\n")
    run = tmp_path / "run"
    assert cli.main(["train", "ddpm", "--data", "shapes", "--out", str(run), "--config", str(cfg), "--steps", "3"]) == 0
    assert (run / "tokenizer.json").is_file() and (run / "samples.png").is_file()
    out = tmp_path / "grid.png"
    base = ["sample", "ddpm", "--model", str(run), "--steps", "3", "--num", "2", "--out", str(out), "--tile-size", "0"]
    assert cli.main([*base, "--prompt", "a red circle above a blue square", "--guidance", "3"]) == 0
    from PIL import Image

    assert Image.open(out).size == (2 * 16 + 3 * 2, 16 + 2 * 2)
    capsys.readouterr()
    for flags, message in ((["--prompt", "  "], "the prompt is empty"), (["--label", "1"], "give --prompt, not --label")):
        assert cli.main([*base, *flags]) == 2
        assert message in capsys.readouterr().err
    with pytest.warns(UserWarning, match="never learnt the word"):
        assert cli.main([*base, "--prompt", "a purple dragon"]) == 0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_count_the_x0_error_times_min_snr(prediction):
    """Min-SNR-γ: weight × (target error)² equals min(SNR_t, γ) × (x̂_0 error)², for either target."""
    from cvformers.diffusion.model import min_snr_weights

    torch.manual_seed(0)
    s = Schedule.make("cosine", 1000)
    t = torch.tensor([0, 50, 300, 600, 999])
    x0, noise = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    xt = q_sample(s, x0, t, noise)
    target = noise if prediction == "eps" else v_target(s, x0, t, noise)
    out = target + 0.1 * torch.randn_like(target)  # a U-Net output with some error
    x0_hat = x0_eps_from_v(s, xt, t, out)[0] if prediction == "v" else x0_from_eps(s, xt, t, out)
    gamma = 5.0
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    weighted = min_snr_weights(s, t, gamma, prediction) * (out - target).square().flatten(1).mean(1)
    expected = snr.clamp(max=gamma) * (x0_hat - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(weighted, expected, rtol=1e-3, atol=1e-6)
    assert (snr[:2] > gamma).all() and (snr[-2:] < gamma).all()  # both sides of the clip are exercised


def test_min_snr_loss_is_weighted_and_reports_the_plain_mse():
    from cvformers.diffusion.model import DDPM, DDPMConfig

    torch.manual_seed(0)
    unet = dict(image_size=8, in_channels=1, base_channels=8, channel_mults=[1], num_res_blocks=1,
                attention_resolutions=[], heads=1, groups=4)
    plain, weighted = DDPM(DDPMConfig(unet=unet, prediction="v")), DDPM(DDPMConfig(unet=unet, prediction="v",
                                                                                   min_snr_gamma=5.0))
    weighted.load_state_dict(plain.state_dict())
    batch = {"image": torch.rand(16, 1, 8, 8)}
    torch.manual_seed(1)
    loss_p, m_p = plain.loss(batch)
    torch.manual_seed(1)
    loss_w, m_w = weighted.loss(batch)
    assert m_p["mse"] == pytest.approx(m_w["mse"]) and loss_p.item() == pytest.approx(m_p["mse"])
    assert loss_w.item() < loss_p.item()  # every v weight min(SNR, 5) / (SNR + 1) is below 1
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DDPMConfig(min_snr_gamma=-1.0)
