"""Dataset layer: download, checksum, safe extraction, HDF5 conversion and offline smoke data.

Every dataset the pipeline uses (CIFAR-10, BSDS500, the synthetic classification set, the
scikit-image smoke photographs) ends up in one HDF5 layout written by :func:`write_h5`:

    /<split>/images   uint8, (N, C, H, W)
    /<split>/labels   int64, (N,)            classification only
    /<split>/<other>  per-image bookkeeping (e.g. ``source_index``), first axis N
    file attributes   provenance and parameters; non-scalar values are JSON strings whose
                      names are listed in the ``json_attrs`` attribute

:func:`read_split` turns one split back into float32 tensors in [0, 1].

Nothing here trusts the network or an archive: downloads are refused without a checksum,
archives are extracted only after every member has been checked, and every output file is
written to a temporary name first and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import pickle
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import h5py
import numpy as np
import torch

from .atomic import atomic_path

__all__ = [
    "DataError",
    "SMOKE_TEST_PHOTOS",
    "SMOKE_TRAIN_PHOTOS",
    "download",
    "file_digests",
    "make_smoke_photos",
    "make_synthetic_classification",
    "prepare_bsds500",
    "prepare_cifar10",
    "read_attrs",
    "read_split",
    "safe_extract",
    "verify_checksum",
    "write_h5",
]

SPLITS = ("train", "val", "test")
_CHUNK_BYTES = 1 << 20
_MAX_LINK_HOPS = 40  # symlink chain length treated as a loop, as the OS does
_JSON_ATTRS_KEY = "json_attrs"

# The official CIFAR-10 python archive: format constants, not tunables.
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_SHAPE = (3, 32, 32)
# The official BSDS500 archive layout.
_BSDS_IMAGES = PurePosixPath("BSR/BSDS500/data/images")
_BSDS_SUFFIX = ".jpg"


class DataError(ValueError):
    """A dataset file, archive, download or parameter is unusable; the message says which."""


# --------------------------------------------------------------------------------------------
# checksums and downloads
# --------------------------------------------------------------------------------------------


def file_digests(path: Path, algorithms: Sequence[str]) -> dict[str, str]:
    """Hash a file once for all requested algorithms, reading it in chunks."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _expected_digests(md5: str | None, sha256: str | None, what: str) -> dict[str, str]:
    """The checksums a caller gave, normalised; at least one is required."""
    expected = {k: v.strip().lower() for k, v in (("md5", md5), ("sha256", sha256)) if v}
    if not expected:
        raise DataError(f"{what}: no md5 or sha256 given; refusing to use an unverified file")
    return expected


def _check_digests(path: Path, expected: Mapping[str, str], source: str) -> None:
    """Raise DataError naming ``source`` when ``path`` does not hash to ``expected``."""
    actual = file_digests(path, list(expected))
    for name, want in expected.items():
        if actual[name] != want:
            raise DataError(
                f"{source}: checksum mismatch, expected {name} {want}, got {actual[name]}"
            )


def verify_checksum(path: Path, md5: str | None = None, sha256: str | None = None) -> None:
    """Check ``path`` against the given md5 and/or sha256 (at least one), else raise DataError."""
    path = Path(path)
    expected = _expected_digests(md5, sha256, str(path))
    if not path.is_file():
        raise DataError(f"{path}: no such file to verify")
    _check_digests(path, expected, str(path))


