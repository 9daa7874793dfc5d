"""FSDP2 under torchrun (2 gloo processes on CPU) trains like one process on the same global batch, and its
sharded (DCP) checkpoints load in one process, resume there and export to model.safetensors.

Run as a script by ``torch.distributed.run`` (see ``_torchrun``), this file trains the toy block model
into ``argv[1]`` with ``parallel = "fsdp"``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from trainer_toys import toy_blocks_setup  # noqa: E402

from cvformers.train import TrainConfig, Trainer  # noqa: E402

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    HAS_FSDP2 = True
except ImportError:
    HAS_FSDP2 = False


def config(batch_size: int, parallel: str = "ddp", steps: int = 4, ac: bool = False) -> TrainConfig:
    # grad_clip 0.05 clips every step, so the norm over sharded gradients is exercised too
    return TrainConfig(steps=steps, batch_size=batch_size, grad_accum=2, lr=2e-2, warmup_steps=1, grad_clip=0.05,
                       checkpoint_every=2, eval_every=2, log_every=1, parallel=parallel,
                       activation_checkpointing=ac)


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           __file__, str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.mark.skipif(not HAS_FSDP2, reason="FSDP2 (fully_shard) needs torch >= 2.6")
def test_fsdp_matches_one_process_and_its_checkpoint_resumes_in_one(tmp_path):
    from cvformers.cli import main
    from cvformers.train.checkpoint import checkpoint_dir, load_trainer_state

    # 2 processes x 4 items x 2 micro-batches = one process x 8 x 2: the same global batch every step
    proc = _torchrun(tmp_path / "fsdp", "--until", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = checkpoint_dir(tmp_path / "fsdp")
    assert where.name == "step-00000003" and sorted(p.name for p in (where / "dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shards
    state = load_trainer_state(tmp_path / "fsdp")
    assert state["sharded"] and state["step"] == 3 and len(state["rng"]) == 2

    Trainer(toy_blocks_setup(config(8)), tmp_path / "one_3").fit(until=3)
    # exported in this one process from the 2-process shards
    assert main(["export", str(tmp_path / "fsdp")]) == 0
    _close(_weights(tmp_path / "fsdp/model.safetensors"), _weights(tmp_path / "one_3/model.safetensors"))

    # the sharded checkpoint (model + AdamW moments) resumes in one process; step 4 matches a straight run
    Trainer(toy_blocks_setup(config(8)), tmp_path / "fsdp", resume=True).fit()
    Trainer(toy_blocks_setup(config(8)), tmp_path / "one").fit()
    _close(_weights(tmp_path / "fsdp/model.safetensors"), _weights(tmp_path / "one/model.safetensors"))
    straight = _weights(tmp_path / "one/model.safetensors")
    assert not all(torch.allclose(straight[k], _weights(tmp_path / "one_3/model.safetensors")[k]) for k in straight)


@pytest.mark.slow  # a second torchrun launch; the default suite keeps the one above
@pytest.mark.skipif(not HAS_FSDP2, reason="FSDP2 (fully_shard) needs torch >= 2.6")
def test_fsdp_whole_run_with_activation_checkpointing_matches_one_process(tmp_path):
    proc = _torchrun(tmp_path / "fsdp", "--ac")
    assert proc.returncode == 0, proc.stderr[-3000:]
    Trainer(toy_blocks_setup(config(8)), tmp_path / "one").fit()
    # written at the end of the run, gathered from both processes' shards
    _close(_weights(tmp_path / "fsdp/model.safetensors"), _weights(tmp_path / "one/model.safetensors"))


def test_fsdp_without_torchrun_is_refused(tmp_path):
    from cvformers.errors import UserError

    with pytest.raises(UserError, match="torchrun" if HAS_FSDP2 else "torch >= 2.6"):
        Trainer(toy_blocks_setup(config(8, parallel="fsdp")), tmp_path / "r").fit()


def test_an_unknown_parallel_mode_is_refused():
    from cvformers.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="parallel"):
        from_dict(TrainConfig, {"parallel": "zero3"}, "train")


def test_blocks_are_found_generically():
    from trainer_toys import ToyBlocks, ToyBlocksConfig

    from cvformers.train.fsdp import find_blocks

    model = ToyBlocks(ToyBlocksConfig(depth=3))
    assert find_blocks(model) == list(model.blocks)
    from cvformers.models.vision import create_model

    vit = create_model("vit_nano_patch4_28")
    assert find_blocks(vit) == list(vit.blocks) and len(vit.blocks) == 6  # the transformer blocks, not their parts


if __name__ == "__main__":
    out = Path(sys.argv[1])
    until = int(sys.argv[sys.argv.index("--until") + 1]) if "--until" in sys.argv else None
    setup = toy_blocks_setup(config(4, parallel="fsdp", ac="--ac" in sys.argv))
    Trainer(setup, out).fit(until=until)
    # really sharded: every parameter but the scalar a DTensor; this process holds half the rows of each block's weights
    for name, p in setup.model.named_parameters():
        assert (type(p).__name__ == "DTensor") == (name != "scale"), name
        if name.startswith("blocks.") and p.ndim == 2:
            assert p.to_local().shape[0] == p.shape[0] // 2, (name, p.to_local().shape, p.shape)
