"""Linear layers prepared for the sampling step: a few rows (one per image) through every weight.

A decode step multiplies B rows (the images of one batch, typically 1-16) by each weight of the
model once. At so few rows PyTorch's default CPU product (MKL sgemm against the transposed
weight) is far from the machine's fp32 rate; oneDNN's inner product, with the weight reordered
once into the blocked layout it picks for B rows, was about 1.6x faster on the project's 2-core
machine at 8 rows and a 256x1024 weight (``python benchmarks/dalle_sampling.py --linear-sizes``),
and it fuses the GELU or the residual add that follows a product into the product. Its calls cost
more, though, so small weights stay on ``F.linear`` (``PACK_MIN_ENTRIES``).

The reordered copies are kept beside the model, not in it (a weak map from each ``nn.Linear`` to
its copy): the model keeps plain tensors that save, pickle and train as before; the copy is made
once (reordering costs ~0.5 ms per MB of weight, several percent of a short sampling run) and
made again when the weight changes (a training step or ``load_state_dict`` bumps its version).
Where oneDNN does not apply (CUDA, a dtype other than fp32, a build without it, autograd on) the
same calls run ``F.linear``; the two agree to float rounding, which the tests check.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN's call costs ~15 us more than F.linear's whatever the size, so a small weight stays plain:
# from 2^17 entries (256x512) up, the packed product was faster at 2 rows and more, and level at 1
# (``python benchmarks/dalle_sampling.py --linear-sizes``, 1 and 2 threads).
PACK_MIN_ENTRIES = 1 << 17

# nn.Linear -> (rows, weight data pointer, weight version, reordered weight)
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def can_pack(weight: torch.Tensor) -> bool:
    """True where the oneDNN path applies and pays: a large enough fp32 CPU weight, a build with oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= PACK_MIN_ENTRIES
            and torch.backends.mkldnn.is_available())


class DecodeLinear:
    """``linear(x)``, ``linear(x)`` then exact GELU, or ``residual + linear(x)`` for x [rows, in]."""

    def __init__(self, linear: nn.Linear, rows: int | None = None):
        """``rows``: pack the weight for products of that many rows (None: plain ``F.linear``)."""
        self.weight, self.bias = linear.weight, linear.bias
        # one row gains nothing (the product is level at best): the packed path serves batches
        self.packed = packed_weight(linear, rows) if rows is not None and rows >= 2 and can_pack(linear.weight) else None
        if self.packed is not None:  # the resolved overloads: a call skips the overload lookup (~3 us)
            self._unary = torch.ops.mkldnn._linear_pointwise.default
            self._binary = torch.ops.mkldnn._linear_pointwise.binary

    def _use_packed(self, x: torch.Tensor) -> bool:
        # oneDNN's packed operators have no autograd formula; they serve inference only
        return self.packed is not None and not (torch.is_grad_enabled() and x.requires_grad)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_packed(x):
            return self._unary(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(linear(x)), the exact (erf) GELU of ``nn.GELU()``."""
        if self._use_packed(x):
            return self._unary(x, self.packed, self.bias, "gelu", [], "none")
        return F.gelu(F.linear(x, self.weight, self.bias))

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + linear(x): the residual connection fused into the product."""
        if self._use_packed(x):
            return self._binary(x, residual, self.packed, self.bias, "add")
        return residual + F.linear(x, self.weight, self.bias)


def packed_weight(linear: nn.Linear, rows: int) -> torch.Tensor | None:
    """The weight of ``linear`` reordered for ``rows``-row products, made once per weight version."""
    w = linear.weight
    key = (rows, w.data_ptr(), 0 if w.is_inference() else w._version)  # inference tensors have no version
    hit = _PACKED.get(linear)
    if hit is not None and hit[:3] == key:
        return hit[3]
    try:  # a private operator (the one torch.compile's CPU backend uses): fall back if it moved
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)
    except (AttributeError, RuntimeError):
        packed = None
    _PACKED[linear] = (*key, packed)
    return packed
