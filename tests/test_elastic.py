"""Elastic restarts: under ``torchrun --max-restarts 1`` a worker killed with SIGKILL is started again with
the others, and the run resumes from its last checkpoint by itself, ending with the weights of an
uninterrupted run.

Run as a script by ``torch.distributed.run``, this file trains the toy model (with dropout, so the
per-process RNG must come back too) into ``argv[1]``; ``--kill-at STEP`` makes rank 1 of the first
attempt SIGKILL itself after step STEP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from trainer_toys import toy_setup  # noqa: E402

from cvformers.train import TrainConfig, Trainer, TrainerHook  # noqa: E402


def config() -> TrainConfig:
    return TrainConfig(steps=8, batch_size=4, grad_accum=1, lr=1e-2, warmup_steps=1, checkpoint_every=2,
                       eval_every=0, log_every=1)


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "--max-restarts", "1",
           __file__, str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow  # two torchrun launches and a restart: about 25 s alone, more on a loaded machine
def test_a_killed_worker_is_restarted_and_the_run_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    straight = _torchrun(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _torchrun(tmp_path / "killed", "--kill-at", "5")
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "exitcode: -9" in killed.stderr  # torchrun saw the SIGKILL …
    assert (tmp_path / "killed/attempts.txt").read_text().split() == ["0", "1"]  # … and started the workers again
    steps = [line.split()[1] for line in killed.stderr.splitlines() if line.startswith("step ")]
    assert steps == ["1/8", "2/8", "3/8", "4/8", "5/8", "5/8", "6/8", "7/8", "8/8"]  # step 5 again, from checkpoint 4
    a, b = load_file(str(tmp_path / "straight/model.safetensors")), load_file(str(tmp_path / "killed/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Die(TrainerHook):
    """SIGKILL rank 1 after optimizer step ``at`` (1-based) of the first attempt."""

    name = "die"

    def __init__(self, at: int):
        self.at = at

    def after_step(self, model, step):
        if step + 1 == self.at and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    setup = toy_setup(config(), dropout=0.2)
    if "--kill-at" in sys.argv:
        setup.hooks.append(_Die(int(sys.argv[sys.argv.index("--kill-at") + 1])))
    trainer = Trainer(setup, out)
    if os.environ.get("RANK") == "0":
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "attempts.txt", "a") as f:
            f.write(f"{os.environ.get('TORCHELASTIC_RESTART_COUNT')}\n")
    trainer.fit()
