"""Gradient caching for CLIP's contrastive loss: activation memory and time vs the plain loss.

For a batch of N pairs the plain loss keeps every activation of both towers for backward;
the gradient-cached loss (CLIP ``micro_batch = m``, Gao et al. 2021) keeps those of one
micro-batch at a time plus the N x D embeddings, and pays one more forward pass. Measured
here: the peak bytes of tensors saved for backward (unique storages, parameters excluded,
counted with autograd's saved-tensor hooks — exact and machine-independent), seconds per
training step, and the largest gradient difference to the plain loss.

    python benchmarks/clip_gradcache.py [--batch 256] [--micro 16 64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cvformers.models.clip import CLIP, clip_config


class SavedTensorMeter:
    """Live and peak bytes of the distinct storages autograd holds for backward."""

    def __init__(self, params):
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list] = {}  # storage ptr -> [references, bytes]
        self.bytes = self.peak = 0

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.param_storages:
            return t
        entry = self.live.setdefault(ptr, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.bytes += entry[1]
            self.peak = max(self.peak, self.bytes)
        entry[0] += 1
        return _Held(t, ptr, self)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.bytes -= entry[1]
            del self.live[ptr]


class _Held:
    def __init__(self, t, ptr, meter):
        self.t, self.ptr, self.meter = t, ptr, meter

    def __del__(self):
        self.meter.release(self.ptr)


def step(model: CLIP, batch: dict) -> tuple[float, int, dict]:
    model.zero_grad(set_to_none=True)
    meter = SavedTensorMeter(model.parameters())
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        loss, _ = model.loss(batch)
        loss.backward()
    seconds = time.perf_counter() - t0
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return seconds, meter.peak, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--micro", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CLIP(clip_config(args.preset, micro_batch=0))
    cfg = model.cfg
    batch = {"image": torch.rand(args.batch, 3, cfg.image_size, cfg.image_size),
             "text": torch.randint(0, cfg.vocab_size, (args.batch, cfg.context_length))}
    reference = None
    for micro in [0, *args.micro]:
        model.cfg.micro_batch = micro
        times, peak = [], 0
        for _ in range(args.repeats):
            seconds, peak, grads = step(model, batch)
            times.append(seconds)
        if reference is None:
            reference, diff = grads, 0.0
        else:
            diff = max((grads[n] - reference[n]).abs().max().item() for n in grads)
        print(json.dumps({"preset": args.preset, "batch": args.batch, "micro_batch": micro or None,
                          "peak_saved_MB": round(peak / 2**20, 1), "s_per_step": round(min(times), 3),
                          "max_grad_diff": diff}))


if __name__ == "__main__":
    main()
