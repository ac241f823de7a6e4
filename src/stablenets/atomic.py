"""Atomic file writing, the one way every stablenets output reaches the disk.

``atomic_path(path)`` yields a fresh temporary name in ``path``'s folder; when the block ends
without an exception the file is flushed to disk (``fsync``), given the permissions ``open``
would give a new file, and renamed onto ``path`` (``os.replace`` is atomic within a folder). A
reader therefore sees either the old file or the complete new one, never a partial file, even
when the writer is killed with SIGKILL; on an exception the temporary file is removed. A writer
killed outright leaves its hidden ``.<name>.*<suffix>`` temporary behind, which
``remove_stale_temporaries`` clears. Only the standard library is used, so every layer may
import this module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "remove_stale_temporaries"]

TMP_SUFFIX = ".tmp"


def new_file_mode() -> int:
    """The permissions ``open`` gives a new file (0o666 less the umask); ``mkstemp`` uses 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


@contextmanager
def atomic_path(path: Path | str, suffix: str = TMP_SUFFIX) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` ends the temporary name (some writers pick the format from it, e.g. ``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path | str, data: str | bytes, encoding: str = "utf-8") -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding=encoding)


def remove_stale_temporaries(
    path: Path | str, suffix: str = "", idle_s: float | None = None
) -> list[Path]:
    """Remove the temporaries (files, or folders a writer extracts into) that a killed writer of
    ``path`` left behind, those ending in ``suffix``; returns what was removed.

    Without ``idle_s``, call this only where one process at a time writes ``path`` (e.g. a
    training job's own checkpoint): it cannot tell a dead writer's file from a live one's. With
    it, only temporaries unmodified for ``idle_s`` seconds go (a live writer's grows).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = []
    for leftover in sorted(path.parent.glob(f"{_temporary_prefix(path)}*{suffix}")):
        try:
            if idle_s is not None and time.time() - leftover.stat().st_mtime < idle_s:
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        except FileNotFoundError:  # another process removed it first
            continue
        stale.append(leftover)
    return stale
