"""What a killed job's rerun resumes from: the progress it saved, one file per job.

``SavedProgress`` holds a job's named entries in one torch file that every assignment rewrites
atomically (``atomic_path``), tagged with the job's ``key`` (its spec's hash, its inputs'
digests, the layout's version). A rerun of the same job reads it back; a file of another key, or
a damaged or foreign one, is ignored with a log line and overwritten; a read the machine fails
(an I/O error, memory) raises, leaving the file for the next rerun. Given a ``StopFlag``, the
job stops on SIGTERM/SIGUSR1 where it calls ``stop_point``, before each unit of work
(``Interrupted``, exit 75): everything done is saved, and a signal that arrives during the last
unit lets the job finish instead of costing a requeue. ``in_groups`` runs a job image group by
image group, each group saved as it ends, and joins the groups' results.
Training keeps its own checkpoints (``train.checkpoints``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stablenets.atomic import atomic_path, remove_stale_temporaries
from stablenets.errors import raise_if_transient
from stablenets.interrupt import Interrupted, StopFlag
from stablenets.progress import timing

__all__ = ["SavedProgress", "in_groups"]

Log = Callable[[str], None]


_RESERVED = ("key", "settings")  # what the file holds beside the job's entries


class SavedProgress(MutableMapping[str, Any]):
    """A job's saved entries (tensors, numbers, strings, and lists and dicts of them: what
    ``torch.load(weights_only=True)`` reads back), written through to ``path`` at every
    assignment. ``settings``, the settings ``key`` hashes, are saved with them, so a rerun
    with other settings names the ones that changed."""

    def __init__(
        self,
        path: Path,
        key: str,
        log: Log,
        stop: StopFlag | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.path, self.key, self.stop, self.settings = Path(path), key, stop, settings
        for stale in remove_stale_temporaries(self.path):
            log(f"removed {stale.name}, the temporary of an interrupted progress write")
        self._entries = self._read(log)

    def _read(self, log: Log) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged or foreign file: start afresh, said in the log
            raise_if_transient(err, f"progress {self.path}")  # the machine's: the file is kept
            log(f"ignoring unreadable {self.path}: {err}")
            return {}
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            found = saved.get("key") if isinstance(saved, dict) else type(saved).__name__
            changed = (
                _changed(saved.get("settings"), self.settings) if isinstance(saved, dict) else []
            )
            why = f"settings changed: {', '.join(changed)}" if changed else f"written for {found}"
            log(
                f"ignoring {self.path} ({why}; this run is {self.key}): starting afresh, the "
                "file is replaced at the first save"
            )
            return {}
        return {name: value for name, value in saved.items() if name not in _RESERVED}

    def save(self) -> None:
        """Write every entry (atomically: a kill leaves the previous file)."""
        reserved = {"key": self.key, "settings": self.settings}
        with atomic_path(self.path) as tmp:
            torch.save({**reserved, **self._entries}, tmp)

    def stop_point(self) -> None:
        """Where a job may stop, before a unit of work: if a stop signal arrived, end the job
        (``Interrupted``; every entry is already saved)."""
        if self.stop is not None and self.stop.raised:
            raise Interrupted(
                f"signal {self.stop.signum}: progress {self.path} written; rerun to resume"
            )

    def section(self, name: str) -> MutableMapping[Any, Any]:
        """The entry ``name`` as a dict whose every assignment is saved (``save``)."""
        return _Section(self, name)

    def __getitem__(self, name: str) -> Any:
        return self._entries[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self._entries[name] = value
        self.save()

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self.save()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _changed(saved: object, now: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """The dotted names of the settings that differ between a saved and this run's settings
    (``evaluate.eps.num``); empty where either is unknown."""
    if not isinstance(saved, dict) or now is None:
        return []
    names = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b, name = saved.get(key), now.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            names += _changed(a, b, f"{name}.")
        elif a != b:
            names.append(name)
    return names


class _Section(MutableMapping[Any, Any]):
    """One entry of a ``SavedProgress``, a dict written through to its file."""

    def __init__(self, owner: SavedProgress, name: str) -> None:
        self._owner, self._name = owner, name
        if not isinstance(owner._entries.get(name), dict):
            owner._entries[name] = {}

    @property
    def _data(self) -> dict[Any, Any]:
        return self._owner._entries[self._name]

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._owner.save()

    def __delitem__(self, key: Any) -> None:
        del self._data[key]
        self._owner.save()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def in_groups(
    progress: SavedProgress,
    n: int,
    size: int,
    solve: Callable[[slice], dict[str, torch.Tensor]],
    what: str,
    log: Log,
) -> dict[str, np.ndarray]:
    """``solve`` over images ``0 .. n-1`` in consecutive groups of ``size``, in order, joined
    (``_joined``); each group's result (named tensors: one row per image, or per group) is saved
    (section ``groups``, by its first image) as it ends, and a rerun solves only the groups not
    saved; a stop signal ends the job before a group starts (``stop_point``), never after the
    last. A line per group: images done, elapsed time, ETA. Groups saved with another ``size``
    are solved again (their first images are not this run's)."""
    saved_size = progress.get("group_size")
    if saved_size != size:
        if "groups" in progress:
            log(f"{what}: ignoring the groups of {saved_size} images saved in "
                f"{progress.path}: this run's groups have {size}")  # fmt: skip
            del progress["groups"]
        progress["group_size"] = size
    groups = progress.section("groups")
    starts = range(0, n, size)
    todo = [s for s in starts if s not in groups]
    if len(todo) < len(starts):
        log(f"{what}: resuming from {progress.path}, {len(starts) - len(todo)} of "
            f"{len(starts)} image groups saved")  # fmt: skip
    begin = time.monotonic()
    for done, start in enumerate(todo, 1):
        progress.stop_point()
        end = min(start + size, n)
        groups[start] = solve(slice(start, end))
        log(f"{what}: images {start + 1}-{end} of {n} done, "
            f"{timing(done, len(todo), time.monotonic() - begin)}")  # fmt: skip
    return _joined([groups[s] for s in starts])


def _joined(groups: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """The groups' results as arrays over all their images, in order; per-iteration histories
    (image x iteration) padded with NaN, as after an image stops, to the longest group's."""
    out = {}
    for key in groups[0]:
        parts = [g[key] for g in groups]
        if parts[0].dim() == 2:
            k = max(t.shape[1] for t in parts)
            parts = [torch.nn.functional.pad(t, (0, k - t.shape[1]), value=math.nan) for t in parts]
        out[key] = torch.cat(parts).numpy()
    return out
