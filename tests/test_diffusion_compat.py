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
