"""DDIM sampling time: cvformers' U-Net + sampler against diffusers' UNet2DModel + DDIMScheduler.

Both networks have the layout of ``cvformers train ddpm``'s default (32×32×3, widths 32/64/64, one
residual block per level, attention at 8×8 and in the middle) with random weights: the time of a
denoising step does not depend on what the weights are. Each round samples ``--num`` images
with ``--steps`` DDIM steps (eta 0, guidance off); rounds of the two alternate (A B A B) so
that the machine's drift hits both alike; the median of each and their ratio are printed, with
the parameter counts and the peak resident memory of the process.

    bash scripts/setup_diffusers_env.sh
    .venv-diffusers/bin/python benchmarks/diffusion_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def ours(num: int, steps: int):
    from cvformers.diffusion.model import DDPM, DDPMConfig
    from cvformers.diffusion.samplers import DiffusionSamplingConfig

    unet = dict(image_size=32, in_channels=3, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                attention_resolutions=(8,), heads=4, dropout=0.0)
    model = DDPM(DDPMConfig(unet=unet)).eval()
    for p in model.parameters():  # leave the zero-initialised start so every branch computes something real
        torch.nn.init.normal_(p, std=0.02)
    sampling = DiffusionSamplingConfig(sampler="ddim", steps=steps, seed=0)
    return model, lambda: model.sample(num, sampling)


def theirs(num: int, steps: int):
    from diffusers import DDIMScheduler, UNet2DModel

    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(32, 64, 64), attention_head_dim=16,
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(num, 3, 32, 32, generator=g)
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x, eta=0.0).prev_sample
        return x

    return model, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=16, help="images per round")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    a_model, a = ours(args.num, args.steps)
    b_model, b = theirs(args.num, args.steps)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    times: dict[str, list[float]] = {"cvformers": [], "diffusers": []}
    for r in range(args.rounds + 1):
        for name, fn in (("cvformers", a), ("diffusers", b)):
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"DDIM, {args.num} images of 32x32x3, {args.steps} steps, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds} alternating rounds")
    print(f"  cvformers U-Net {count(a_model) / 1e6:.2f}M params: {med['cvformers']:.2f} s")
    print(f"  diffusers UNet2DModel {count(b_model) / 1e6:.2f}M params: {med['diffusers']:.2f} s")
    print(f"  diffusers / cvformers time: {med['diffusers'] / med['cvformers']:.2f}x")
    print(f"  peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
