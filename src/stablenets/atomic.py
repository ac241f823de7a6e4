"""Atomic file writing, the one way every stablenets output reaches the disk.

``atomic_path(path)`` yields a fresh temporary name in ``path``'s folder; when the block ends
without an exception the file is flushed to disk (``fsync``), given the permissions ``open``
would give a new file, and renamed onto ``path`` (``os.replace`` is atomic within a folder),
and the folder is flushed too, so that the rename survives a crash of the machine. A reader
therefore sees either the old file or the complete new one, never a partial file, even when the
writer is killed with SIGKILL; on an exception the temporary file is removed. A writer
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

__all__ = ["atomic_path", "atomic_write", "install", "remove_stale_temporaries"]

TMP_SUFFIX = ".tmp"


def _read_umask() -> int:
    """The process's umask: from ``/proc/self/status`` where Linux shows it, else by setting it
    and setting it back (once, at import: another thread could create a file meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def new_file_mode() -> int:
    """The permissions ``open`` gives a new file (0o666 less the umask, as read at import: a later
    ``os.umask`` is not seen); ``mkstemp`` uses 0o600."""
    return 0o666 & ~_UMASK


def _fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename in it) to disk, where the system can (not Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot flush a folder
        pass
    finally:
        os.close(fd)


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
        install(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install(written: Path | str, path: Path | str) -> None:
    """Rename the finished file ``written`` onto ``path`` (in the same folder) so that a crash
    leaves one or the other whole: its bytes flushed to disk first, the permissions of a new
    file (not ``mkstemp``'s 0o600), the folder flushed after the rename."""
    with open(written, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(written, new_file_mode())
    os.replace(written, path)
    _fsync_folder(Path(path).parent)


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
