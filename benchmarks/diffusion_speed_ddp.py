"""DDIM sampling and training-step time: cvformers' U-Net against denoising-diffusion-pytorch's ``Unet``.

denoising-diffusion-pytorch (lucidrains) builds its ``Unet`` from its own blocks (RMSNorm, a 7×7
input conv, linear attention at every level but the innermost), so its weights do not load into
cvformers' ``UNet`` and the two cannot compute the same function; ``benchmarks/diffusion_speed.py``
is the equal-output comparison (against diffusers). Here the two are built at the same size:

- theirs: ``Unet(dim=32, dim_mults=(1, 2, 2))`` on 32×32×3: widths 32/64/64, two residual blocks
  per level on each side, linear attention at 32 and 16 px, full attention at 8 px and in the
  middle; its ``GaussianDiffusion`` (linear β, T = 1000, ε-prediction) samples with DDIM (η = 0)
  when ``sampling_timesteps`` is below T;
- ours: ``UNet`` with widths 32/64/64, two residual blocks per level going down (three coming up),
  attention at 8 px and in the middle; ``DDPM.sample`` with DDIM, η = 0, the same β schedule.

Both run in one process, in alternating rounds (A B A B); printed are medians, the ratio of the
medians (theirs / ours: above 1 means cvformers is faster), parameter counts and the peak resident
memory. The training step is one forward and backward of the ε loss on ``--train-batch`` images,
each library's own loss code.

    bash scripts/setup_ddpm_peer_env.sh
    .venv-ddp/bin/python benchmarks/diffusion_speed_ddp.py --threads 1
"""

from __future__ import annotations

import contextlib
import io
import resource
import statistics

import torch
from diffusion_speed import alternate, speed_parser

IMAGE = (3, 32, 32)


def theirs_diffusion(steps: int):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    torch.manual_seed(0)
    unet = Unet(dim=32, dim_mults=(1, 2, 2), channels=3)
    return GaussianDiffusion(unet, image_size=32, timesteps=1000, sampling_timesteps=steps,
                             objective="pred_noise", beta_schedule="linear", ddim_sampling_eta=0.0)


def ours_diffusion():
    from cvformers.diffusion.model import DDPM, DDPMConfig
    from cvformers.models.unet import UNetConfig

    torch.manual_seed(0)
    unet = UNetConfig(image_size=32, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2,
                      attention_resolutions=(8,), heads=4, dropout=0.0)
    return DDPM(DDPMConfig(unet=unet, schedule="linear", prediction="eps"))


def main() -> None:
    args = speed_parser(__doc__).parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from cvformers.diffusion.samplers import DiffusionSamplingConfig

    theirs, ours = theirs_diffusion(args.steps).eval(), ours_diffusion().eval()
    sampling = DiffusionSamplingConfig(sampler="ddim", steps=args.steps, eta=0.0, seed=0)

    def run_ours():
        return ours.sample(args.num, sampling)

    @torch.no_grad()
    def run_theirs():
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            return theirs.sample(batch_size=args.num)

    shapes = (tuple(run_ours().shape), tuple(run_theirs().shape))
    assert shapes[0] == shapes[1] == (args.num, *IMAGE), shapes
    count = lambda m: sum(p.numel() for p in m.parameters())
    ta, tb = alternate(run_ours, run_theirs, args.rounds)
    med_a, med_b = statistics.median(ta), statistics.median(tb)
    print(f"DDIM, {args.num} images of 32x32x3, {args.steps} steps, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds} alternating rounds; each library's own sampler and random weights")
    print(f"  cvformers UNet {count(ours.unet) / 1e6:.2f}M params: {med_a:.2f} s")
    print(f"  denoising-diffusion-pytorch Unet {count(theirs.model) / 1e6:.2f}M params: {med_b:.2f} s")
    print(f"  theirs / cvformers time: {med_b / med_a:.2f}x")
    if args.train_rounds:
        ours.train(), theirs.train()
        images = torch.rand(args.train_batch, *IMAGE, generator=torch.Generator().manual_seed(0))

        def train_ours():
            loss, _ = ours.loss({"image": images})
            loss.backward()
            ours.zero_grad(set_to_none=True)

        def train_theirs():
            theirs(images).backward()  # it maps [0, 1] to [-1, 1] itself
            theirs.zero_grad(set_to_none=True)

        ta, tb = alternate(train_ours, train_theirs, args.train_rounds)
        med_a, med_b = statistics.median(ta), statistics.median(tb)
        print(f"training step (forward + backward, batch {args.train_batch}), median of {args.train_rounds} "
              f"alternating steps")
        print(f"  cvformers: {med_a * 1000:.0f} ms, denoising-diffusion-pytorch: {med_b * 1000:.0f} ms, "
              f"theirs / cvformers time: {med_b / med_a:.2f}x")
    print(f"  peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
