"""The one HDF5 layout every dataset ends in, and the error every dataset step raises.

Every dataset the pipeline uses (CIFAR-10, BSDS500, the synthetic classification set, the
scikit-image smoke photographs) ends up in one HDF5 layout written by :func:`write_h5`:

    /<split>/images   uint8, (N, C, H, W)
    /<split>/labels   int64, (N,)            classification only
    /<split>/<other>  per-image bookkeeping (e.g. ``source_index``), first axis N
    file attributes   provenance and parameters; non-scalar values are JSON strings whose
                      names are listed in the ``json_attrs`` attribute

:func:`read_split` turns one split back into float32 tensors in [0, 1].
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from stablenets.atomic import atomic_path

SPLITS = ("train", "val", "test")
#: The splits a denoiser is scored on (validation and test PSNR); training uses patches alone.
SCORED_SPLITS = ("val", "test")
_JSON_ATTRS_KEY = "json_attrs"


class DataError(ValueError):
    """A dataset file, archive, download or parameter is unusable; the message says which."""


# --------------------------------------------------------------------------------------------
# the HDF5 layout
# --------------------------------------------------------------------------------------------


def _check_split(path: Path, name: str, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Validate one split's arrays and return them with labels cast to int64; a denoising split
    (no labels) that is scored must hold no all-black image (``_check_not_black``)."""
    images = arrays.get("images")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else "none"
        raise DataError(
            f"{path}: split {name!r} needs 'images' as a uint8 (N, C, H, W) array, not {found}"
        )
    out: dict[str, Any] = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] != images.shape[0]:
            raise DataError(
                f"{path}: split {name!r} key {key!r} has shape {value.shape}, "
                f"expected first axis {images.shape[0]}"
            )
        if key == "labels":
            if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
                raise DataError(f"{path}: split {name!r} 'labels' must be a 1-D integer array")
            value = value.astype(np.int64)
        out[key] = value
    if "labels" not in out and name in SCORED_SPLITS:
        _check_not_black(path, name, images)
    return out


def _encode_attrs(attrs: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Scalars and strings as they are; everything else JSON-encoded (names returned)."""
    plain: dict[str, Any] = {}
    encoded = []
    for key, value in attrs.items():
        if key == _JSON_ATTRS_KEY:
            raise DataError(f"attribute name {key!r} is reserved")
        if isinstance(value, str | bool | int | float | np.integer | np.floating | np.bool_):
            plain[key] = value
        else:
            plain[key] = json.dumps(value, sort_keys=True, default=_json_default)
            encoded.append(key)
    return plain, encoded


def _json_default(value: object) -> object:
    """JSON for numpy values and paths, which attributes often carry."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"attribute value {value!r} is not JSON-serialisable")


def write_h5(path: Path, splits: dict[str, dict[str, np.ndarray]], attrs: dict[str, Any]) -> None:
    """Write the one HDF5 layout every dataset uses, atomically (temporary file + rename).

    ``splits`` maps ``train``/``val``/``test`` to arrays: ``images`` (uint8, N x C x H x W),
    ``labels`` (integer, N) for classification, and optionally other per-image arrays. Either
    every split has labels or none has. ``attrs`` become file attributes.
    """
    path = Path(path)
    if not splits or set(splits) - set(SPLITS):
        raise DataError(
            f"{path}: splits must be a non-empty subset of {SPLITS}, got {list(splits)}"
        )
    checked = {name: _check_split(path, name, arrays) for name, arrays in splits.items()}
    if len({"labels" in arrays for arrays in checked.values()}) > 1:
        raise DataError(f"{path}: some splits have labels and some do not")
    plain, encoded = _encode_attrs(attrs)
    with atomic_path(path, suffix=".h5.part") as tmp, h5py.File(tmp, "w") as f:
        for name, arrays in checked.items():
            group = f.create_group(name)
            for key, value in arrays.items():
                group.create_dataset(key, data=value)
        f.attrs.update(plain)
        f.attrs[_JSON_ATTRS_KEY] = json.dumps(sorted(encoded))


def _open_h5(path: Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc


def read_attrs(path: Path) -> dict[str, Any]:
    """The file attributes written by :func:`write_h5`, JSON values decoded."""
    with _open_h5(path) as f:
        raw: dict[str, Any] = {key: f.attrs[key] for key in f.attrs}
    encoded = json.loads(raw.pop(_JSON_ATTRS_KEY, "[]"))
    out = {}
    for key, value in raw.items():
        value = value.item() if isinstance(value, np.generic) else value
        out[key] = json.loads(value) if key in encoded else value
    return out


def _read_dataset(path: Path, group: h5py.Group, key: str) -> np.ndarray:
    """The whole array ``group[key]`` (a ``DataError`` if it is not a dataset)."""
    data = group[key]
    if not isinstance(data, h5py.Dataset):
        raise DataError(f"{path}: {group.name}/{key} is not a dataset")
    return data[()]


def split_size(path: Path, split: str) -> int:
    """How many images ``split`` holds, without reading them."""
    with _open_h5(path) as f:
        images = f.get(f"{split}/images")
        if not isinstance(images, h5py.Dataset):
            raise DataError(f"{path}: no split {split!r} with images (has {sorted(f.keys())})")
        return len(images)


def read_split(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One split as float32 images in [0, 1] (N, C, H, W) and int64 labels (None if absent).
    A file made or edited by hand is checked as :func:`write_h5` checks a split, and for what a
    job can use: a split with no images, or labels outside ``0 .. num_classes - 1`` (the file's
    attribute), is a ``DataError``."""
    with _open_h5(path) as f:
        group = f.get(split)
        if not isinstance(group, h5py.Group) or "images" not in group:
            raise DataError(f"{path}: no split {split!r} with images (has {sorted(f.keys())})")
        try:
            images = _read_dataset(path, group, "images")
            labels = _read_dataset(path, group, "labels") if "labels" in group else None
        except OSError as exc:
            raise DataError(f"{path}: split {split!r} is unreadable ({exc})") from exc
        classes = f.attrs.get("num_classes")
    found = {"images": images} if labels is None else {"images": images, "labels": labels}
    checked = _check_split(path, split, found)
    if len(images) == 0:
        raise DataError(f"{path}: split {split!r} has no images")
    y = checked.get("labels")
    if y is not None:
        _check_labels(path, split, y, None if classes is None else int(classes))
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    return x, None if y is None else torch.from_numpy(y)


def _check_not_black(path: Path, split: str, images: np.ndarray) -> None:
    """Images a denoiser can be scored on: the PSNR's peak is each image's maximum (the
    paper's), so an all-black image has none (its PSNR would be -inf)."""
    black = images.max(axis=(1, 2, 3), initial=0) == 0  # initial: an empty split has none
    if black.any():
        raise DataError(
            f"{path}: {split}/images[{int(black.argmax())}] is all black: its PSNR "
            f"(peak: the image's maximum) is undefined ({int(black.sum())} of {len(images)})"
        )


def _check_labels(path: Path, split: str, labels: np.ndarray, classes: int | None) -> None:
    """Labels a classifier can score: from 0, and below ``classes`` where the file says it."""
    allowed = "negative" if classes is None else f"outside 0 .. {classes - 1}"
    outside = labels < 0 if classes is None else (labels < 0) | (labels >= classes)
    if outside.any():
        raise DataError(
            f"{path}: {split}/labels holds {int(labels[outside][0])}, {allowed} "
            f"({int(outside.sum())} of {len(labels)} labels)"
        )
