"""Datasets -> (image, caption, record) items, one collate for all of them, and a spec parser.

Every dataset yields dicts ``{"image": FloatTensor[C,H,W] in [0,1], "caption": str,
"label": int (-1 if none), "record": dict | None}``. ``build_dataset`` turns a short spec
string (what ``--data`` takes on the command line) into one:

    shapes                      built-in procedural scenes (cvformers.data.shapes)
    mnist, fashion-mnist        IDX files from the known install locations (cvformers.data.idx)
    mnist:PATH, fashion-mnist:PATH   IDX files in the directory PATH
    folder:PATH                 image + caption files under PATH (cvformers.data.folder)
    wds:DIR, wds:PATTERN        WebDataset tar shards, a folder or a brace pattern such as
                                DIR/shard-{000000..000009}.tar, streamed (cvformers.data.shards)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cvformers.config import ConfigError

KNOWN_SPECS = ("shapes", "mnist", "fashion-mnist", "mnist:PATH", "fashion-mnist:PATH", "folder:PATH", "wds:DIR|PATTERN")


@dataclass
class DataConfig:
    """The ``[data]`` table of a run folder: enough to rebuild the same datasets."""

    name: str = "shapes"  # dataset spec: shapes | mnist | fashion-mnist | mnist:PATH | fashion-mnist:PATH | folder:PATH
    image_size: int = 32  # side of the square images the model sees
    size: int = 0  # items in the train split of procedural data (0: dataset default, 50k for shapes)
    eval_size: int = 0  # items in test/heldout splits of procedural data (0: dataset default, 2k)
    seed: int = 0  # seed of procedural data; test/heldout use their own streams derived from it
    channels: int = 3  # 3: RGB (grayscale data repeated), 1: grayscale
    eval_split: str = "test"  # split used for evaluation during training
    holdout: float = 0.0  # folder data: fraction of files (by path hash) forming the test split; 0 = none
    paraphrase: float = 0.0  # shapes: share of captions in an everyday wording ("the red circle is above ...")
    eval_shards: int = 1  # wds data: the last N shards (sorted by name) form the test split; 0 = none
    shuffle_buffer: int = 1000  # wds data: samples each reader mixes in its shuffle buffer (0/1: shard order)


def collate(items: list[dict]) -> dict:
    """Stack a list of dataset items into a batch; captions and records stay Python lists."""
    if not items:
        raise ValueError("collate: empty batch")
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "label": torch.tensor([int(it.get("label", -1)) for it in items], dtype=torch.long),
        "record": [it.get("record") for it in items],
    }


def _unknown(spec: str) -> ConfigError:
    return ConfigError(f"unknown dataset {spec!r}; known: {', '.join(KNOWN_SPECS)}")


def build_dataset(spec: str, split: str = "train", image_size: int = 32, **kw):
    """Build the dataset named by ``spec`` (see the module docstring) for ``split``.

    Extra keyword arguments go to the dataset class (e.g. ``size``, ``seed`` for shapes,
    ``channels`` for every dataset). Splits: shapes has train/test/heldout; IDX data has
    train/test; a folder is one set of files, unless ``holdout`` splits it into train/test by path hash.
    """
    if not isinstance(spec, str) or not spec:
        raise _unknown(str(spec))
    name, _, path = spec.partition(":")
    if name == "shapes" and not path:
        from cvformers.data.shapes import ShapesDataset

        return ShapesDataset(split=split, image_size=image_size, **kw)
    if name in ("mnist", "fashion-mnist"):
        from cvformers.data.idx import IdxDataset

        return IdxDataset(name, split=split, path=path or None, image_size=image_size, **kw)
    if name == "folder" and path:
        from cvformers.data.folder import FolderDataset

        return FolderDataset(path, image_size=image_size, split=split, **kw)
    if name == "wds" and path:
        from cvformers.data.shards import ShardDataset

        return ShardDataset(path, split=split, image_size=image_size, **kw)
    raise _unknown(spec)


def build_from_config(cfg: DataConfig, split: str = "train"):
    """The dataset a run's ``[data]`` table describes, for ``split``."""
    kw: dict = {"channels": cfg.channels}
    name = cfg.name.partition(":")[0]
    if name == "shapes":
        size = cfg.size if split == "train" else cfg.eval_size
        kw.update(seed=cfg.seed, size=size or None)
        if cfg.paraphrase:
            kw.update(paraphrase=cfg.paraphrase)
    if name == "folder" and cfg.holdout > 0:
        kw.update(holdout=cfg.holdout)
    if name == "wds":
        kw.update(seed=cfg.seed, eval_shards=cfg.eval_shards, shuffle_buffer=cfg.shuffle_buffer)
    return build_dataset(cfg.name, split=split, image_size=cfg.image_size, **kw)


__all__ = ["DataConfig", "KNOWN_SPECS", "build_dataset", "build_from_config", "collate"]