def _fetch(url: str, target: Path, timeout: float) -> None:
    """Stream ``url`` (http, https or file) into ``target``."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise DataError(f"unsupported URL scheme {scheme!r}")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out, _CHUNK_BYTES)


def download(
    urls: list[str],
    dest: Path,
    md5: str | None = None,
    sha256: str | None = None,
    *,
    timeout: float = 60.0,
) -> Path:
    """Download ``dest`` from the first URL (mirrors in order) whose content has the checksum.

    A checksum is mandatory: an unverified dataset would make every result downstream
    unreproducible. The file is streamed to a temporary name beside ``dest``, verified and
    renamed, so ``dest`` is either absent or complete. An existing ``dest`` with the right
    checksum is kept without touching the network. ``timeout`` is per connection, in seconds.
    """
    dest = Path(dest)
    urls = [urls] if isinstance(urls, str) else list(urls)
    expected = _expected_digests(md5, sha256, str(dest))
    if not urls:
        raise DataError(f"{dest}: no URL given")
    if dest.is_file():
        try:
            _check_digests(dest, expected, str(dest))
            return dest
        except DataError:
            pass  # stale or corrupt copy: fetch it again, replacing it atomically
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        try:
            with atomic_path(dest, suffix=".part") as tmp:  # renamed onto dest only if verified
                _fetch(url, tmp, timeout)
                _check_digests(tmp, expected, url)
        # URLError is an OSError, DataError a ValueError; HTTPException covers truncation.
        except (OSError, ValueError, http.client.HTTPException) as exc:
            failures.append(f"{url}: {exc}")
            continue
        return dest
    raise DataError(f"{dest.name}: every URL failed: " + " | ".join(failures))


# --------------------------------------------------------------------------------------------
# safe extraction
# --------------------------------------------------------------------------------------------


def _parts(path: str) -> list[str]:
    """Path components of an archive name, without empty and ``.`` components."""
    return [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]


def _escapes(path: str, links: Mapping[str, str]) -> bool:
    """Whether an archive-relative path, followed through the archive's own symlinks, leaves
    the extraction root (or loops); like ``os.path.realpath`` on a virtual tree."""
    pending = list(reversed(_parts(path)))
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if not resolved:
                return True
            resolved.pop()
            continue
        resolved.append(part)
        target = links.get("/".join(resolved))
        if target is None:
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS or target.startswith("/"):
            return True
        resolved.pop()
        pending.extend(reversed(_parts(target)))
    return False


def _check_name(archive: Path, name: str) -> None:
    """Refuse absolute member names and names with ``..`` components."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{archive}: member {name!r} has an absolute path")
    if ".." in name.replace("\\", "/").split("/"):
        raise DataError(f"{archive}: member {name!r} has a '..' component")


def _check_member(
    archive: Path, name: str, kind: str, link: str | None, links: Mapping[str, str]
) -> None:
    """Refuse one member: bad name, special file, a link out of the root, or a path through
    a symlink that leads out of the root."""
    _check_name(archive, name)
    if link is not None and link.startswith(("/", "\\")):
        raise DataError(f"{archive}: link {name!r} -> {link!r} has an absolute target")
    if kind == "device":
        raise DataError(f"{archive}: member {name!r} is a device or fifo")
    parent = "/".join(_parts(name)[:-1])
    if _escapes(parent, links):
        raise DataError(f"{archive}: member {name!r} is written through a link leaving the archive")
    if kind == "symlink" and _escapes(f"{parent}/{link}", links):
        raise DataError(f"{archive}: symlink {name!r} -> {link!r} points outside the destination")
    if kind == "hardlink" and (link is None or _escapes(link, links)):
        raise DataError(f"{archive}: hardlink {name!r} -> {link!r} points outside the destination")


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        return "device"
    return "file"


def _extract_tar(archive: Path, into: Path) -> list[str]:
    """Check every tar member, then extract with tarfile's ``data`` filter as a second guard."""
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        links = {"/".join(_parts(m.name)): m.linkname for m in members if m.issym()}
        for m in members:
            _check_member(archive, m.name, _tar_kind(m), m.linkname or None, links)
        try:
            tar.extractall(into, members=members, filter="data")
        except tarfile.FilterError as exc:
            raise DataError(f"{archive}: refused by tarfile's data filter: {exc}") from exc
    return [m.name for m in members if m.isfile()]


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "device"
    return "file"


