"""BSDS500 from the official archive: RGB photographs cropped to landscape, to the HDF5
layout of :mod:`stablenets.data.format`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from stablenets.data.download import archive_record, extracted
from stablenets.data.format import SPLITS, DataError, write_h5

# The official BSDS500 archive layout.
_BSDS_IMAGES = PurePosixPath("BSR/BSDS500/data/images")
_BSDS_SUFFIX = ".jpg"


# --------------------------------------------------------------------------------------------
# BSDS500
# --------------------------------------------------------------------------------------------


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError  # PIL ships with torchvision

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path.name}: unreadable image ({exc})") from exc


def _is_portrait(image: np.ndarray) -> bool:
    """Whether an (H, W, 3) image is taller than wide: it is transposed, and the file named."""
    return image.shape[0] > image.shape[1]


def _landscape_crop(image: np.ndarray, size: tuple[int, int], name: str) -> np.ndarray:
    """Transpose a portrait image to landscape, then centre-crop to ``size`` (H, W)."""
    if _is_portrait(image):
        image = image.transpose(1, 0, 2)
    h, w = image.shape[:2]
    th, tw = size
    if h < th or w < tw:
        raise DataError(f"{name}: image is {h}x{w} after orientation, smaller than {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return image[top : top + th, left : left + tw]


def _bsds_split(folder: Path, size: tuple[int, int]) -> tuple[np.ndarray, list[str], list[str]]:
    """All images of one BSDS500 split folder, sorted by name: (N, 3, H, W), names, transposed."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == _BSDS_SUFFIX)
    if not files:
        raise DataError(f"{folder}: no {_BSDS_SUFFIX} images")
    images, transposed = [], []
    for path in files:
        raw = _read_rgb(path)
        if _is_portrait(raw):
            transposed.append(path.name)
        images.append(_landscape_crop(raw, size, path.name).transpose(2, 0, 1))
    return np.stack(images), [p.name for p in files], transposed


def prepare_bsds500(
    archive: Path,
    out: Path,
    size: tuple[int, int],
    provenance: dict,
    *,
    extra_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Convert the official ``BSR_bsds500.tgz`` into the HDF5 layout (no labels).

    Splits are the archive's train/val/test folders, images sorted by file name; portrait
    images are transposed to landscape and every image is centre-cropped to ``size`` = (H, W)
    (321 x 481 keeps the full images).
    """
    archive, out = Path(archive), Path(out)
    size = (int(size[0]), int(size[1]))
    splits: dict[str, dict[str, np.ndarray]] = {}
    names: dict[str, list[str]] = {}
    transposed: dict[str, list[str]] = {}
    with extracted(archive, out) as root:
        for split in SPLITS:
            folder = root.joinpath(*_BSDS_IMAGES.parts, split)
            if not folder.is_dir():
                raise DataError(f"{archive}: no folder {_BSDS_IMAGES / split} inside")
            images, names[split], transposed[split] = _bsds_split(folder, size)
            splits[split] = {"images": images}
    attrs = {
        "source": "bsds500",
        "task": "denoising",
        **archive_record(archive, provenance),
        "size": list(size),
        "file_names": names,
        "transposed": transposed,
        **(extra_attrs or {}),
    }
    write_h5(out, splits, attrs)
