"""Training throughput, peak memory per process and bytes exchanged per step: one process against
two under torchrun (DDP, DDP with PowerSGD, FSDP), for CLIP and DALL-E on `shapes`.

    python benchmarks/scale_throughput.py [--tasks clip,dalle] [--steps 30] [--batch-size 32]

Every run trains the same model from the CLI for ``--steps`` steps with one thread per process
(on CPU with gloo). ``[train] batch_size`` is per process, so two processes train a global batch
twice as large: images/s is the global rate, the median of the logged windows after the first.
Peak memory is the largest resident set (``VmHWM``) any training process reached. Bytes a process
sends per step are computed from the model's parameter shapes, as the collectives move them:

* DDP (ring all-reduce of fp32 gradients): ``2 (K-1)/K x 4 x parameters``;
* PowerSGD of rank r: each matrix gradient m x n becomes P (m x r) and Q (n x r), each all-reduced,
  vectors go whole: ``2 (K-1)/K x 4 x (sum r(m+n) + vector parameters)``;
* FSDP (fp32): an all-gather of the parameters in forward, again in backward, and a reduce-scatter
  of the gradients: ``3 (K-1)/K x 4 x parameters``.

On a 2-core CPU two processes share the cores one gets alone, so the images/s here show the
overhead of the collectives and of sharding, not the speed-up of a second GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK_ARGS = {
    "clip": ["--data", "shapes"],
    "dalle": ["--data", "shapes", "--vae", "default/vae"],
}
# small data so that DALL-E's one-off encoding of the images stays out of the way
DATA_TABLE = "[data]\nsize = 4096\neval_size = 256\n"


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out += [int(c) for c in text]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _peak_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _is_trainer(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"cvformers" in cmd and b"torchrun" not in b" ".join(cmd) and b"train" in cmd


def run(task: str, procs: int, mode: str, steps: int, batch: int, workdir: Path) -> dict:
    out = workdir / f"{task}-{mode}-{procs}"
    cfg = workdir / f"{task}-{mode}.toml"
    parallel = "fsdp" if mode == "fsdp" else "ddp"
    comm = "powersgd" if mode == "powersgd" else "allreduce"
    cfg.write_text(f"{DATA_TABLE}[train]\nsteps = {steps}\nbatch_size = {batch}\nlog_every = 5\neval_every = 0\n"
                   f"checkpoint_every = {steps}\nwarmup_steps = 0\nparallel = \"{parallel}\"\nddp_comm = \"{comm}\"\n"
                   "powersgd_start = 0\n")
    train = ["-m", "cvformers", "train", task, *TASK_ARGS[task], "--out", str(out), "--config", str(cfg)]
    if procs == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *train]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            if _is_trainer(pid):
                peaks[pid] = max(peaks.get(pid, 0), _peak_kib(pid))
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"{task} {mode} x{procs} failed:\n{proc.stderr.read()[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["items_per_s"] for r in rows if r.get("split") == "train" and "items_per_s" in r][1:]
    return {"task": task, "mode": mode, "processes": procs, "images_per_s": round(statistics.median(speeds), 1),
            "peak_rss_mib": round(max(peaks.values(), default=0) / 1024)}


def exchanged_bytes(task: str, procs: int, powersgd_rank: int = 2) -> dict[str, float]:
    """Bytes each process sends per step for DDP, PowerSGD and FSDP, from the parameter shapes."""
    from cvformers.loading import load_run

    model = load_run(f"default{'/clip' if task == 'clip' else ''}")[0]
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    params = sum(s.numel() for s in shapes)
    compressed = sum(powersgd_rank * (s[0] + s[1:].numel()) if len(s) > 1 else s.numel() for s in shapes)
    k = (procs - 1) / procs
    return {"ddp_mb": 2 * k * 4 * params / 1e6, "powersgd_mb": 2 * k * 4 * compressed / 1e6,
            "fsdp_mb": 3 * k * 4 * params / 1e6, "parameters": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="clip,dalle")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for task in a.tasks.split(","):
            for procs, mode in ((1, "single"), (2, "ddp"), (2, "powersgd"), (2, "fsdp")):
                print(json.dumps(run(task, procs, mode, a.steps, a.batch_size, Path(tmp))), flush=True)
            print(json.dumps({"task": task, "bytes_per_step_per_process": exchanged_bytes(task, 2)}), flush=True)


if __name__ == "__main__":
    main()
