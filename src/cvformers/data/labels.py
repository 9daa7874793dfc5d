"""Labelled views of the datasets, for classifiers: (image, label) items and the class count.

MNIST / Fashion-MNIST carry their classes; for ``shapes`` the label is the shape of a
single-object scene (circle, square, triangle, plus); for ``folder:PATH`` the top-level
sub-folder of each captioned image names its class, and every 10th image is held out.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from cvformers.data import DataConfig, build_dataset
from cvformers.errors import UserError

NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10}
# the names people read in tables and figures: the datasets' own class names (data/idx.py words them
# for captions instead, "a photo of a pair of trousers")
DISPLAY_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}


class ShapeLabels(Dataset):
    """Single-object ``shapes`` scenes labelled with their shape (index into ``SHAPES``)."""

    def __init__(self, scenes: Dataset):
        from cvformers.data.shapes import SHAPES

        self.scenes, self.classes = scenes, list(SHAPES)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        item = self.scenes[index]
        return {**item, "label": self.classes.index(item["record"]["objects"][0]["shape"])}


class FolderClasses(Dataset):
    """A ``folder:PATH`` dataset labelled by the top-level sub-folder each image sits in
    (``PATH/sneaker/001.png`` -> class "sneaker"); ``indices`` selects the split."""

    def __init__(self, images: Dataset, indices: list[int]):
        parts = [Path(f).relative_to(images.root).parts for f in images.files]
        if any(len(p) < 2 for p in parts):
            loose = next(p for p in parts if len(p) < 2)
            raise UserError(f"{images.root}: classification needs one sub-folder per class; "
                            f"{loose[0]} lies directly in the folder")
        self.classes = sorted({p[0] for p in parts})
        self.labels = [self.classes.index(p[0]) for p in parts]
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        i = self.indices[index]
        return {**self.images[i], "label": self.labels[i]}


def class_names(spec: str, dataset: Dataset | None = None) -> list[str] | None:
    """The name of each class index of ``spec``'s labelled view (a ``folder:PATH`` needs its
    ``dataset``: the sub-folders are its classes), or None when the labels have no names."""
    name = spec.partition(":")[0]
    if name == "shapes":
        from cvformers.data.shapes import SHAPES

        return list(SHAPES)
    if name in DISPLAY_NAMES:
        return list(DISPLAY_NAMES[name])
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes else None


def classification_dataset(data: DataConfig, split: str) -> Dataset:
    """The labelled dataset a run's ``[data]`` table names, for ``split`` (train or the eval split)."""
    name = data.name.partition(":")[0]
    if name == "wds":  # shards keep each sample's label but not the class list a classifier is built from
        raise UserError(f"{data.name}: tar shards carry no class list; classification needs indexed labelled data "
                        "(mnist, fashion-mnist, shapes, folder:PATH with class sub-folders)")
    if name == "shapes":
        size = data.size if split == "train" else data.eval_size
        scenes = build_dataset(data.name, split=split, image_size=data.image_size, channels=data.channels,
                               seed=data.seed, size=size or None, two_object_prob=0.0)
        return ShapeLabels(scenes)
    if name == "folder":
        images = build_dataset(data.name, split="train", image_size=data.image_size, channels=data.channels)
        # a folder has one set of files: every 10th image is held out for evaluation
        keep = [i for i in range(len(images)) if (i % 10 == 0) == (split != "train")]
        return FolderClasses(images, keep)
    return build_dataset(data.name, split=split, image_size=data.image_size, channels=data.channels)


def count_classes(spec: str, dataset: Dataset) -> int:
    name = spec.partition(":")[0]
    if name in NUM_CLASSES:
        return NUM_CLASSES[name]
    if name == "shapes":
        return len(class_names(spec))
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    raise UserError(f"{spec}: no class labels found")
