"""The one HDF5 layout every dataset ends in, and the error every dataset step raises.

Every dataset the pipeline uses (CIFAR-10, BSDS500, the synthetic classification set, the
scikit-image smoke photographs) ends up in one HDF5 layout written by :func:`write_h5`:

    /<split>/images   uint8, (N, C, H, W), C = 3 (RGB: every dataset and stand-in)
    /<split>/labels   int64, (N,)            classification only
    /<split>/<other>  per-image bookkeeping (e.g. ``source_index``), first axis N
    file attributes   provenance and parameters; non-scalar values are JSON strings whose
                      names are listed in the ``json_attrs`` attribute

:func:`read_split` turns one split back into float32 tensors in [0, 1].

A damaged file is an error, never other data and never a hang: the file is written in HDF5's
latest format (its object headers, attributes included, carry checksums), every array in chunks
with a Fletcher-32 checksum, and strings as fixed-length bytes (a variable-length string lives in
the global heap, unchecksummed: one flipped bit in its length made HDF5 spin forever). Files
written before (contiguous arrays, variable-length strings) are still read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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
#: Image channels (RGB); a channels-last (N, H, W, 3) array would otherwise read as C = H.
CHANNELS = 3
#: Bytes per chunk of a stored array (whole images, or rows, per chunk): CIFAR-10's 50000
#: training images (150 MB) read in 0.08 s so, checksums checked (0.04 s unchunked, unchecked),
#: in 0.29 s in a chunk per image.
_H5_CHUNK_BYTES = 1 << 20
#: What h5py raises, deep in its own code, on a damaged file (and what decoding a damaged value
#: raises): turned into a ``DataError`` naming the file.
_H5_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError)


class DataError(ValueError):
    """A dataset file, archive, download or parameter is unusable; the message says which."""


# --------------------------------------------------------------------------------------------
# the HDF5 layout
# --------------------------------------------------------------------------------------------


def _check_split(path: Path, name: str, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Validate one split's arrays and return them with labels cast to int64; a denoising split
    (no labels) that is scored must hold no all-black image (``_check_not_black``)."""
    images = arrays.get("images")
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1] != CHANNELS
    ):
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else "none"
        raise DataError(
            f"{path}: split {name!r} needs 'images' as a uint8 (N, C, H, W) array with "
            f"C = {CHANNELS}, not {found}"
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
    """Scalars as they are, strings as fixed-length UTF-8 bytes (``_fixed``); everything else
    (and a string holding NUL, which fixed-length bytes would cut) JSON-encoded, names returned."""
    plain: dict[str, Any] = {}
    encoded = []
    for key, value in attrs.items():
        if key == _JSON_ATTRS_KEY:
            raise DataError(f"attribute name {key!r} is reserved")
        if isinstance(value, bool | int | float | np.integer | np.floating | np.bool_):
            plain[key] = value
        elif isinstance(value, str) and "\0" not in value:
            plain[key] = _fixed(value)
        else:
            plain[key] = _fixed(json.dumps(value, sort_keys=True, default=_json_default))
            encoded.append(key)
    return plain, encoded


def _fixed(text: str) -> np.bytes_:
    """A string as a fixed-length bytes attribute, stored in the object header (checksummed),
    not as a variable-length string in the global heap (not checksummed; see the module)."""
    return np.bytes_(text.encode("utf-8"))


def _decoded(value: Any) -> Any:
    """An attribute as a plain value: numpy scalars as Python ones, bytes (``_fixed``) as str."""
    value = value.item() if isinstance(value, np.generic) else value
    return value.decode("utf-8") if isinstance(value, bytes) else value


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
    # libver "latest": object headers (attributes included) with checksums
    with atomic_path(path, suffix=".h5.part") as tmp, h5py.File(tmp, "w", libver="latest") as f:
        for name, arrays in checked.items():
            group = f.create_group(name)
            for key, value in arrays.items():
                group.create_dataset(key, data=value, **_checksummed(value))
        f.attrs.update(plain)
        f.attrs[_JSON_ATTRS_KEY] = _fixed(json.dumps(sorted(encoded)))


def _checksummed(value: np.ndarray) -> dict[str, Any]:
    """``create_dataset`` options for a Fletcher-32 checksum on every chunk; a chunk holds whole
    images (or rows), about ``_H5_CHUNK_BYTES``: h5py's own chunks split images and made a whole
    read 4 times slower. An empty array has no chunk to check (HDF5 allows none there)."""
    if value.size == 0:
        return {}
    rows = max(1, min(len(value), _H5_CHUNK_BYTES // (value.nbytes // len(value))))
    return {"chunks": (rows, *value.shape[1:]), "fletcher32": True}


@contextmanager
def _unreadable(path: Path, what: str) -> Iterator[None]:
    """Turn h5py's errors on a damaged file (``_H5_ERRORS``, raised deep in its code without the
    file's name) into one ``DataError`` line naming ``path`` and ``what`` could not be read."""
    try:
        yield
    except DataError:
        raise
    except _H5_ERRORS as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path}: {what} ({reason})") from exc


def _open_h5(path: Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file")
    with _unreadable(path, "not a readable HDF5 file"):
        return h5py.File(path, "r")


def read_attrs(path: Path) -> dict[str, Any]:
    """The file attributes written by :func:`write_h5`, JSON values decoded (strings stored as
    bytes by this version, or as variable-length strings by earlier ones, come back as str)."""
    path = Path(path)
    with _unreadable(path, "unreadable attributes"), _open_h5(path) as f:
        raw: dict[str, Any] = {key: _decoded(f.attrs[key]) for key in f.attrs}
        encoded = json.loads(raw.pop(_JSON_ATTRS_KEY, "[]"))
        return {key: json.loads(value) if key in encoded else value for key, value in raw.items()}


def _read_dataset(path: Path, group: h5py.Group, key: str) -> np.ndarray:
    """The whole array ``group[key]`` (a ``DataError`` if it is not a dataset)."""
    data = group[key]
    if not isinstance(data, h5py.Dataset):
        raise DataError(f"{path}: {group.name}/{key} is not a dataset")
    return data[()]


def split_size(path: Path, split: str) -> int:
    """How many images ``split`` holds, without reading them."""
    path = Path(path)
    with _unreadable(path, f"split {split!r} is unreadable"), _open_h5(path) as f:
        images = f.get(f"{split}/images")
        if not isinstance(images, h5py.Dataset):
            raise DataError(f"{path}: no split {split!r} with images (has {sorted(f.keys())})")
        return len(images)


def read_split(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One split as float32 images in [0, 1] (N, C, H, W) and int64 labels (None if absent).
    A file made or edited by hand is checked as :func:`write_h5` checks a split, and for what a
    job can use: a split with no images, or labels outside ``0 .. num_classes - 1`` (the file's
    attribute), is a ``DataError``; so is a damaged file (a checksum that fails)."""
    path = Path(path)
    with _unreadable(path, f"split {split!r} is unreadable"), _open_h5(path) as f:
        group = f.get(split)
        if not isinstance(group, h5py.Group) or "images" not in group:
            raise DataError(f"{path}: no split {split!r} with images (has {sorted(f.keys())})")
        images = _read_dataset(path, group, "images")
        labels = _read_dataset(path, group, "labels") if "labels" in group else None
        classes = f.attrs.get("num_classes")
        classes = None if classes is None else int(classes)
    found = {"images": images} if labels is None else {"images": images, "labels": labels}
    checked = _check_split(path, split, found)
    if len(images) == 0:
        raise DataError(f"{path}: split {split!r} has no images")
    y = checked.get("labels")
    if y is not None:
        _check_labels(path, split, y, classes)
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
