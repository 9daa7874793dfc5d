"""WebDataset tar shards: writing any dataset spec into them, and streaming them back.

A shard is a plain tar file whose members are grouped by key (the WebDataset convention,
https://github.com/webdataset/webdataset): ``00000042.png`` (the image), ``00000042.txt`` (its
caption) and ``00000042.json`` (``{"label": int, "record": ...}``), keys in increasing order.
``write_shards`` writes ``shard-000000.tar``, ``shard-000001.tar`` … and ``index.json`` (the
shards with their item counts) into a folder; ``cvformers data shards SRC --out DIR`` calls it.

``ShardDataset`` (``--data wds:DIR`` or ``--data wds:DIR/shard-{000000..000009}.tar``) reads them
with the ``webdataset`` package as a stream, the way large text-image runs read their data:

- **Splits by shard.** Shards are taken in sorted order; the last ``eval_shards`` of them (default
  1) are the ``test`` split, the others ``train``. Adding shards at the end therefore moves the
  held-out shard; keep a fixed list (a brace pattern) to keep it fixed.
- **Each process and each DataLoader worker reads its own shards** (``wds.split_by_node``, then
  ``wds.split_by_worker``), after a shard order shuffled per (seed, epoch); within a worker a
  shuffle buffer of ``shuffle_buffer`` samples mixes neighbouring shards.
- **Corrupt samples never stop an epoch.** A tar member that cannot be read or an image that
  cannot be decoded is skipped, logged and counted in ``dataset.skipped`` (per process: DataLoader
  workers keep their own counts).
- **Resuming is close, not exact, in general.** The trainer records per process how many batches
  of the current epoch it consumed; on resume each worker rebuilds the same shuffled stream (it is
  seeded by seed, epoch, rank and worker) and drops the raw samples it had already delivered
  *before decoding them*. That is exact (the same batches follow as in an uninterrupted run) when
  every worker still had data at the stopping point and no corrupt sample lay in the part already
  seen; otherwise each worker is off by the samples it lost or skipped. Streaming data cannot be
  addressed by index, so tasks that cache per-item results (dalle, the unCLIP stages) need indexed
  data (``folder:PATH``, ``shapes``) and refuse ``wds:``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from cvformers.errors import UserError
from cvformers.images import pil_to_tensor, png_bytes, read_image_bytes, resize_center_crop

log = logging.getLogger("cvformers.data")

INDEX = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
FORMAT = "cvformers-shards/1"


def _webdataset():
    try:
        import webdataset
    except ImportError as e:  # an optional dependency: the `scale` extra
        raise UserError("wds: data needs the webdataset package: pip install 'cvformers[scale]'") from e
    return webdataset


# --- writing ------------------------------------------------------------------------------------

@dataclass
class ShardWriteConfig:
    """How ``cvformers data shards`` cuts a dataset into tar shards."""

    shard_size: int = 1000  # samples per shard (the last shard holds the rest)
    limit: int | None = None  # stop after this many samples (None: the whole split)
    image_size: int = 64  # side of the square PNGs written (the dataset's own resize-and-crop rule)
    split: str = "train"  # which split of the source dataset to write

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be >= 1, got {self.limit}")
        if self.image_size < 1:
            raise UserError(f"--image-size must be >= 1, got {self.image_size}")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: the same data gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(source: Any, out: str | Path, cfg: ShardWriteConfig, progress: bool = True,
                 describe: str = "") -> dict[str, Any]:
    """Write the items of ``source`` (any map-style dataset of this package) as tar shards in ``out``.

    Each shard is written under a temporary name and renamed when complete, and ``index.json`` is
    written last, so a folder with an index holds only complete shards. Returns the index.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX).exists() or any(out.glob("shard-*.tar")):
        raise UserError(f"{out} already holds shards; choose an empty --out")
    total = len(source) if cfg.limit is None else min(cfg.limit, len(source))
    if total == 0:
        raise UserError(f"{describe or 'the dataset'} has no items to write")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="item", desc=f"writing shards to {out}", dynamic_ncols=True)
    shards: list[dict[str, Any]] = []
    for first in range(0, total, cfg.shard_size):
        name = SHARD_NAME.format(len(shards))
        tmp = out / f".{name}.tmp"
        count = min(cfg.shard_size, total - first)
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(first, first + count):
                item = source[i]
                key = f"{i:08d}"
                meta = {"label": int(item.get("label", -1)), "record": item.get("record")}
                # members in sorted suffix order: json, png, txt
                _tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                _tar_member(tar, f"{key}.png", png_bytes(item["image"]))
                _tar_member(tar, f"{key}.txt", item["caption"].encode())
                if bar is not None:
                    bar.update(1)
        os.replace(tmp, out / name)
        shards.append({"name": name, "count": count})
    if bar is not None:
        bar.close()
    index = {"format": FORMAT, "source": describe, "split": cfg.split, "image_size": cfg.image_size,
             "total": total, "shards": shards}
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / INDEX)
    return index


