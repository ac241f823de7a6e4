"""What a pipeline job needs around the maths: device choice, provenance, self-describing outputs.

* ``select_device("auto")`` picks CUDA when present; with several GPUs visible it takes the first
  one no other stablenets job holds (an exclusive ``flock`` per GPU), so concurrent local jobs do
  not all land on GPU 0.
* ``provenance(spec, seed, device, inputs)`` records the config hash, seed, package versions and
  git commit (and whether the checkout differed from it) that every output carries in its
  attributes, the device a job computed on and the sha256 of each file it was made from.
* ``write_results(path, attrs, datasets)`` writes an HDF5 file atomically; ``read_results`` is
  the one reader of result files (tables, figures, sidecars, tests), with one conversion of
  attributes to plain Python values (``attr_value``).
* ``write_sidecar(path, spec, seed, inputs)`` gives an output without attributes of its own (a
  CSV, Markdown or figure file) the same record in ``<stem>.provenance.json`` beside it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterable
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from stablenets.atomic import atomic_path, atomic_write
from stablenets.errors import first_line

if TYPE_CHECKING:
    import torch

__all__ = [
    "select_device",
    "config_hash",
    "provenance",
    "file_sha256",
    "content_sha256",
    "input_record",
    "write_results",
    "attr_value",
    "read_results",
    "write_sidecar",
    "sidecar_path",
]

_PACKAGES = ("stablenets", "torch", "torchvision", "numpy", "h5py", "snakemake")
_PACKAGE_DIR = Path(__file__).parent
_LOCK_DIR = Path(tempfile.gettempdir()) / "stablenets-gpu-locks"
_held_locks: list[int] = []  # descriptors of the GPU lock files this process holds


def _shared_lock_dir(directory: Path) -> None:
    """Create ``directory`` as ``/tmp`` is (mode 1777: every user adds lock files, none removes
    another's); one this user made before with a narrower mode is widened. A link there (which
    another user could plant) raises ``OSError``: nothing is changed through it."""
    with suppress(FileExistsError):
        directory.mkdir(mode=0o1777)  # the umask narrows the mode: chmod below
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        found = os.fstat(fd)
        if found.st_uid == os.geteuid() and found.st_mode & 0o7777 != 0o1777:
            os.fchmod(fd, 0o1777)
    finally:
        os.close(fd)


def _open_gpu_lock(path: Path) -> int | None:
    """A read-only descriptor of ``path`` (``flock`` needs no more), made readable by every user
    when this process creates it; ``None`` where this user may not open it (another user's file
    in a sticky folder under ``fs.protected_regular``: that GPU is skipped). The file is opened
    as it is, else created exclusively: opening another user's file with ``O_CREAT`` is what
    ``protected_regular`` refuses."""
    flags = os.O_RDONLY | os.O_NOFOLLOW
    while True:
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            pass
        except PermissionError:
            return None
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o444)
        except FileExistsError:  # another job created it meanwhile: open it as it is
            continue
        os.fchmod(fd, 0o444)  # the umask may have narrowed it
        return fd


def _claim_gpu_in(directory: Path, count: int) -> int | None:
    """Index of the first GPU whose lock file in ``directory`` this process can take (kept until
    exit), ``None`` when another process holds each. Raises ``OSError`` where the folder cannot
    be used (another user's, a link)."""
    _shared_lock_dir(directory)
    for index in range(count):
        fd = _open_gpu_lock(directory / f"gpu{index}.lock")
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if isinstance(err, BlockingIOError):
                continue
            raise
        _held_locks.append(fd)
        return index
    return None


def _claim_gpu(count: int) -> int:
    """Index of the first GPU no other stablenets job holds: lock files in ``_LOCK_DIR``, shared
    by every user, or, where those cannot be used (another user's), in this user's own
    ``_LOCK_DIR-<uid>`` (which sees this user's jobs only); with every GPU held, or neither
    folder usable, one by pid: the choice of a GPU never stops a job."""
    for directory in (_LOCK_DIR, _LOCK_DIR.with_name(f"{_LOCK_DIR.name}-{os.geteuid()}")):
        try:
            index = _claim_gpu_in(directory, count)
        except OSError:
            continue
        return os.getpid() % count if index is None else index
    return os.getpid() % count


def select_device(setting: str) -> torch.device:
    """``auto`` -> a free CUDA device if any, else the CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as is.
    A CUDA device chosen is made the current one: CUDA graphs capture on the current device's
    streams, and a context opened on GPU 0 would take memory from the job that owns it."""
    import torch  # here, not at the top: the report jobs run without torch (reports.py)

    if setting == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        device = torch.device("cuda", _claim_gpu(count) if count > 1 else 0)
    else:
        device = torch.device(setting)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(
                f"device: {setting!r} requested but this machine has {count} CUDA device(s); "
                "use auto (a GPU if there is one, else the CPU) or cpu"
            )
        torch.cuda.set_device(device.index or 0)
    return device


def config_hash(spec: dict) -> str:
    """Short stable hash of a JSON-serialisable job specification."""
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.cache
def _git_state() -> tuple[str, bool | None]:
    """The checkout's ``HEAD`` commit, and whether its tracked files differ from it (``None``
    where that is not known), as at a job's first record: a result computed from edited code
    says so instead of naming a commit it did not come from."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=10, cwd=_PACKAGE_DIR
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return "unknown", None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return commit, None if changes is None else bool(changes)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def provenance(
    spec: dict, seed: int, device: torch.device | str | None = None, inputs: Iterable[Path] = ()
) -> dict[str, Any]:
    """Attributes every output carries: what produced it, from which code (commit, and whether
    the checkout differed from it), from which files (``inputs``: each one's sha256, and its
    config hash and seed where it records them) and (for a job that computes) on which device:
    ``cpu`` or ``cuda:0 NVIDIA H100 80GB HBM3``, so a time recorded with it (training time,
    seconds per point, ``cost.csv``) says what it was measured on; a ``str`` is such a label
    already (``train.memory.device_label``: a training's steps may have run elsewhere)."""
    if device is not None and not isinstance(device, str):
        from stablenets.train.memory import device_label  # torch: not for the report jobs

        device = device_label(device)
    return {
        "config_hash": config_hash(spec),
        "config": json.dumps(spec, sort_keys=True, default=str),
        "seed": int(seed),
        "versions": json.dumps(versions(), sort_keys=True),
        "git_commit": _git_state()[0],
        "git_dirty": _git_state()[1],
        **({"device": device} if device is not None else {}),
        **({"inputs": [input_record(Path(p)) for p in inputs]} if inputs else {}),
    }


def _attr(value: Any) -> Any:
    if value is None:
        return np.nan
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return value


def write_results(path: Path, attrs: dict[str, Any], datasets: dict[str, Any]) -> None:
    """One HDF5 file: scalar/string ``attrs`` (``None`` -> NaN) and ``datasets`` (``a/b`` names
    create groups); written to a temporary file and renamed, so no partial file is ever seen."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        for key, value in attrs.items():
            fh.attrs[key] = _attr(value)
        for key, value in datasets.items():
            array = value.detach().cpu().numpy() if hasattr(value, "detach") else value
            fh.create_dataset(key, data=np.asarray(array))


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value: numpy scalars -> int, float or bool, bytes ->
    str. :func:`write_results` stores ``None`` as NaN, booleans as 0/1 and lists and dicts as
    JSON strings, so a result file's attributes come back as numbers and strings (``json.loads``
    the JSON ones where they are needed)."""
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode() if isinstance(value, bytes) else value


def _dataset_names(fh: h5py.File) -> list[str]:
    names: list[str] = []
    fh.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def read_results(
    path: Path, datasets: Iterable[str] | None = None, required: Iterable[str] = ()
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Attributes (plain values, :func:`attr_value`) and datasets (by ``a/b`` name) of a results
    file: the ``datasets`` it has, every one when ``None``. Each name in ``required`` (an
    attribute, or one of ``datasets``) must be there: a table or figure without it would show a
    gap or a wrong number, so its absence is an error naming the file."""
    try:
        with h5py.File(path, "r") as fh:
            attrs = {key: attr_value(value) for key, value in fh.attrs.items()}
            names = _dataset_names(fh) if datasets is None else datasets
            data = {k: np.asarray(fh[k]) for k in names if isinstance(fh.get(k), h5py.Dataset)}
    except (OSError, RuntimeError, KeyError) as err:  # HDF5's, on a damaged file: name it
        raise ValueError(f"{path}: not a readable results file ({first_line(err)})") from None
    missing = [k for k in required if k not in attrs and k not in data]
    if missing:
        raise ValueError(
            f"{path}: has no {', '.join(missing)}; not a complete result file of this version "
            "(rerun the job that writes it)"
        )
    return attrs, data


def sidecar_path(path: Path) -> Path:
    """``<stem>.provenance.json`` beside ``path`` (one record per table or figure stem)."""
    return Path(path).with_suffix(".provenance.json")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, computed once per file version (path, inode, size, mtime):
    a job's progress key and its provenance hash its inputs once between them."""
    path = Path(path)
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.cache
def _sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# the attributes ``provenance`` writes about the run (code, machine, config text), not about
# what the file holds: two files that differ only there hold the same thing
RUN_RECORD = ("config", "config_hash", "versions", "git_commit", "git_dirty", "device", "inputs")
# what a model file holds for the jobs that read it: the model, not its training's record
_MODEL_CONTENT = ("format", "name", "kwargs", "state_dict")


def content_sha256(path: Path) -> str:
    """The sha256 of what an input file holds for the jobs that read it, blind to the record of
    the run that wrote it: an HDF5 file's datasets and attributes less ``RUN_RECORD``, a model
    file's model (``_MODEL_CONTENT``: not its training's times, memory or commit), any other
    file's bytes. Saved progress keys on it: a model saved again by a resumed training (new
    timings) or data written again under a new commit leave a job's saved work valid, new
    weights or new images do not. Computed once per file version, as ``file_sha256``."""
    path = Path(path)
    stat = path.stat()
    return _content_sha256(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.cache
def _content_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    if path.endswith(".h5"):
        with h5py.File(path, "r") as fh:
            attrs = {k: attr_value(v) for k, v in fh.attrs.items() if k not in RUN_RECORD}
            digest.update(json.dumps(attrs, sort_keys=True, default=str).encode())
            for name in sorted(_dataset_names(fh)):
                array = np.ascontiguousarray(fh[name])
                digest.update(f"{name} {array.dtype.str} {array.shape}".encode())
                digest.update(array.tobytes())
    elif path.endswith(".pt"):
        import torch

        saved = torch.load(path, map_location="cpu", weights_only=True)
        held = {k: saved.get(k) for k in _MODEL_CONTENT} if isinstance(saved, dict) else saved
        state = held.pop("state_dict", None) if isinstance(held, dict) else None
        digest.update(json.dumps(held, sort_keys=True, default=str).encode())
        for name, tensor in sorted((state or {}).items()):
            array = tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy()
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(array.tobytes())
    else:
        return _sha256(path, inode, size, mtime_ns)
    return digest.hexdigest()


def input_record(path: Path) -> dict[str, Any]:
    """What an output records of a file it was made from: its path and sha256, and its config
    hash and seed (HDF5 attributes, else its own sidecar) where it has them."""
    record: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path)}
    try:
        if path.suffix == ".h5":
            found = read_results(path, ())[0]
        elif path.suffix == ".pt":
            return record
        else:
            found = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return record
    record.update({key: found[key] for key in ("config_hash", "seed") if key in found})
    return record


def write_sidecar(path: Path, spec: dict, seed: int, inputs: Any = ()) -> Path:
    """Write the provenance of the output ``path`` (made from ``inputs``) to its sidecar.

    ``seed`` is the job's seed, or -1 for an aggregate of several seeds (listed in ``seeds``).
    Written before the output itself, so an output never lacks its record.
    """
    record = {**provenance(spec, seed), "inputs": [input_record(Path(p)) for p in inputs]}
    record.update(
        output=Path(path).name,
        seeds=sorted({int(r["seed"]) for r in record["inputs"] if r.get("seed", -1) >= 0}),
    )
    side = sidecar_path(path)
    atomic_write(side, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return side