def _extract_zip(archive: Path, into: Path) -> list[str]:
    """Check every zip member (zipfile writes symlinks as plain files), then extract."""
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        links = {
            "/".join(_parts(i.filename)): zf.read(i).decode("utf-8", "replace")
            for i in infos
            if _zip_kind(i) == "symlink"
        }
        for info in infos:
            link = links.get("/".join(_parts(info.filename)))
            _check_member(archive, info.filename, _zip_kind(info), link, links)
        zf.extractall(into)
    return [i.filename for i in infos if not i.is_dir()]


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a tar (plain, gz, bz2, xz) or zip archive into the new directory ``dest``.

    Members with absolute names, ``..`` components, links leading outside ``dest`` or device
    files are refused (DataError naming the member) before anything is written. Extraction
    goes to a temporary directory beside ``dest`` that is renamed into place only on success.
    Returns the extracted regular files.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DataError(f"{archive}: no such archive")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest}: extraction destination already exists and is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".extract"))
    try:
        if tarfile.is_tarfile(archive):  # first: a tar may end with a zip member
            names = _extract_tar(archive, tmp)
        elif zipfile.is_zipfile(archive):
            names = _extract_zip(archive, tmp)
        else:
            raise DataError(f"{archive}: not a tar or zip archive")
        os.replace(tmp, dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataError(f"{archive}: cannot extract: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(dest.joinpath(*_parts(name)) for name in names)


@contextmanager
def _extracted(archive: Path, near: Path) -> Iterator[Path]:
    """Safely extract ``archive`` into a temporary directory next to ``near``; removed after."""
    near.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=near.parent, prefix=f".{near.name}.") as work:
        root = Path(work) / "archive"
        safe_extract(archive, root)
        yield root


# --------------------------------------------------------------------------------------------
# the HDF5 layout
# --------------------------------------------------------------------------------------------


def _check_split(path: Path, name: str, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Validate one split's arrays and return them with labels cast to int64."""
    images = arrays.get("images")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{path}: split {name!r} needs 'images' as a uint8 (N, C, H, W) array")
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


def _json_default(value: Any) -> Any:
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
        raw = {key: f.attrs[key] for key in f.attrs}
    encoded = json.loads(raw.pop(_JSON_ATTRS_KEY, "[]"))
    out = {}
    for key, value in raw.items():
        value = value.item() if isinstance(value, np.generic) else value
        out[key] = json.loads(value) if key in encoded else value
    return out


def read_split(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One split as float32 images in [0, 1] (N, C, H, W) and int64 labels (None if absent)."""
    with _open_h5(path) as f:
        if not isinstance(f.get(split), h5py.Group) or "images" not in f[split]:
            raise DataError(f"{path}: no split {split!r} with images (has {sorted(f.keys())})")
        group = f[split]
        try:
            images = group["images"][()]
            labels = group["labels"][()] if "labels" in group else None
        except OSError as exc:
            raise DataError(f"{path}: split {split!r} is unreadable ({exc})") from exc
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{path}: {split}/images is {images.dtype} {images.shape}, not uint8 NCHW")
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return x, y


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------

# Globals the official CIFAR-10 pickles (and faithful copies) need; nothing else may load.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler limited to numpy arrays: a pickle can run arbitrary code otherwise."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            obj = _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"{path.name}: not a CIFAR-10 pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path.name}: expected a dict, got {type(obj).__name__}")
    return obj


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one CIFAR-10 batch file."""
    batch = _load_pickle(path)
    if b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path.name}: missing b'data' or b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(_CIFAR_SHAPE):
        raise DataError(f"{path.name}: b'data' is {data.dtype} {data.shape}, not uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path.name}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data.reshape(-1, *_CIFAR_SHAPE), labels


def _batch_number(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


def _cifar_files(root: Path, archive: Path) -> tuple[list[Path], Path, Path]:
    """The train batches (in numeric order), the test batch and the meta file."""
    folder = root / _CIFAR_DIR
    batches = [p for p in folder.glob("data_batch_*") if re.fullmatch(r"data_batch_\d+", p.name)]
    train = sorted(batches, key=_batch_number)
    test = folder / "test_batch"
    if not train or not test.is_file():
        raise DataError(f"{archive}: no {_CIFAR_DIR}/data_batch_* and test_batch inside")
    return train, test, folder / "batches.meta"


def _class_names(meta: Path, num_classes: int) -> list[str]:
    """Class names from ``batches.meta`` when present, else the label numbers."""
    if meta.is_file():
        names = _load_pickle(meta).get(b"label_names")
        if names:
            if len(names) < num_classes:
                raise DataError(f"{meta.name}: {len(names)} label_names for {num_classes} classes")
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(k) for k in range(num_classes)]


def _random_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted train and validation indices."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _archive_record(archive: Path, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance attributes shared by the archive-based datasets."""
    return {
        "provenance": dict(provenance),
        "archive_name": archive.name,
        "archive_sha256": file_digests(archive, ["sha256"])["sha256"],
    }


def prepare_cifar10(
    archive: Path,
    out: Path,
    val_fraction: float,
    split_seed: int,
    provenance: dict,
    *,
    extra_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Convert the official ``cifar-10-python.tar.gz`` into the HDF5 layout.

    The training batches (whatever ``data_batch_*`` exist) are split into train/val with a
    seeded permutation; ``source_index`` records each image's position in the concatenated
    training batches (or the test batch), so the split can be audited.
    """
    archive, out = Path(archive), Path(out)
    with _extracted(archive, out) as root:
        train_files, test_file, meta = _cifar_files(root, archive)
        parts = [_cifar_batch(p) for p in train_files]
        x_all = np.concatenate([p[0] for p in parts])
        y_all = np.concatenate([p[1] for p in parts])
        x_test, y_test = _cifar_batch(test_file)
        num_classes = int(max(y_all.max(), y_test.max())) + 1
        class_names = _class_names(meta, num_classes)
    train_idx, val_idx = _random_split(len(y_all), val_fraction, split_seed)
    splits = {
        "train": {
            "images": x_all[train_idx],
            "labels": y_all[train_idx],
            "source_index": train_idx,
        },
        "val": {"images": x_all[val_idx], "labels": y_all[val_idx], "source_index": val_idx},
        "test": {"images": x_test, "labels": y_test, "source_index": np.arange(len(y_test))},
    }
    attrs = {
        "source": "cifar10",
        "task": "classification",
        **_archive_record(archive, provenance),
        "train_batches": [p.name for p in train_files],
        "val_fraction": float(val_fraction),
        "split_seed": int(split_seed),
        "class_names": class_names,
        "num_classes": len(class_names),
        **(extra_attrs or {}),
    }
    write_h5(out, splits, attrs)


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


def _landscape_crop(image: np.ndarray, size: tuple[int, int], name: str) -> np.ndarray:
    """Transpose a portrait image to landscape, then centre-crop to ``size`` (H, W)."""
    if image.shape[0] > image.shape[1]:
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
        if raw.shape[0] > raw.shape[1]:
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
    with _extracted(archive, out) as root:
        for split in SPLITS:
            folder = root.joinpath(*_BSDS_IMAGES.parts, split)
            if not folder.is_dir():
                raise DataError(f"{archive}: no folder {_BSDS_IMAGES / split} inside")
            images, names[split], transposed[split] = _bsds_split(folder, size)
            splits[split] = {"images": images}
    attrs = {
        "source": "bsds500",
        "task": "denoising",
        **_archive_record(archive, provenance),
        "size": list(size),
        "file_names": names,
        "transposed": transposed,
        **(extra_attrs or {}),
    }
    write_h5(out, splits, attrs)


# --------------------------------------------------------------------------------------------
# synthetic classification set
# --------------------------------------------------------------------------------------------

# Generator design (what makes a class), not run parameters. A class is a hue (one of
# ceil(K / 2)) combined with one of two grating orientation families. A grating's random
# phase averages to zero, so a pixel-space linear model sees only the colour (about half the
# classes); a small CNN also sees the orientation.
_SYN_ORIENTATIONS = 2
_SYN_HUE_JITTER = 0.4  # fraction of the hue spacing
_SYN_ANGLE_JITTER = 0.4  # fraction of the orientation spacing
_SYN_SATURATION = (0.45, 0.9)
_SYN_VALUE = (0.35, 0.75)
_SYN_GRADIENT = 0.35  # largest relative brightness ramp across the image
_SYN_CONTRAST = (0.02, 0.2)  # grating amplitude
_SYN_CYCLES = (2.0, 5.0)  # grating cycles per image width
_SYN_DISTRACTOR_P = 0.5  # chance of a random-colour disc
_SYN_DISTRACTOR_RADIUS = (0.1, 0.25)  # fraction of the image size
_SYN_CHUNK = 2048  # images generated at once, bounds memory


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) to RGB, shape (..., 3)."""
    from skimage.color import hsv2rgb

    return hsv2rgb(np.stack([h % 1.0, s, v], axis=-1))


def _synthetic_images(
    labels: np.ndarray, num_classes: int, size: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Render one chunk of synthetic images (N, 3, size, size) uint8 for ``labels``."""
    n = len(labels)
    n_hues = -(-num_classes // _SYN_ORIENTATIONS)
    hue_idx, orient_idx = labels % n_hues, labels // n_hues

    def u(lo: float, hi: float) -> np.ndarray:
        """One uniform draw per image, broadcastable over (H, W)."""
        return rng.uniform(lo, hi, n)[:, None, None]

    coords = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    hue = (hue_idx + rng.uniform(-_SYN_HUE_JITTER, _SYN_HUE_JITTER, n)) / n_hues
    colour = _hsv_to_rgb(hue, rng.uniform(*_SYN_SATURATION, n), rng.uniform(*_SYN_VALUE, n))
    ramp_dir = u(0, 2 * np.pi)
    ramp = 1 + u(-_SYN_GRADIENT, _SYN_GRADIENT) * 2 * (
        xx * np.cos(ramp_dir) + yy * np.sin(ramp_dir)
    )
    img = colour[:, :, None, None] * ramp[:, None]

    spacing = np.pi / _SYN_ORIENTATIONS
    theta = (orient_idx + rng.uniform(-_SYN_ANGLE_JITTER, _SYN_ANGLE_JITTER, n)) * spacing
    theta = theta[:, None, None]
    phase_arg = xx * np.cos(theta) + yy * np.sin(theta)
    grating = u(*_SYN_CONTRAST) * np.sin(2 * np.pi * u(*_SYN_CYCLES) * phase_arg + u(0, 2 * np.pi))
    img = img + grating[:, None]

    centre_y, centre_x = u(-0.5, 0.5), u(-0.5, 0.5)
    disc = (yy - centre_y) ** 2 + (xx - centre_x) ** 2 < u(*_SYN_DISTRACTOR_RADIUS) ** 2
    disc &= rng.random(n)[:, None, None] < _SYN_DISTRACTOR_P
    disc_colour = _hsv_to_rgb(rng.random(n), rng.uniform(*_SYN_SATURATION, n), rng.random(n))
    img = np.where(disc[:, None], disc_colour[:, :, None, None], img)

    img = img + noise * rng.standard_normal(img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _synthetic_split(
    n: int, num_classes: int, size: int, noise: float, seed: np.random.SeedSequence
) -> dict[str, np.ndarray]:
    """A balanced, shuffled split of ``n`` synthetic images."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    chunks = [
        _synthetic_images(labels[i : i + _SYN_CHUNK], num_classes, size, noise, rng)
        for i in range(0, n, _SYN_CHUNK)
    ]
    empty = np.zeros((0, 3, size, size), np.uint8)
    return {"images": np.concatenate(chunks) if chunks else empty, "labels": labels}


def make_synthetic_classification(
    out: Path,
    n_train: int,
    n_val: int,
    n_test: int,
    num_classes: int,
    image_size: int,
    noise: float,
    seed: int,
    *,
    extra_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write a CIFAR-like offline classification set: learnable, but not trivially.

    Each class is a hue combined with a grating orientation; brightness ramps, grating
    contrast/frequency/phase, a random-colour distractor disc and Gaussian pixel noise of
    standard deviation ``noise`` (in [0, 1] units) vary per image. Classes are balanced.
    Each split has its own seed stream, so changing one split's size leaves the others alone.
    """
    if num_classes < 2 or image_size < 1 or noise < 0 or min(n_train, n_val, n_test) < 0:
        raise DataError(
            f"invalid synthetic parameters: num_classes={num_classes}, "
            f"image_size={image_size}, noise={noise}, sizes={(n_train, n_val, n_test)}"
        )
    streams = np.random.SeedSequence(seed).spawn(len(SPLITS))
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
    splits = {
        name: _synthetic_split(sizes[name], num_classes, image_size, noise, stream)
        for name, stream in zip(SPLITS, streams, strict=True)
    }
    attrs = {
        "source": "synthetic",
        "task": "classification",
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "num_classes": num_classes,
        "image_size": image_size,
        "noise": float(noise),
        "seed": int(seed),
        "class_names": [f"class{k}" for k in range(num_classes)],
        **(extra_attrs or {}),
    }
    write_h5(Path(out), splits, attrs)


# --------------------------------------------------------------------------------------------
# smoke photographs from scikit-image
# --------------------------------------------------------------------------------------------


# RGB photographs bundled inside the scikit-image wheel (no network needed), mapped to their
# ``skimage.data`` loader. ``cat`` is the same photograph as ``chelsea`` and is left out so it
# cannot leak across splits; ``camera`` is grey and is replicated to RGB.
_PHOTOS = {
    "astronaut": "astronaut",
    "coffee": "coffee",
    "rocket": "rocket",
    "immunohistochemistry": "immunohistochemistry",
    "chelsea": "chelsea",
    "motorcycle": "stereo_motorcycle",  # returns (left, right, disparity): left is used
    "camera": "camera",
}
SMOKE_TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry")
SMOKE_TEST_PHOTOS = ("chelsea", "motorcycle")


def _load_photo(name: str) -> np.ndarray:
    """A bundled photograph as uint8 (H, W, 3); grey ones are replicated to RGB."""
    if name not in _PHOTOS:
        raise DataError(f"unknown smoke photo {name!r}; choose from {sorted(_PHOTOS)}")
    from skimage import data

    loaded = getattr(data, _PHOTOS[name])()
    image = np.asarray(loaded[0] if isinstance(loaded, tuple) else loaded)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)


def _crops(
    photos: Sequence[np.ndarray],
    rows: Sequence[tuple[int, int]],
    size: tuple[int, int],
    n: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``n`` random crops, cycling through the photos; ``rows[i]`` bounds photo i's rows."""
    th, tw = size
    images = np.zeros((n, 3, th, tw), np.uint8)
    origin = np.zeros((n, 3), np.int64)
    for i in range(n):
        k = i % len(photos)
        (lo, hi), width = rows[k], photos[k].shape[1]
        if hi - lo < th or width < tw:
            raise DataError(f"crop size {size} does not fit photo rows {lo}:{hi} x {width}")
        top = int(rng.integers(lo, hi - th + 1))
        left = int(rng.integers(0, width - tw + 1))
        images[i] = photos[k][top : top + th, left : left + tw].transpose(2, 0, 1)
        origin[i] = (k, top, left)
    return {"images": images, "crop_origin": origin}


def make_smoke_photos(
    out: Path,
    size: tuple[int, int],
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    *,
    train_photos: Sequence[str] = SMOKE_TRAIN_PHOTOS,
    test_photos: Sequence[str] = SMOKE_TEST_PHOTOS,
    val_rows_fraction: float = 0.25,
    extra_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write an offline denoising set of crops of ``size`` (H, W) from scikit-image photos.

    Train and validation crops come from ``train_photos`` (validation from the bottom
    ``val_rows_fraction`` of each photo's rows, train from the rest, so they never overlap);
    test crops come from the held-out ``test_photos``. ``crop_origin`` records
    (photo index within the split's list, top, left) of every crop.
    """
    if set(train_photos) & set(test_photos):
        raise DataError(f"train and test photos overlap: {set(train_photos) & set(test_photos)}")
    if not train_photos or not test_photos or not 0.0 < val_rows_fraction < 1.0:
        raise DataError("need train and test photos and 0 < val_rows_fraction < 1")
    size = (int(size[0]), int(size[1]))
    train_imgs = [_load_photo(name) for name in train_photos]
    test_imgs = [_load_photo(name) for name in test_photos]
    # Photos too small for a crop (the rehearsal's 321x481: the validation rows are a quarter
    # of a photo) are enlarged by one integer factor, repeating pixels; 1 at smoke sizes.
    share = min(val_rows_fraction, 1.0 - val_rows_fraction)
    need = [size[0] / (share * im.shape[0]) for im in train_imgs]
    need += [size[0] / im.shape[0] for im in test_imgs]
    need += [size[1] / im.shape[1] for im in train_imgs + test_imgs]
    factor = max(1, math.ceil(max(need)))
    if factor > 1:
        train_imgs = [im.repeat(factor, 0).repeat(factor, 1) for im in train_imgs]
        test_imgs = [im.repeat(factor, 0).repeat(factor, 1) for im in test_imgs]
    cuts = [img.shape[0] - int(round(val_rows_fraction * img.shape[0])) for img in train_imgs]
    rng_train, rng_val, rng_test = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(SPLITS))
    )
    splits = {
        "train": _crops(train_imgs, [(0, c) for c in cuts], size, n_train, rng_train),
        "val": _crops(
            train_imgs,
            [(c, im.shape[0]) for c, im in zip(cuts, train_imgs, strict=True)],
            size,
            n_val,
            rng_val,
        ),
        "test": _crops(test_imgs, [(0, im.shape[0]) for im in test_imgs], size, n_test, rng_test),
    }
    attrs = {
        "source": "skimage",
        "task": "denoising",
        "photos": {
            "train": list(train_photos),
            "val": list(train_photos),
            "test": list(test_photos),
        },
        "size": list(size),
        "val_rows_fraction": float(val_rows_fraction),
        "upscale": factor,
        "seed": int(seed),
        **(extra_attrs or {}),
    }
    write_h5(Path(out), splits, attrs)
