import math

import pytest
import torch
import torch.nn.functional as F

from cvformers.config import ConfigError, from_dict, to_dict
from cvformers.vae.metrics import psnr
from cvformers.registry import build_model
from cvformers.vae.dvae import (
    DiscreteVAE,
    DVAEConfig,
    kl_to_uniform,
    logit_laplace_mean,
    logit_laplace_log_prob,
    map_pixels,
    unmap_pixels,
)

from image_toys import squares

TINY = dict(image_size=16, channels=3, vocab_size=32, n_hid=16, n_blk_per_group=1, group_count=3, n_init=16)


def tiny(**kw) -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(DVAEConfig(**{**TINY, **kw}))


def test_encode_decode_shapes_and_face():
    m = tiny().eval()
    assert (m.num_tokens, m.grid_size, m.image_size, m.channels) == (32, 4, 16, 3)
    ids = m.encode(torch.rand(5, 3, 16, 16))
    assert ids.shape == (5, 4, 4) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 32
    out = m.decode(ids)
    assert out.shape == (5, 3, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_decode_lookup_equals_one_hot_conv():
    m = tiny().eval()
    ids = torch.randint(0, 32, (3, 4, 4))
    one_hot = F.one_hot(ids, 32).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(m.decoder(ids=ids), m.decoder(one_hot), atol=1e-6, rtol=0)


def test_grid_follows_group_count():
    assert DVAEConfig(image_size=32, group_count=3).grid_size == 8
    assert DVAEConfig().grid_size == 32  # the release: 256 px -> 32×32
    with pytest.raises(ConfigError, match="image_size"):
        DVAEConfig(image_size=30, group_count=3)
    with pytest.raises(ConfigError, match="n_hid"):
        DVAEConfig(n_hid=30)


def test_pixel_map_round_trip():
    x = torch.rand(2, 3, 4, 4)
    m = map_pixels(x, 0.1)
    assert float(m.min()) >= 0.1 and float(m.max()) <= 0.9
    torch.testing.assert_close(unmap_pixels(m, 0.1), x)


def test_logit_laplace_matches_direct_formula_and_is_a_density():
    x = torch.tensor([0.1, 0.25, 0.5, 0.77, 0.9], dtype=torch.float64)
    mu = torch.tensor([-1.0, 0.3, 0.0, 2.0, -0.5], dtype=torch.float64)
    log_b = torch.tensor([0.0, -1.0, 0.5, -2.0, 1.0], dtype=torch.float64)
    got = logit_laplace_log_prob(x, mu, log_b)
    for i in range(5):
        xi, mi, bi = float(x[i]), float(mu[i]), math.exp(float(log_b[i]))
        density = 1 / (2 * bi * xi * (1 - xi)) * math.exp(-abs(math.log(xi / (1 - xi)) - mi) / bi)
        assert float(got[i]) == pytest.approx(math.log(density), rel=1e-12, abs=1e-12)
    # it integrates to one over (0, 1)
    grid = torch.linspace(1e-9, 1 - 1e-9, 2_000_001, dtype=torch.float64)
    pdf = logit_laplace_log_prob(grid, torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64)).exp()
    assert float(torch.trapezoid(pdf, grid)) == pytest.approx(1.0, abs=1e-4)


def test_kl_to_uniform():
    assert float(kl_to_uniform(torch.zeros(2, 10, 3, 3)).abs().max()) < 1e-6
    assert float(kl_to_uniform(torch.full((1, 10, 1, 1), 3.0)).abs().max()) < 1e-6
    peaked = torch.zeros(1, 10, 1, 1)
    peaked[0, 4] = 100.0  # almost one-hot: KL -> log K
    assert float(kl_to_uniform(peaked)) == pytest.approx(math.log(10), abs=1e-4)
    assert float(kl_to_uniform(torch.randn(4, 10, 2, 2)).min()) > 0


