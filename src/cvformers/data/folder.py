"""Image–caption folders: ``foo.png|jpg|jpeg|webp`` beside ``foo.txt`` (one caption a line), recursive.

Images are read by ``cvformers.images`` (RGB, transparent pixels composited onto white, the
shorter side scaled to ``image_size`` and the centred square cut).

Broken files never stop a run. At index time every image's header is parsed and PNG chunks
are CRC-checked (``PIL.Image.verify``, no pixel decoding), and the failures are skipped and
counted. Some breakage only shows while decoding (a truncated JPEG); then ``__getitem__``
logs and counts it and returns the next good item instead (image and caption of that same
file, ``record["index"]`` saying which), deterministically, so an epoch never crashes half way. ``dataset.skipped`` is the count (per process: DataLoader workers
keep their own).

A file with several captions gives one of them per epoch, chosen from (index, epoch): call
``set_epoch`` (the trainer does) to move on to other captions.
"""

from __future__ import annotations

import hashlib

import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cvformers.errors import UserError
from cvformers.images import IMAGE_SUFFIXES, read_image, resize_center_crop
from cvformers.utils import progress

log = logging.getLogger("cvformers.data")



def read_captions(path: Path) -> list[str]:
    """Non-empty, whitespace-normalised lines of a caption file ([] when unreadable)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _header_ok(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # parses the header; for PNG walks every chunk and checks its CRC
        return True
    except Exception:  # PIL raises many types (SyntaxError, OSError, struct.error, ...)
        return False


def _path_fraction(rel: Path) -> float:
    """A stable number in [0, 1) for a relative path: which side of a holdout a file falls on."""
    digest = hashlib.sha256(rel.as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FolderDataset(Dataset):
    """Captioned images under ``root``; items {"image", "caption", "label": -1, "record": {"path"}}."""

    def __init__(self, root: str | Path, image_size: int = 32, channels: int = 3, seed: int = 0,
                 verify: bool = True, cache: bool = False, split: str = "train", holdout: float = 0.0):
        """``holdout`` > 0 puts that fraction of the files in the ``test`` split and the rest in
        ``train``, chosen by a hash of each file's path below ``root`` (so adding files never moves
        old ones across); with ``holdout`` = 0 every split is the whole folder."""
        self.root = Path(root).expanduser()
        if not 0.0 <= holdout < 1.0:
            raise UserError(f"holdout must be in [0, 1), got {holdout}")
        if holdout > 0 and split not in ("train", "test"):
            raise UserError(f"a folder with a holdout has the splits train and test, not {split!r}")
        if not self.root.is_dir():
            raise UserError(f"image folder {self.root} does not exist or is not a directory")
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels}")
        self.image_size, self.channels, self.seed = image_size, channels, seed
        self.epoch = 0
        self.skipped = 0  # unreadable images (index time + decode time)
        self.uncaptioned = 0  # images without a non-empty .txt beside them
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        self._bad: set[int] = set()

        self.files: list[Path] = []
        self.caption_lists: list[list[str]] = []
        unreadable = []
        found = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for path in progress(found, desc=f"indexing {self.root.name}", unit="file"):
            if holdout > 0 and (_path_fraction(path.relative_to(self.root)) < holdout) != (split == "test"):
                continue
            captions = read_captions(path.with_suffix(".txt"))
            if not captions:
                self.uncaptioned += 1
                continue
            if verify and not _header_ok(path):
                unreadable.append(path)
                continue
            self.files.append(path)
            self.caption_lists.append(captions)
        self.skipped = len(unreadable)
        if unreadable:
            log.warning("%s: skipped %d unreadable image(s), e.g. %s", self.root, len(unreadable), unreadable[0])
        if self.uncaptioned:
            log.info("%s: %d image(s) without a caption file were ignored", self.root, self.uncaptioned)
        if not self.files:
            raise UserError(f"no captioned images under {self.root}: expected foo.png|jpg|jpeg|webp beside foo.txt "
                            f"({self.skipped} unreadable, {self.uncaptioned} without captions)")

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def caption(self, index: int) -> str:
        options = self.caption_lists[index]
        if len(options) == 1:
            return options[0]
        return random.Random(f"folder/{self.seed}/{self.epoch}/{index}").choice(options)

    def captions(self, limit: int | None = None) -> list[str]:
        """Every caption line of the first ``limit`` items (for tokenizer training)."""
        return [c for lines in self.caption_lists[:limit] for c in lines]

    def _image(self, index: int) -> torch.Tensor:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        im = resize_center_crop(read_image(self.files[index]), self.image_size)
        image = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        if self._cache is not None:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> dict:
        n = len(self.files)
        for step in range(n):
            i = (index + step) % n  # on failure: the next file, so the substitute is deterministic
            if i in self._bad:
                continue
            try:
                image = self._image(i)
            except Exception as e:  # truncated or corrupt data only found while decoding
                self._bad.add(i)
                self.skipped += 1
                log.warning("skipping unreadable image %s (%s: %s); %d skipped so far",
                            self.files[i], type(e).__name__, e, self.skipped)
                continue
            image = image.float().div_(255.0)
            if self.channels == 1:
                image = image.mean(0, keepdim=True)
            return {"image": image, "caption": self.caption(i), "label": -1,
                    "record": {"path": str(self.files[i].relative_to(self.root)), "index": i}}
        raise UserError(f"every image under {self.root} failed to decode")
