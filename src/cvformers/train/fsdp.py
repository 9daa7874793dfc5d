"""Sharded data parallelism with FSDP2 (``torch.distributed.fsdp.fully_shard``), and activation checkpointing.

``[train] parallel = "fsdp"`` under ``torchrun`` shards parameters, gradients and optimizer state
across the processes instead of replicating them as DDP does: each transformer block is one FSDP
unit whose parameters are all-gathered just before its forward (and again before its backward) and
freed after, and its gradients are reduce-scattered, so a process holds 1/N of the model's state
plus one block at full size (PyTorch's FSDP2 design, https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html;
Zhao et al. 2023, "PyTorch FSDP", arXiv:2304.11277). The root unit holds what lies outside the
blocks (embeddings, heads, norms).

Blocks are found generically: a model may list them (``fsdp_blocks()``), otherwise every item of an
``nn.ModuleList`` that holds parameters and is not inside another such item (``blocks`` of ViT,
DALL-E, CLIP's towers, the U-Net's levels) is a unit.

Activation checkpointing (``[train] activation_checkpointing = true``, with either parallel mode)
recomputes each block's forward during backward instead of keeping its activations
(Chen et al. 2016, arXiv:1604.06174): activation memory falls to about one block's, for roughly a
third more compute.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from torch import nn

from cvformers.errors import UserError

MixedPrecision = Literal["auto", "fp32", "bf16"]


def fsdp2():
    """``(fully_shard, MixedPrecisionPolicy)``: public in torch >= 2.6; refused with one line before."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as e:
        raise UserError(f"[train] parallel = \"fsdp\" needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); "
                        f"this is torch {torch.__version__}") from e
    return fully_shard, MixedPrecisionPolicy


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: its ``fsdp_blocks()``, or the outermost ``nn.ModuleList`` items
    with parameters (a block's own inner lists belong to it)."""
    if hasattr(model, "fsdp_blocks"):
        return list(model.fsdp_blocks())
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(t + ".") for t in taken):
            continue
        for i, child in enumerate(module):
            if any(p.requires_grad for p in child.parameters()):
                blocks.append(child)
                taken.append(f"{name}.{i}" if name else str(i))
    return blocks


def mixed_precision_dtypes(choice: MixedPrecision, device: torch.device) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(param_dtype, reduce_dtype) of FSDP's mixed-precision policy; None keeps the parameters' fp32.

    "auto" is bf16 on CUDA and fp32 on CPU (bf16 matmuls are slow on most CPUs). With bf16 the
    forward and backward compute in bf16 from bf16 copies of the gathered parameters, gradients
    are reduced in fp32 (torchtitan's default, for an exact-enough sum over many processes) and the
    sharded master weights and optimizer state stay fp32.
    """
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    if choice == "bf16":
        return torch.bfloat16, torch.float32
    return None, None


def shard(module: nn.Module, blocks: list[nn.Module], device: torch.device, precision: MixedPrecision) -> list[nn.Parameter]:
    """Apply ``fully_shard`` to each block, then to ``module`` as the root (FSDP2 wants children first).

    ``module`` is what the trainer calls (its forward runs ``model.loss``), so that the root's
    pre-forward hook gathers the parameters outside the blocks. Parameters become DTensors in place:
    build the optimizer afterwards. Returns the scalar parameters (CLIP's temperature), which FSDP2
    cannot shard: they stay whole on every process, and ``average_replicated_grads`` must average
    their gradients.
    """
    import inspect

    fully_shard, MixedPrecisionPolicy = fsdp2()
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    param_dtype, reduce_dtype = mixed_precision_dtypes(precision, device)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    scalars = [p for p in module.parameters() if p.ndim == 0]
    kwargs: dict[str, Any] = {}
    if scalars:
        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise UserError(f"{type(module).__name__} has scalar parameters, which fully_shard in torch "
                            f"{torch.__version__} cannot hold; fsdp needs torch >= 2.7 for this model")
        kwargs["ignored_params"] = set(scalars)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, **kwargs)
    fully_shard(module, mesh=mesh, mp_policy=policy, **kwargs)
    return scalars


def average_replicated_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of the parameters FSDP left whole (the same all-reduce DDP would do)."""
    world = torch.distributed.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # every process must join the all-reduce
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(world)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over a mix of sharded (DTensor) and whole gradients.

    The norm of the sharded ones needs one all-reduce of their partial sums (``full_tensor``);
    the whole ones are the same on every process and are added once.
    """
    from torch.nn.utils import get_total_norm

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    whole = [g for g in grads if not hasattr(g, "full_tensor")]
    parts = []
    if sharded:
        parts.append(full_norm(get_total_norm(sharded)).float().cpu())
    if whole:
        parts.append(get_total_norm(whole).float().cpu())
    total = torch.stack(parts).norm() if parts else torch.zeros(())
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def checkpoint_activations(blocks: list[nn.Module]) -> None:
    """Make each block recompute its forward in backward (non-reentrant ``torch.utils.checkpoint``).

    The block's ``forward`` is replaced on the instance, so hooks (FSDP's gathers) and state-dict
    keys stay as they were.
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward

        def forward(*args: Any, _inner=inner, **kwargs: Any):
            if not torch.is_grad_enabled():  # evaluation and sampling keep the plain forward
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = functools.wraps(inner)(forward)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm over sharded (DTensor) gradients as a plain tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
