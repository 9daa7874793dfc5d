"""Image–caption folders: recursion, resize/crop, corrupt and truncated files, caption choice."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from cvformers.data import build_dataset, collate
from cvformers.data.folder import FolderDataset
from cvformers.errors import UserError


def _png_bytes(w, h, colour=(200, 10, 10), mode="RGB"):
    buf = io.BytesIO()
    fill = colour if mode == "RGB" else colour + (0,)
    Image.new(mode, (w, h), fill).save(buf, format="PNG")
    return buf.getvalue()


def _tree(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.png").write_bytes(_png_bytes(64, 40))
    (tmp_path / "a.txt").write_text("a red rectangle\n\n  a  wide red   box \n")
    Image.new("RGB", (30, 50), (0, 0, 255)).save(tmp_path / "sub" / "b.jpg", quality=95)
    (tmp_path / "sub" / "b.txt").write_text("a blue picture\n")
    (tmp_path / "sub" / "deeper" / "c.png").write_bytes(_png_bytes(20, 20, (10, 200, 10), mode="RGBA"))
    (tmp_path / "sub" / "deeper" / "c.txt").write_text("nothing at all\n")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (tmp_path / "corrupt.txt").write_text("broken\n")
    good = _png_bytes(48, 48)
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "truncated.txt").write_text("half a file\n")
    (tmp_path / "nocaption.png").write_bytes(_png_bytes(8, 8))


def test_indexes_resizes_and_skips_broken(tmp_path, caplog):
    _tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cvformers.data"):
        ds = build_dataset(f"folder:{tmp_path}", image_size=16)
    assert len(ds) == 3 and ds.skipped == 2 and ds.uncaptioned == 1
    assert sum("skipped 2 unreadable" in r.getMessage() for r in caplog.records) == 1  # logged once
    items = [ds[i] for i in range(3)]
    assert all(it["image"].shape == (3, 16, 16) for it in items)
    by_path = {it["record"]["path"]: it for it in items}
    assert set(by_path) == {"a.png", "sub/b.jpg", "sub/deeper/c.png"}
    assert by_path["sub/b.jpg"]["image"][2].mean() > 0.9  # blue survives resize + crop
    assert by_path["sub/deeper/c.png"]["image"].min() == 1.0  # transparent -> white
    assert by_path["a.png"]["caption"] in ("a red rectangle", "a wide red box")
    b = collate(items)
    assert b["image"].shape == (3, 3, 16, 16) and b["label"].tolist() == [-1, -1, -1]
    assert ds.captions() == ["a red rectangle", "a wide red box", "a blue picture", "nothing at all"]


def test_multiple_captions_follow_epoch(tmp_path):
    (tmp_path / "x.png").write_bytes(_png_bytes(8, 8))
    lines = [f"caption number {i}" for i in range(6)]
    (tmp_path / "x.txt").write_text("\n".join(lines))
    ds, again = FolderDataset(tmp_path, image_size=8), FolderDataset(tmp_path, image_size=8)
    seen = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        assert ds[0]["caption"] == again[0]["caption"]  # a function of (index, epoch)
        seen.append(ds[0]["caption"])
    assert len(set(seen)) >= 3 and set(seen) <= set(lines)


def test_decode_failure_mid_epoch_substitutes(tmp_path, caplog):
    for name, colour in [("p", (255, 0, 0)), ("q", (0, 255, 0)), ("r", (0, 0, 255))]:
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{name}.jpg")
        (tmp_path / f"{name}.txt").write_text(f"{name}\n")
    ds = FolderDataset(tmp_path, image_size=8)
    assert ds.skipped == 0
    # the file breaks after indexing (JPEG truncation is only caught while decoding)
    data = (tmp_path / "q.jpg").read_bytes()
    (tmp_path / "q.jpg").write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING, logger="cvformers.data"):
        item = ds[1]
        again = ds[1]
    assert item["caption"] == "r" == again["caption"]
    assert ds.skipped == 1 and "q.jpg" in caplog.text
    assert [ds[i]["caption"] for i in range(3)] == ["p", "r", "r"]


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(UserError, match="no captioned images"):
        FolderDataset(tmp_path)
    (tmp_path / "lonely.png").write_bytes(_png_bytes(4, 4))
    with pytest.raises(UserError, match="1 without captions"):
        FolderDataset(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        build_dataset(f"folder:{tmp_path / 'nope'}")


def test_cache_gives_same_pixels(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (24, 36, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "n.png")
    (tmp_path / "n.txt").write_text("noise\n")
    plain, cached = FolderDataset(tmp_path, image_size=12), FolderDataset(tmp_path, image_size=12, cache=True)
    assert (plain[0]["image"] == cached[0]["image"]).all() and (cached[0]["image"] == cached[0]["image"]).all()


def test_holdout_splits_by_path_and_is_stable(tmp_path):
    png = _png_bytes(8, 8)
    for i in range(60):
        (tmp_path / f"img{i:02d}.png").write_bytes(png)
        (tmp_path / f"img{i:02d}.txt").write_text(f"picture number {i}\n")
    names = lambda ds: {p.name for p in ds.files}  # noqa: E731
    train = FolderDataset(tmp_path, image_size=8, split="train", holdout=0.25)
    test = FolderDataset(tmp_path, image_size=8, split="test", holdout=0.25)
    assert names(train).isdisjoint(names(test))
    assert len(train) + len(test) == 60 and 5 <= len(test) <= 25
    assert len(FolderDataset(tmp_path, image_size=8, split="test")) == 60  # no holdout: the whole folder
    (tmp_path / "new.png").write_bytes(png)
    (tmp_path / "new.txt").write_text("a newcomer\n")
    grown = FolderDataset(tmp_path, image_size=8, split="test", holdout=0.25)
    assert names(test) <= names(grown)  # adding a file never moves the old ones
    with pytest.raises(UserError, match="holdout"):
        FolderDataset(tmp_path, image_size=8, holdout=1.5)
    from cvformers.data import DataConfig, build_from_config

    cfg = DataConfig(name=f"folder:{tmp_path}", image_size=8, holdout=0.25)
    assert names(build_from_config(cfg, "test")) == names(grown)
