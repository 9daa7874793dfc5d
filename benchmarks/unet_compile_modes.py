"""Forward time of the DDPM U-Net in eager mode and under several ``torch.compile`` settings.

The U-Net of ``cvformers train ddpm``'s default (32×32×3, widths 32/64/64, attention at 8×8) with
small random weights, one batch of ``--batch`` images, under ``torch.inference_mode`` as sampling
runs it. Each setting is one copy of the same network:

- ``eager``: no compile;
- ``compile``: ``torch.compile`` with its defaults (what ``cvformers sample ddpm --compile`` does);
- ``channels-last``: conv weights in NHWC first, which oneDNN's convolutions prefer;
- ``freezing``: inductor's ``freezing`` (weights folded in as constants and prepacked once);
- ``channels-last+freezing``: both.

The settings run in interleaved rounds (each round times ``--calls`` forwards of every setting in
turn), so the machine's drift reaches all alike; printed are the medians over rounds, the ratio
eager / setting, and the largest output difference from eager.

    python benchmarks/unet_compile_modes.py --threads 1 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

MODES = ("eager", "compile", "channels-last", "freezing", "channels-last+freezing")


def prepare(net: torch.nn.Module, mode: str) -> torch.nn.Module:
    net = copy.deepcopy(net)
    if mode == "eager":
        return net
    if "channels-last" in mode:
        net.to(memory_format=torch.channels_last)
    net.compile(options={"freezing": True} if "freezing" in mode else None)
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="images per forward (16: a DDIM run of 16 images)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=5, help="forwards per setting per round")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cvformers.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    cfg = UNetConfig(image_size=32, in_channels=3, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(8,), heads=4, dropout=0.0)
    net = UNet(cfg).eval()
    with torch.no_grad():  # leave the zero-initialised output conv: every branch computes something real
        for p in net.parameters():
            p.normal_(std=0.02)
    x, t = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 1000, (args.batch,))
    nets = {mode: prepare(net, mode) for mode in args.modes}
    times: dict[str, list[float]] = {mode: [] for mode in nets}
    with torch.inference_mode():
        reference = net(x, t)
        for mode, model in nets.items():
            start = time.perf_counter()
            out = model(x, t)  # compiles
            print(f"{mode}: first call {time.perf_counter() - start:.1f} s, "
                  f"max |difference from eager| {(out - reference).abs().max().item():.1e}", flush=True)
        for _ in range(args.rounds):
            for mode, model in nets.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    model(x, t)
                times[mode].append((time.perf_counter() - start) / args.calls * 1000)
    eager = statistics.median(times["eager"]) if "eager" in times else None
    print(f"U-Net forward, batch {args.batch}, {torch.get_num_threads()} thread(s), median of {args.rounds} interleaved rounds:")
    for mode, values in times.items():
        median = statistics.median(values)
        ratio = f"  eager / it: {eager / median:.2f}x" if eager else ""
        print(f"  {mode:24s} {median:7.1f} ms{ratio}")


if __name__ == "__main__":
    main()
