"""What a configured dataset will hold, read from its ``data`` section alone (no file is read):
the training and test sizes, the image size and the classes the jobs will see. The config's
checks compare models and batch sizes with it before any job runs."""

from __future__ import annotations

from typing import Any, NamedTuple

from stablenets.data.cifar10 import CIFAR10_CLASSES, random_split

__all__ = [
    "BSDS500_IMAGE",
    "DATASET_NAMES",
    "CIFAR10_ARCHIVE_TRAIN",
    "DataShape",
    "bsds500_shape",
    "cifar10_shape",
]

#: Each configured dataset (a key of the config's ``data``) by the name readers know it by.
DATASET_NAMES = {"cifar10": "CIFAR-10", "bsds500": "BSDS500"}
CIFAR10_ARCHIVE_TRAIN = 50_000  # the official archive's training batches, split into train/val
_CIFAR10 = {"test": 10_000, "image": (32, 32), "classes": CIFAR10_CLASSES}
_BSDS500 = {"train": 200, "val": 100, "test": 200}  # the official splits
#: (H, W) of every BSDS500 photograph, portraits turned to landscape: the largest crop.
BSDS500_IMAGE = (321, 481)


class DataShape(NamedTuple):
    """The dataset's name; images of its training, validation and test splits, their height and
    width and channels, and the classes (``None`` for a denoising set)."""

    name: str
    n_train: int
    n_val: int
    n_test: int
    image: tuple[int, int]
    classes: int | None
    channels: int = 3  # RGB, as both datasets and their stand-ins


def cifar10_shape(spec: dict[str, Any]) -> DataShape:
    """``data.cifar10`` of a validated config: the official archive split by ``val_fraction``
    (``prepare_cifar10``), or the synthetic stand-in's own sizes."""
    if spec["source"] == "synthetic":
        s = spec["synthetic"]
        size = int(s["image_size"])
        sizes = int(s["n_train"]), int(s["n_val"]), int(s["n_test"])
        return DataShape(DATASET_NAMES["cifar10"], *sizes, (size, size), int(s["num_classes"]))
    train, val = random_split(CIFAR10_ARCHIVE_TRAIN, spec["val_fraction"], spec["split_seed"])
    sizes = len(train), len(val), _CIFAR10["test"]
    return DataShape(DATASET_NAMES["cifar10"], *sizes, _CIFAR10["image"], _CIFAR10["classes"])


def bsds500_shape(spec: dict[str, Any]) -> DataShape:
    """``data.bsds500`` of a validated config: the official splits cropped to ``size``, or the
    stand-in photographs' own sizes."""
    if spec["source"] == "photos":
        p = spec["photos"]
        height, width = p["size"]
        sizes = int(p["n_train"]), int(p["n_val"]), int(p["n_test"])
        return DataShape(DATASET_NAMES["bsds500"], *sizes, (height, width), None)
    height, width = spec["size"]
    sizes = _BSDS500["train"], _BSDS500["val"], _BSDS500["test"]
    return DataShape(DATASET_NAMES["bsds500"], *sizes, (height, width), None)