# --- reading ------------------------------------------------------------------------------------

def resolve_shards(pattern: str) -> tuple[list[str], dict[str, int]]:
    """The shard files a ``wds:`` spec names, sorted, and the item count of each where an
    ``index.json`` beside them gives it. A folder means every ``*.tar`` in it."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.tar"))
        folder = path
    else:
        import braceexpand

        names = list(braceexpand.braceexpand(str(path)))
        missing = [n for n in names if not Path(n).is_file()]
        if len(missing) == len(names):
            raise UserError(f"wds:{pattern} matches no file")
        if missing:
            raise UserError(f"wds:{pattern}: {len(missing)} of {len(names)} shards are missing, e.g. {missing[0]}")
        files = sorted(names)
        folder = path.parent
    if not files:
        raise UserError(f"wds:{pattern} matches no file (no *.tar in the folder)")
    counts: dict[str, int] = {}
    index = folder / INDEX
    if index.is_file():
        try:
            listed = json.loads(index.read_text())["shards"]
            counts = {str(folder / s["name"]): int(s["count"]) for s in listed}
        except (ValueError, KeyError, TypeError):
            log.warning("%s is not a shard index; item counts unknown", index)
    return files, counts


class ShardDataset(IterableDataset):
    """Items ``{"image", "caption", "label", "record"}`` streamed from WebDataset tar shards
    (see the module docstring for splits, shuffling, corrupt samples and resuming)."""

    def __init__(self, pattern: str, split: str = "train", image_size: int = 32, channels: int = 3,
                 seed: int = 0, eval_shards: int = 1, shuffle_buffer: int = 1000):
        if split not in ("train", "test"):
            raise UserError(f"wds: data has the splits train and test (the last {eval_shards} shard(s)), not {split!r}")
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels}")
        if eval_shards < 0 or shuffle_buffer < 0:
            raise UserError(f"data.eval_shards and data.shuffle_buffer must be >= 0, got {eval_shards}, {shuffle_buffer}")
        files, counts = resolve_shards(pattern)
        if split == "test" and eval_shards == 0:
            raise UserError(f"wds:{pattern}: no test split (data.eval_shards = 0)")
        if eval_shards >= len(files):
            raise UserError(f"wds:{pattern}: {len(files)} shard(s) cannot give {eval_shards} eval shard(s) and a "
                            "train split; write more shards or lower data.eval_shards")
        cut = len(files) - eval_shards
        self.urls = files[:cut] if split == "train" else files[cut:]
        self.pattern, self.split = pattern, split
        self.image_size, self.channels, self.seed, self.shuffle_buffer = image_size, channels, seed, shuffle_buffer
        self.num_items = sum(counts[u] for u in self.urls) if all(u in counts for u in self.urls) else None
        self.epoch = 0
        self.skip_batches, self.batch_size = 0, 0
        self.skipped = 0  # corrupt samples passed over in this process

    # The trainer recognises a stream by these two methods (and IterableDataset).
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_from(self, batches: int, batch_size: int) -> None:
        """Start the current epoch after the ``batches`` batches of ``batch_size`` this process consumed."""
        self.skip_batches, self.batch_size = int(batches), int(batch_size)

    def __len__(self) -> int:
        if self.num_items is None:
            raise _UnknownLength(f"wds:{self.pattern}: the item count is unknown (no index.json beside the shards)")
        return self.num_items

    def __getitem__(self, index: int):
        raise UserError("wds: shards are streamed, not read by index; this task needs indexed data "
                        "(folder:PATH, shapes, mnist) — see docs/scale.md")

    def _on_error(self, exn: Exception) -> bool:
        """webdataset's ``handler``: count and log the sample, then go on (True)."""
        self.skipped += 1
        log.warning("wds: skipping a corrupt sample (%s: %s); %d skipped so far in this process",
                    type(exn).__name__, exn, self.skipped)
        return True

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        image_key = next((k for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        if image_key is None or "txt" not in sample:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks an image or a caption")
        name = f"{sample.get('__url__')}:{sample.get('__key__')}.{image_key}"
        im = resize_center_crop(read_image_bytes(sample[image_key], self.channels, name), self.image_size)
        meta = json.loads(sample["json"]) if "json" in sample else {}
        return {"image": pil_to_tensor(im), "caption": " ".join(sample["txt"].decode("utf-8", "replace").split()),
                "label": int(meta.get("label", -1)), "record": meta.get("record")}

    def _worker_skip(self, worker: int, num_workers: int) -> int:
        # a DataLoader hands out worker w's batches as global batches w, w + k, w + 2k, …
        return len(range(worker, self.skip_batches, num_workers)) * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wds = _webdataset()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank = int(os.environ.get("RANK", "0"))
        urls = list(self.urls)
        stages: list[Any] = []
        if self.split == "train":
            random.Random(f"wds-shards/{self.seed}/{self.epoch}").shuffle(urls)
            # the evaluation split is read whole by the one process that evaluates
            stages += [wds.split_by_node, wds.split_by_worker]
        stages.append(wds.tarfile_to_samples(handler=self._on_error))
        if self.split == "train" and self.shuffle_buffer > 1:
            rng = random.Random(f"wds-buffer/{self.seed}/{self.epoch}/{rank}/{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        skip = self._worker_skip(worker, num_workers) if self.split == "train" else 0
        if skip:
            stages.append(_drop_first(skip))  # before decoding: raw bytes are cheap to pass over
        stages.append(wds.map(self._decode, handler=self._on_error))
        yield from wds.DataPipeline(wds.SimpleShardList(urls), *stages)

    def captions(self, limit: int | None = None) -> list[str]:
        """The captions of the first ``limit`` samples in shard order (for tokenizer training), no images decoded."""
        wds = _webdataset()
        out: list[str] = []
        for sample in wds.DataPipeline(wds.SimpleShardList(list(self.urls)), wds.tarfile_to_samples(handler=self._on_error)):
            if "txt" in sample:
                out.append(" ".join(sample["txt"].decode("utf-8", "replace").split()))
            if limit is not None and len(out) >= limit:
                break
        return out


class _UnknownLength(UserError, TypeError):
    """A TypeError too, so that ``list(dataset)`` takes it as "no length" and just iterates."""


def _drop_first(n: int) -> Callable[[Iterator[Any]], Iterator[Any]]:
    def stage(src: Iterator[Any]) -> Iterator[Any]:
        for i, sample in enumerate(src):
            if i >= n:
                yield sample

    return stage


def first_items(dataset: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` items of an indexed dataset or a stream."""
    if isinstance(dataset, IterableDataset):
        import itertools

        return list(itertools.islice(iter(dataset), n))
    return [dataset[i] for i in range(min(n, len(dataset)))]
