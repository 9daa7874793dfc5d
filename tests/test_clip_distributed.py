"""Two processes (gloo, CPU) with the gathered contrastive loss == one process on the global batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cvformers.models.clip import CLIP, clip_config

WORLD, PER_RANK = 2, 3


def _model() -> CLIP:
    torch.manual_seed(0)
    return CLIP(clip_config("tiny", vision_width=32, text_width=32, embed_dim=16, context_length=8, vocab_size=50))


def _batch():
    g = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    return {"image": torch.rand(n, 3, 32, 32, generator=g), "text": torch.randint(0, 49, (n, 8), generator=g)}


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        full = _batch()
        local = {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in full.items()}
        loss, _ = model.loss(local)
        loss.backward()
        for p in model.parameters():  # what DDP does: average gradients over processes
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        losses = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            torch.save({"loss": torch.stack(losses).mean(), "grads": {n: p.grad for n, p in model.named_parameters()}}, out)
    finally:
        dist.destroy_process_group()


def test_gathered_loss_matches_global_batch(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)
    model = _model()
    loss, _ = model.loss(_batch())
    loss.backward()
    assert abs(got["loss"].item() - loss.item()) < 1e-5
    for name, p in model.named_parameters():
        assert torch.allclose(got["grads"][name], p.grad, atol=1e-5, rtol=1e-5), name


def test_powersgd_trains_clip_whose_temperature_is_a_scalar(tmp_path):
    # torch's PowerSGD hook views every gradient as a matrix; CLIP's logit scale is 0-dim
    import os
    import subprocess
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nsize = 64\neval_size = 16\n[text]\nbpe_train_captions = 200\n[train]\nsteps = 4\n"
                   "batch_size = 8\nlog_every = 1\neval_every = 0\nwarmup_steps = 0\nddp_comm = \"powersgd\"\n"
                   "powersgd_start = 2\n")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "cvformers", "train", "clip", "--data", "shapes", "--out", str(out), "--config", str(cfg)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"split": "train"' in line]
    assert len(steps) == 4  # steps 3 and 4 ran with compression on
