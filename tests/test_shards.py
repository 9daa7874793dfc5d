"""WebDataset tar shards: written from a dataset spec, streamed back, corrupt samples skipped and counted,
one shard set per process, and a streamed run that resumes where it stopped."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("webdataset")

from cvformers.cli import main  # noqa: E402
from cvformers.data import build_dataset  # noqa: E402
from cvformers.data.shards import ShardDataset  # noqa: E402
from cvformers.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """25 shapes scenes, 16 px, 5 a shard: train = shards 0-3 (20 items), test = shard 4."""
    out = tmp_path_factory.mktemp("wds") / "shapes"
    assert main(["data", "shards", "shapes", "--out", str(out), "--shard-size", "5", "--limit", "25",
                 "--image-size", "16"]) == 0
    return out


def _source():
    return build_dataset("shapes", split="train", image_size=16)


def test_shards_and_index_are_written(shards):
    index = json.loads((shards / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [5] * 5 and index["total"] == 25
    with tarfile.open(shards / "shard-000001.tar") as tar:
        names = tar.getnames()
    assert names == sorted(names) and names[:3] == ["00000005.json", "00000005.png", "00000005.txt"]


def test_read_back_equals_the_source(shards):
    src = _source()
    test = list(build_dataset(f"wds:{shards}", split="test", image_size=16))
    assert len(test) == 5  # the last shard, in order
    for k, item in enumerate(test):
        ref = src[20 + k]
        assert item["caption"] == ref["caption"] and item["record"] == ref["record"]
        assert (item["image"] - ref["image"]).abs().max() <= 1 / 255 + 1e-6  # PNG keeps 8 bits
    train = ShardDataset(str(shards / "shard-{000000..000004}.tar"), split="train", image_size=16, shuffle_buffer=8)
    captions = sorted(it["caption"] for it in train)
    assert captions == sorted(src[i]["caption"] for i in range(20)) and len(train) == 20
    assert [it["caption"] for it in train] != [src[i]["caption"] for i in range(20)]  # shuffled


def test_a_pattern_matching_nothing_is_a_user_error(tmp_path, capsys):
    with pytest.raises(UserError, match="matches no file"):
        build_dataset(f"wds:{tmp_path}/shard-{{000000..000003}}.tar")
    assert main(["train", "dvae", "--data", f"wds:{tmp_path}/none-{{0..3}}.tar", "--out", str(tmp_path / "r"),
                 "--steps", "1"]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_a_corrupt_member_is_skipped_and_counted(shards, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in shards.glob("*.tar"):
        (bad / f.name).write_bytes(f.read_bytes())
    # rewrite shard 0 with the image of sample 2 replaced by garbage
    with tarfile.open(shards / "shard-000000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(bad / "shard-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == "00000002.png":
                data = b"\x89PNG\r\n\x1a\n not a png at all"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    ds = ShardDataset(str(bad), split="train", image_size=16, shuffle_buffer=0)
    items = list(ds)  # no exception mid-epoch
    assert len(items) == 19 and ds.skipped == 1
    assert _source()[2]["caption"] not in {it["caption"] for it in items[:4]}


def test_two_ranks_read_disjoint_shards(shards, monkeypatch):
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = ShardDataset(str(shards), split="train", image_size=16, shuffle_buffer=4)
        seen.append([json.dumps(it["record"], sort_keys=True) for it in ds])
    assert len(seen[0]) == len(seen[1]) == 10  # 4 train shards, 2 each
    assert not set(seen[0]) & set(seen[1])
    src = _source()
    assert sorted(seen[0] + seen[1]) == sorted(json.dumps(src[i]["record"], sort_keys=True) for i in range(20))


def test_resume_from_skips_what_was_consumed(shards):
    full = [it["caption"] for it in ShardDataset(str(shards), image_size=16, shuffle_buffer=8, seed=3)]
    ds = ShardDataset(str(shards), image_size=16, shuffle_buffer=8, seed=3)
    ds.resume_from(3, 2)  # three batches of two already trained on
    assert [it["caption"] for it in ds] == full[6:]
    ds.set_epoch(1)
    ds.resume_from(0, 2)
    assert [it["caption"] for it in ds] != full  # each epoch its own shard order and buffer draw


class MeanColour(nn.Module):
    """Predicts an image's mean colour from its pixels: a tiny model for streamed batches."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8), nn.Tanh(), nn.Linear(8, 3))

    def loss(self, batch):
        loss = F.mse_loss(self.net(batch["image"]), batch["image"].mean(dim=(2, 3)))
        return loss, {}


def _setup(shards):
    from cvformers.train import TrainConfig
    from cvformers.train.setup import TaskSetup

    torch.manual_seed(0)
    data = ShardDataset(str(shards), image_size=16, shuffle_buffer=8, seed=1)
    cfg = TrainConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=3, eval_every=4, log_every=1)
    return TaskSetup(kind="toy-mean-colour", model=MeanColour(), model_config={}, train_config=cfg,
                     train_data=data, eval_data=ShardDataset(str(shards), split="test", image_size=16))


def test_a_streamed_run_resumes_exactly(shards, tmp_path):
    from safetensors.torch import load_file

    from cvformers.train import Trainer
    from cvformers.train.checkpoint import load_trainer_state

    Trainer(_setup(shards), tmp_path / "straight").fit()  # 8 steps of 4 = epoch 0 (5 batches) and 3 of epoch 1
    Trainer(_setup(shards), tmp_path / "split").fit(until=4)
    assert load_trainer_state(tmp_path / "split")["data"]["stream"] == [[0, 4]]
    Trainer(_setup(shards), tmp_path / "split", resume=True).fit()
    a, b = load_file(str(tmp_path / "straight/model.safetensors")), load_file(str(tmp_path / "split/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [json.loads(ln) for ln in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["split"] == "eval"] == [4, 8]


def test_too_few_shards_for_the_readers_is_refused(shards, tmp_path):
    from cvformers.train import Trainer

    setup = _setup(shards)
    setup.train_config.num_workers = 5  # 4 train shards cannot feed 5 workers
    with pytest.raises(UserError, match="shard"):
        Trainer(setup, tmp_path / "r").fit()


def test_tasks_that_cache_per_item_refuse_a_stream(shards):
    from cvformers.tasks import indexed_data

    with pytest.raises(UserError, match="indexed data"):
        indexed_data(ShardDataset(str(shards), image_size=16), "dalle")
    shapes = _source()
    assert indexed_data(shapes, "dalle") is shapes


def test_two_ranks_with_two_workers_each_read_every_sample_once_per_epoch(shards, monkeypatch):
    from torch.utils.data import DataLoader

    from cvformers.data import collate

    records = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = ShardDataset(str(shards), split="train", image_size=16, shuffle_buffer=4)
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
            records.append([json.dumps(r, sort_keys=True) for batch in loader for r in batch["record"]])
    src = sorted(json.dumps(_source()[i]["record"], sort_keys=True) for i in range(20))
    for epoch in (0, 1):  # ranks 0 and 1 of one epoch: 4 readers, one shard each, every sample once
        assert sorted(records[epoch] + records[2 + epoch]) == src
