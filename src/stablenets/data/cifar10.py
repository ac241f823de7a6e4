"""CIFAR-10 from the official python archive (only the globals its pickles need are
loaded) to the HDF5 layout of :mod:`stablenets.data.format`, with a seeded validation split.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stablenets.data.download import archive_record, extracted
from stablenets.data.format import DataError, write_h5

# The official CIFAR-10 python archive: format constants, not tunables.
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_SHAPE = (3, 32, 32)
#: The classes of CIFAR-10, labelled 0 .. 9 (``data.shapes`` reports them to the config checks).
CIFAR10_CLASSES = 10


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


# What unpickling damaged bytes raises besides UnpicklingError: a flipped opcode or length
# calls an allowed global with wrong arguments, or numpy's __setstate__ with a wrong state.
_DAMAGED_PICKLE = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    LookupError,  # KeyError, IndexError, an unknown encoding
    AttributeError,
    ArithmeticError,  # OverflowError: a length beyond any size
    MemoryError,
    RuntimeError,  # numpy's, on a state it cannot restore
    SystemError,  # numpy's, likewise
)


def _check_memo(data: bytes) -> None:
    """Refuse a memo index beyond the pickle's own length before unpickling: the C unpickler
    sizes its memo by the largest index, so one flipped bit in a ``LONG_BINPUT`` allocated and
    cleared many GB (the machine's memory). ``genops`` only parses (damage: ``ValueError``).
    Raises what damage raises (``UnpicklingError``), for ``_load_pickle`` to name the file."""
    for count, (op, arg, _) in enumerate(pickletools.genops(data)):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int) and arg > count:
            raise pickle.UnpicklingError(f"memo index {arg} at op {count}")


def _load_pickle(path: Path) -> dict:
    """One pickle of the archive, unpickled from memory (a damaged length asks for no more than
    it holds: from the file, one flipped bit allocated many GB) with only the globals
    ``_PICKLE_ALLOWED``; a damaged one is a ``DataError`` naming the member."""
    try:
        data = path.read_bytes()
        _check_memo(data)
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _DAMAGED_PICKLE as exc:
        raise DataError(f"{path.name}: not a CIFAR-10 pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path.name}: expected a dict, got {type(obj).__name__}")
    return obj


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one CIFAR-10 batch file. Labels
    must be integers of the ``CIFAR10_CLASSES`` classes: a float would be truncated to another
    class, and one beyond them fail a job only once it trains or evaluates."""
    batch = _load_pickle(path)
    if b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path.name}: missing b'data' or b'labels'")
    try:
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (ValueError, TypeError) as exc:  # ragged lists
        raise DataError(f"{path.name}: b'data' or b'labels' is not an array ({exc})") from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != np.prod(_CIFAR_SHAPE):
        raise DataError(f"{path.name}: b'data' is {data.dtype} {data.shape}, not uint8 (N, 3072)")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path.name}: b'labels' are {labels.dtype}, not integers")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path.name}: b'labels' has shape {labels.shape}, not ({len(data)},)")
    outside = labels[(labels < 0) | (labels >= CIFAR10_CLASSES)]
    if outside.size:
        raise DataError(
            f"{path.name}: label {int(outside[0])} is outside 0 .. {CIFAR10_CLASSES - 1}"
            f" ({outside.size} of {labels.size} labels)"
        )
    return data.reshape(-1, *_CIFAR_SHAPE), labels.astype(np.int64)


def _batch_number(path: Path) -> int:
    """The ``N`` of ``data_batch_N``: batches sort by it, so ``data_batch_10`` follows 9."""
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


def _class_names(meta: Path) -> list[str]:
    """The ``CIFAR10_CLASSES`` class names from ``batches.meta`` when present, else the label
    numbers."""
    if meta.is_file():
        names = _load_pickle(meta).get(b"label_names")
        if names:
            if len(names) != CIFAR10_CLASSES:
                raise DataError(f"{meta.name}: {len(names)} label_names, not {CIFAR10_CLASSES}")
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [str(k) for k in range(CIFAR10_CLASSES)]


def random_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted train and validation indices."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


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
    with extracted(archive, out) as root:
        train_files, test_file, meta = _cifar_files(root, archive)
        parts = [_cifar_batch(p) for p in train_files]
        x_all = np.concatenate([p[0] for p in parts])
        y_all = np.concatenate([p[1] for p in parts])
        x_test, y_test = _cifar_batch(test_file)
        class_names = _class_names(meta)
    train_idx, val_idx = random_split(len(y_all), val_fraction, split_seed)
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
        **archive_record(archive, provenance),
        "train_batches": [p.name for p in train_files],
        "val_fraction": float(val_fraction),
        "split_seed": int(split_seed),
        "class_names": class_names,
        "num_classes": len(class_names),
        **(extra_attrs or {}),
    }
    write_h5(out, splits, attrs)