def test_schedules_are_pure_functions_of_step():
    m = tiny()
    # the paper's counts on a run as long as the paper's
    total = 3_000_000
    assert m.tau_at(0, total) == 1.0 and m.beta_at(0, total) == 0.0
    assert m.tau_at(75_000, total) == pytest.approx((1 + 1 / 16) / 2)  # cosine midpoint
    assert m.tau_at(150_000, total) == pytest.approx(1 / 16) and m.tau_at(10**6, total) == pytest.approx(1 / 16)
    assert m.beta_at(2_500, total) == pytest.approx(3.3) and m.beta_at(5_000, total) == pytest.approx(6.6)
    # a 1,000-step run: both schedules are fitted to the run, ending at its last step
    assert m.tau_at(500, 1_000) == pytest.approx((1 + 1 / 16) / 2)
    assert m.tau_at(1_000, 1_000) == pytest.approx(1 / 16)
    assert m.beta_at(500, 1_000) == pytest.approx(3.3) and m.beta_at(1_000, 1_000) == pytest.approx(6.6)
    # a 10,000-step run: τ (150,000) is fitted, β (5,000) is not
    assert m.tau_at(5_000, 10_000) == pytest.approx((1 + 1 / 16) / 2)
    assert m.beta_at(5_000, 10_000) == pytest.approx(6.6) and m.beta_at(2_500, 10_000) == pytest.approx(3.3)
    # the schedule depends on (step, total) only
    m.on_train_step(1_234, 10_000)
    a = (m.tau, m.beta)
    m.on_train_step(9_999, 10_000)
    m.on_train_step(1_234, 10_000)
    assert (m.tau, m.beta) == a
    as_written = tiny(fit_schedules_to_run=False)
    assert as_written.tau_at(75_000, 1_000) == pytest.approx((1 + 1 / 16) / 2)
    # another final temperature: the same cosine, ending there
    warmer = tiny(tau_end=0.25)
    assert warmer.tau_at(500, 1_000) == pytest.approx((1 + 0.25) / 2) and warmer.tau_at(1_000, 1_000) == 0.25


def test_loss_metrics_and_gradients():
    m = tiny()
    m.on_train_step(0, 100)
    loss, metrics = m.loss({"image": squares(4)})
    assert set(metrics) == {"recon_nll", "kl", "psnr", "perplexity", "tau", "beta"}
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    _, hard = m.loss({"image": squares(4)})  # eval uses the argmax codes: PSNR of decode(encode(x))
    x = squares(4)
    assert hard["psnr"] == pytest.approx(float(psnr(m.decode(m.encode(x)), x)), abs=1e-4)


@pytest.mark.parametrize("recon_loss, post_gain", [("logit_laplace", None), ("mse", None), ("mse", 1.0)])
def test_tiny_dvae_overfits_one_batch(recon_loss, post_gain):
    extra = {"kl_weight": 0.0} if recon_loss == "mse" else {}
    m = tiny(vocab_size=64, recon_loss=recon_loss, post_gain=post_gain, **extra)
    x = squares(8)
    m.eval()
    start = float(psnr(m.decode(m.encode(x)), x))
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    steps = 150
    for step in range(steps):
        m.on_train_step(step, steps)
        loss, _ = m.loss({"image": x})
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    end = float(psnr(m.decode(m.encode(x)), x))
    assert end > start + 6, (start, end)  # measured: 6.5 -> 16.3 dB (logit-Laplace), 6.5 -> 15.5 (MSE)


def test_mse_reconstruction_term_is_squared_error_of_sigmoid_mu():
    m = tiny(vocab_size=64, recon_loss="mse", kl_weight=0.0).eval()
    x = squares(2)
    stats = m.decoder(F.one_hot(m.logits(x).argmax(1), 64).permute(0, 3, 1, 2).float())
    mu = stats[:, :3]
    expected = (torch.sigmoid(mu) - map_pixels(x)).square().sum(dim=(1, 2, 3)).mean() / x[0].numel()
    loss, _ = m.loss({"image": x})
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ConfigError, match="recon_loss"):
        tiny(recon_loss="l1")


def test_mse_output_linear_uses_mu_as_the_pixel():
    m = tiny(vocab_size=64, recon_loss="mse", kl_weight=0.0, mse_output="linear").eval()
    x = squares(2)
    stats = m.decoder(F.one_hot(m.logits(x).argmax(1), 64).permute(0, 3, 1, 2).float())
    mu = stats[:, :3]
    expected = (mu - map_pixels(x)).square().sum(dim=(1, 2, 3)).mean() / x[0].numel()
    loss, _ = m.loss({"image": x})
    torch.testing.assert_close(loss, expected)
    ids = m.encode(x)
    torch.testing.assert_close(m.decode(ids), unmap_pixels(m.decoder(ids=ids)[:, :3]))  # clamped to [0, 1]
    with pytest.raises(ConfigError, match="mse_output"):
        tiny(mse_output="linear")  # the logit-Laplace μ is a logit, not a pixel
    with pytest.raises(ConfigError, match="mse_output"):
        tiny(recon_loss="mse", kl_weight=0.0, mse_output="tanh")


