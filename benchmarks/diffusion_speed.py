"""DDIM sampling and training-step time: cvformers' U-Net against diffusers' UNet2DModel, same weights.

One diffusers ``UNet2DModel`` is built with the layout of ``cvformers train ddpm``'s default (32×32×3,
widths 32/64/64, one residual block per level, attention at 8×8 and in the middle, the timestep as
GroupNorm scale and shift, GroupNorm eps 1e-6) and random weights; ``cvformers.diffusion.convert``
loads those weights into cvformers' ``UNet``, so both compute the same function and the printed
maximum difference of their samples shows the outputs are equal. Then, in alternating rounds
(A B A B, so that the machine's drift hits both alike):

- sampling: ``--num`` images, ``--steps`` DDIM steps (η = 0, x̂₀ clipped, no guidance) from the
  same noise: cvformers' ``DDPM.sample`` against ``DDIMScheduler`` driving ``UNet2DModel`` (under
  ``torch.no_grad``, as diffusers' pipelines run it);
- training: one forward and backward of the ε-prediction loss on a batch of ``--train-batch``
  images (noise, random timesteps, MSE), dropout 0.1 in both.

Printed: medians, the ratio of the medians (diffusers / cvformers: above 1 means cvformers is
faster), parameter counts and the peak resident memory of the process (both models loaded).
``--compile`` runs cvformers' U-Net through ``torch.compile`` and prints the compile time apart.

    bash scripts/setup_diffusers_env.sh
    .venv-diffusers/bin/python benchmarks/diffusion_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

IMAGE = (3, 32, 32)


def diffusers_unet(dropout: float):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(32, 64, 64), attention_head_dim=16, norm_eps=1e-6,
                        resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32, dropout=dropout,
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    with torch.no_grad():  # leave the zero-initialised start so every branch computes something real
        for p in model.parameters():
            p.normal_(std=0.02)
    return model


def ours_from(theirs):
    from cvformers.diffusion.convert import from_diffusers_unet
    from cvformers.diffusion.model import DDPM, DDPMConfig

    unet = from_diffusers_unet(theirs.state_dict(), theirs.config)
    model = DDPM(DDPMConfig(unet=unet.cfg))
    model.unet = unet
    return model


def sampling_pair(num: int, steps: int, compile_ours: bool):
    from diffusers import DDIMScheduler

    from cvformers.diffusion.samplers import DiffusionSamplingConfig

    theirs = diffusers_unet(0.0).eval()
    ours = ours_from(theirs).eval()
    compile_s = None
    if compile_ours:
        t0 = time.perf_counter()
        ours.unet.compile()
        with torch.inference_mode():  # the first call compiles
            ours.unet(torch.randn(num, *IMAGE), torch.full((num,), 500))
        compile_s = time.perf_counter() - t0
    sampling = DiffusionSamplingConfig(sampler="ddim", steps=steps, seed=0)
    # the DDIM paper's update, which cvformers uses: ε recomputed from the clipped x̂₀
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)

    def run_ours():
        return ours.sample(num, sampling) * 2 - 1

    @torch.no_grad()
    def run_theirs():
        scheduler.set_timesteps(steps)
        x = torch.randn(num, *IMAGE, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            x = scheduler.step(theirs(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        return x.clamp(-1, 1)

    return ours, theirs, run_ours, run_theirs, compile_s


def training_pair(batch: int):
    from diffusers import DDPMScheduler

    theirs = diffusers_unet(0.1).train()
    ours = ours_from(theirs).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    images = torch.rand(batch, *IMAGE, generator=torch.Generator().manual_seed(0))

    def run_ours():
        loss, _ = ours.loss({"image": images})
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def run_theirs():
        x0 = images * 2 - 1
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        loss = F.mse_loss(theirs(scheduler.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        theirs.zero_grad(set_to_none=True)

    return run_ours, run_theirs


def alternate(a, b, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of ``rounds`` calls of each, A B A B after one untimed warm-up of each."""
    ta, tb = [], []
    for r in range(rounds + 1):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            if r:
                out.append(time.perf_counter() - t0)
    return ta, tb


def speed_parser(description: str) -> argparse.ArgumentParser:
    """The flags every diffusion speed comparison takes (sampling and training rounds, threads)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=16, help="images per sampling round")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each (after one warm-up)")
    parser.add_argument("--train-batch", type=int, default=64, help="batch of the training step")
    parser.add_argument("--train-rounds", type=int, default=7, help="timed training steps of each")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser


def main() -> None:
    parser = speed_parser(__doc__)
    parser.add_argument("--compile", action="store_true", help="torch.compile cvformers' U-Net for sampling")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, theirs, a, b, compile_s = sampling_pair(args.num, args.steps, args.compile)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    diff = (a() - b()).abs().max().item()
    ta, tb = alternate(a, b, args.rounds)
    med_a, med_b = statistics.median(ta), statistics.median(tb)
    print(f"DDIM, {args.num} images of 32x32x3, {args.steps} steps, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds} alternating rounds; the same weights in both")
    print(f"  max |sample difference| cvformers vs diffusers: {diff:.1e} (images in [-1, 1])")
    print(f"  cvformers U-Net {count(ours.unet) / 1e6:.2f}M params{' (torch.compile)' if args.compile else ''}: "
          f"{med_a:.2f} s")
    print(f"  diffusers UNet2DModel {count(theirs) / 1e6:.2f}M params: {med_b:.2f} s")
    print(f"  diffusers / cvformers time: {med_b / med_a:.2f}x")
    if compile_s is not None:
        print(f"  torch.compile of cvformers' U-Net (first call): {compile_s:.1f} s, not in the times above")
    if args.train_rounds:
        ta, tb = alternate(*training_pair(args.train_batch), args.train_rounds)
        med_a, med_b = statistics.median(ta), statistics.median(tb)
        print(f"training step (forward + backward, batch {args.train_batch}, dropout 0.1), "
              f"median of {args.train_rounds} alternating steps")
        print(f"  cvformers: {med_a * 1000:.0f} ms, diffusers: {med_b * 1000:.0f} ms, "
              f"diffusers / cvformers time: {med_b / med_a:.2f}x")
    print(f"  peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
