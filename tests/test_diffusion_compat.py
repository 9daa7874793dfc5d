"""The schedules and samplers agree with diffusers' DDPMScheduler and DDIMScheduler.

Needs diffusers (`bash scripts/setup_diffusers_env.sh`, then
`.venv-diffusers/bin/python -m pytest -m compat tests/test_diffusion_compat.py`); skipped without it.
The same stand-in network drives both sides, so any difference is the schedule's or the sampler's.
"""

from __future__ import annotations

import pytest
import torch

from cvformers.diffusion.samplers import ddim_sample, ddpm_sample
from cvformers.diffusion.schedules import Schedule, x0_from_eps

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (scripts/setup_diffusers_env.sh)")
pytestmark = pytest.mark.compat


def toy_eps(x: torch.Tensor, t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    return 0.3 * x + 0.1 * torch.sin(t).view(-1, 1, 1, 1)


@pytest.mark.parametrize("ours, theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_alphas_cumprod(ours, theirs):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
    assert torch.allclose(Schedule.make(ours, 1000).alphas_cumprod, sched.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)


def test_ddpm_ancestral_sampling_matches():
    s = Schedule.make("linear", 1000)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                                    clip_sample=True)
    sched.set_timesteps(1000)
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(toy_eps(x, t), t, x, generator=g).prev_sample
    denoise = lambda xt, t: (x0_from_eps(s, xt, t, toy_eps(xt, t)), toy_eps(xt, t))  # noqa: E731
    ours = ddpm_sample(denoise, s, x0.clone(), variance="beta_tilde", clip=True, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampling_matches(eta):
    s = Schedule.make("cosine", 1000)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                                    set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(50)
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    x = x0.clone()
    for t in sched.timesteps:
        # the DDIM paper recomputes ε from the clipped x_0; diffusers does so when asked
        x = sched.step(toy_eps(x, t), t, x, eta=eta, generator=g, use_clipped_model_output=True).prev_sample
    denoise = lambda xt, t: (x0_from_eps(s, xt, t, toy_eps(xt, t)), toy_eps(xt, t))  # noqa: E731
    ours = ddim_sample(denoise, s, x0.clone(), steps=50, eta=eta, clip=True, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


# --- a diffusers UNet2DModel's weights in cvformers' UNet -------------------------------------------

def small_unet2d(**overrides):
    kw = dict(sample_size=16, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(16, 32),
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=8, norm_num_groups=8, attn_norm_num_groups=8, resnet_time_scale_shift="scale_shift",
              num_class_embeds=4)
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**{**kw, **overrides}).eval()


@pytest.mark.parametrize("overrides", [{}, {"num_class_embeds": None, "norm_eps": 1e-6, "layers_per_block": 2}])
def test_a_converted_unet2dmodel_gives_its_outputs(overrides):
    from cvformers.diffusion.convert import from_diffusers_unet

    theirs = small_unet2d(**overrides)
    with torch.no_grad():  # the zero-initialised convs of diffusers' reference init would hide a swapped key
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = from_diffusers_unet(theirs.state_dict(), theirs.config).eval()
    assert ours.cfg.heads == 4 and ours.cfg.attention_resolutions == (8,) and ours.cfg.norm_eps == theirs.config.norm_eps
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 2, 16, 16, generator=g), torch.tensor([3, 400, 999])
    labels = torch.tensor([0, 2, 3]) if theirs.config.num_class_embeds else None
    with torch.no_grad():
        want = theirs(x, t, class_labels=labels).sample
        got = ours(x, t, labels=labels)
    assert want.abs().mean() > 0.05  # the comparison is not between two near-zero maps
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("overrides, message", [
    ({"resnet_time_scale_shift": "default"}, "resnet_time_scale_shift"),
    ({"down_block_types": ("DownBlock2D", "SkipDownBlock2D")}, "SkipDownBlock2D"),
    ({"block_out_channels": (16, 24)}, "multiples of the first"),
    ({"attn_norm_num_groups": None}, "attn_norm_num_groups must equal"),
])
def test_what_does_not_map_is_named(overrides, message):
    from cvformers.config import ConfigError
    from cvformers.diffusion.convert import unet_config_from_diffusers

    config = {**dict(small_unet2d().config), **overrides}
    with pytest.raises(ConfigError, match=message):
        unet_config_from_diffusers(config)