def test_safetensors_round_trip_is_bit_exact(tmp_path):
    from safetensors.torch import load_file, save_file

    m = tiny().eval()
    save_file(m.state_dict(), tmp_path / "model.safetensors")
    again = build_model("dvae", to_dict(m.cfg))
    again.load_state_dict(load_file(tmp_path / "model.safetensors"))
    again.eval()
    for k, v in m.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(m.logits(x), again.logits(x))
    assert torch.equal(m.decode(m.encode(x)), again.decode(again.encode(x)))


def test_config_is_strict():
    with pytest.raises(ConfigError, match="vocab"):
        from_dict(DVAEConfig, {"vocab": 10})
    with pytest.raises(ConfigError, match="n_hid"):
        from_dict(DVAEConfig, {"n_hid": "64"})


# --- departures from the release for small models: post_gain ------------------------------------


def test_release_post_gain_is_the_default():
    m = tiny()
    assert all(g.blocks[0].post_gain == pytest.approx(1 / 9) for g in m.encoder.groups + m.decoder.groups)
    assert set(m.state_dict()) == set(tiny(post_gain=1.0).state_dict())  # same weights, OpenAI's keys


def test_post_gain_multiplies_the_residual_branch():
    m = tiny(post_gain=0.5)
    block = m.encoder.groups[0].blocks[0]  # 16 -> 16: identity skip
    assert block.post_gain == 0.5
    x = torch.randn(2, 16, 8, 8)
    h = x
    for layer in (block.conv1, block.conv2, block.conv3, block.conv4):
        h = layer(F.relu(h))
    torch.testing.assert_close(block(x), x + 0.5 * h)


def test_new_options_are_refused_when_wrong():
    with pytest.raises(ConfigError, match="post_gain"):
        tiny(post_gain=0.0)
    with pytest.raises(ConfigError, match="post_gain"):
        from_dict(DVAEConfig, {"post_gain": "1"})
    with pytest.raises(ConfigError, match="recon_estimate"):
        tiny(recon_estimate="mode")
    with pytest.raises(ConfigError, match="recon_estimate"):
        tiny(recon_estimate="mean", recon_loss="mse", kl_weight=0.0)


# --- recon_estimate = "mean": the logit-Laplace posterior mean ---------------------------------


def test_logit_laplace_mean_matches_monte_carlo():
    torch.manual_seed(0)
    mu = torch.tensor([-3.0, -0.5, 0.0, 1.0, 2.5])
    log_b = torch.tensor([0.5, -1.0, 0.0, 0.3, -0.2])
    y = mu + torch.exp(log_b) * torch.distributions.Laplace(0.0, 1.0).sample((400_000, 5))
    expected = unmap_pixels(torch.sigmoid(y), 0.1).mean(0)
    torch.testing.assert_close(logit_laplace_mean(mu, log_b, 0.1), expected, atol=3e-3, rtol=0)
    # a dark-background pixel whose μ sits below the clamp: the median is 0, the mean is not
    assert float(unmap_pixels(torch.sigmoid(mu[:1]), 0.1)) == 0.0
    assert float(logit_laplace_mean(mu[:1], log_b[:1], 0.1)) > 0.05
    # a tiny scale leaves the median
    torch.testing.assert_close(
        logit_laplace_mean(mu, torch.full_like(mu, -12.0), 0.1), unmap_pixels(torch.sigmoid(mu), 0.1), atol=1e-4, rtol=0
    )


def test_recon_estimate_mean_is_what_decode_returns():
    m = tiny(recon_estimate="mean").eval()
    ids = torch.randint(0, 32, (2, 4, 4))
    stats = m.decoder(ids=ids)
    torch.testing.assert_close(m.decode(ids), logit_laplace_mean(stats[:, :3], stats[:, 3:], 0.1))
    median = tiny().eval()
    assert not torch.allclose(median.decode(ids), m.decode(ids))  # same weights (seed 0), other estimate

