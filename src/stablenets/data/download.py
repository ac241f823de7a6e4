"""Downloads refused without a checksum, and archives extracted only after every member
has been checked (no path, link or device escapes the destination).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from stablenets.atomic import atomic_path, install, remove_stale_temporaries
from stablenets.data.format import DataError

_CHUNK_BYTES = 1 << 20
PROGRESS_EVERY_S = 10.0  # seconds between a download's progress lines
_MAX_LINK_HOPS = 40  # symlink chain length treated as a loop, as the OS does
# a download's temporary unmodified this long was left by a killed download (a live one grows)
STALE_DOWNLOAD_S = 900.0
# the partial download a rerun resumes, beside the file: ``.<name><PARTIAL_SUFFIX>``
_LOCK_SUFFIX = ".lock"  # beside a partial download, where its lock is a record lock (``_lock``)
PARTIAL_SUFFIX = ".partial"
# times the partial is opened again when the one locked was renamed or removed meanwhile
_LOCK_TRIES = 10
# errors of the cache's own disk, which the next mirror would meet again
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


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


def _holds(path: Path, expected: Mapping[str, str]) -> bool:
    """Whether ``path`` hashes to every digest in ``expected``."""
    return file_digests(path, list(expected)) == dict(expected)


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


def _progress(url: str, done: int, total: int | None, seconds: float, resumed: int = 0) -> str:
    """``downloading <url>: 41.9 of 170.5 MB (25 %), 4.2 MB/s, ETA 31 s`` (no size, no ETA
    when the server does not say how long the file is); the rate counts the bytes fetched in the
    ``seconds``, not the ``resumed`` ones an earlier run fetched."""
    rate = (done - resumed) / max(seconds, 1e-9)
    speed = f"{rate / 1e6:.1f} MB/s" if rate >= 1e6 else f"{rate / 1e3:.1f} kB/s"
    if not total:
        return f"downloading {url}: {done / 1e6:.1f} MB, {speed}"
    eta = (total - done) / rate if rate > 0 else float("inf")
    return (
        f"downloading {url}: {done / 1e6:.1f} of {total / 1e6:.1f} MB ({100 * done / total:.0f} %), "
        f"{speed}, ETA {eta:.0f} s"
    )


def _open_from(url: str, offset: int, timeout: float) -> tuple[Any, int]:
    """The response to ``url`` and the byte it starts at: ``offset`` where an http(s) server
    answered ``Range: bytes=<offset>-`` with 206 and that range, else 0: the file is fetched
    whole after a 200 (a server without ranges), from a ``file:`` URL, after a 416 (as many
    bytes held as the file has, or more: they are not trusted to be it) and after a 206 of
    another range (neither the rest nor the whole file: it is asked for again, whole)."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise DataError(f"unsupported URL scheme {scheme!r}")
    request = urllib.request.Request(url)
    if offset and scheme != "file":
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        exc.close()
        return _open_from(url, 0, timeout)
    status, ranged = getattr(response, "status", None), response.headers.get("Content-Range", "")
    if status == 206 and ranged.startswith(f"bytes {offset}-"):
        return response, offset
    if status == 206 and offset:  # another range than asked: neither the rest nor the whole
        response.close()
        return _open_from(url, 0, timeout)
    return response, 0


def _fetch(
    url: str,
    target: Path,
    timeout: float,
    log: Callable[[str], None] | None = None,
    every_s: float = PROGRESS_EVERY_S,
) -> int:
    """Stream ``url`` (http, https or file) into ``target``, resuming: the bytes ``target``
    already holds (a killed download's) are asked for no more, and the rest appended where the
    server sends just that (``_open_from``); otherwise ``target`` is written from its start.
    Returns the byte it resumed at (0: written whole). With ``log``, a progress line
    (``_progress``) every ``every_s`` seconds and one at the end."""
    held = target.stat().st_size if target.exists() else 0
    response, start_at = _open_from(url, held, timeout)
    with response, open(target, "ab" if start_at else "wb") as out:
        if log is not None and start_at:
            log(f"resuming {url} at {start_at / 1e6:.1f} MB")
        length = response.headers.get("Content-Length")
        total = start_at + int(length) if length and length.isdigit() else None
        done, start = start_at, time.monotonic()
        last = start
        # read1: what has arrived, up to a chunk (read waits for a whole MiB, which a server at
        # kB/s takes minutes to send: no progress line, no byte on disk for a kill to keep)
        while chunk := response.read1(_CHUNK_BYTES):
            out.write(chunk)
            out.flush()  # on disk as it arrives: a kill keeps it for the rerun to resume
            done += len(chunk)
            if log is not None and time.monotonic() - last >= every_s:
                last = time.monotonic()
                log(_progress(url, done, total, last - start, start_at))
        if total is not None and done < total:  # http.client ends a cut-off body quietly
            raise ConnectionError(f"the connection closed after {done} of {total} bytes")
        if log is not None:
            got = (done - start_at) / 1e6
            log(f"downloaded {url}: {got:.1f} MB in {time.monotonic() - start:.0f} s")
    return start_at


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not renamed or removed)."""
    try:
        named, opened = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _lock_partial(partial: Path) -> tuple[int, int | None] | None:
    """``partial`` opened (created if absent) and locked (``_lock``) by this process: its
    descriptor and that of its lock file where it has one; None where another process holds the
    lock (it is downloading into it), the file system serves no lock, or it cannot be opened.
    One its holder renamed or removed before the lock was had is not locked but opened anew."""
    for _ in range(_LOCK_TRIES):
        try:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return None
        lock, lock_fd = _lock(fd, partial)
        if lock != "locked":
            if lock == "none" and os.fstat(fd).st_size == 0 and _same_file(fd, partial):
                partial.unlink()  # no download keeps a partial here: none is left behind
            os.close(fd)
            return None
        if _same_file(fd, partial):
            return fd, lock_fd
        _release(partial, fd, lock_fd)
    return None


def _lock(fd: int, partial: Path) -> tuple[str, int | None]:
    """Lock the open ``partial`` (``fd``) for this process without waiting: ``"locked"``,
    ``"held"`` (by another process) or ``"none"`` (this file system serves no lock), and the
    descriptor of the lock file where one holds it. ``flock`` on the partial itself; where the
    file system serves none (Lustre mounted without ``-o flock``: ENOSYS), a POSIX record lock
    (``lockf``, which NFS and Lustre serve) on ``<partial>.lock``: a record lock goes as soon as
    its process closes any descriptor of its file, and the partial is opened again to be
    checked and appended to, the lock file nowhere else."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "locked", None
    except BlockingIOError:  # held by another download
        return "held", None
    except OSError:  # ENOSYS, ENOLCK, EOPNOTSUPP: no flock here
        pass
    path = f"{partial}{_LOCK_SUFFIX}"
    try:
        lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return "none", None
    try:
        fcntl.lockf(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN, EACCES: held by another download
        os.close(lock_fd)
        return "held", None
    except OSError:  # no lock at all here: nothing relies on the file
        os.close(lock_fd)
        with suppress(OSError):
            os.unlink(path)
        return "none", None
    if not _same_file(lock_fd, Path(path)):  # its holder removed it meanwhile, done: another
        os.close(lock_fd)  # may hold a new one by that name, so this one locks nothing
        return "held", None
    return "locked", lock_fd


def _release(partial: Path, fd: int, lock_fd: int | None) -> None:
    """Close the partial's descriptor, then its lock file's (releasing the lock), removing the
    lock file first where the partial is gone (installed or removed under the lock: a process
    that opened it before finds it gone and opens it anew)."""
    gone = not _same_file(fd, partial)
    os.close(fd)
    if lock_fd is not None:
        lock = Path(f"{partial}{_LOCK_SUFFIX}")
        if gone and _same_file(lock_fd, lock):  # its own, not one another process made since
            with suppress(OSError):
                lock.unlink()
        os.close(lock_fd)


@contextmanager
def _partial_download(dest: Path) -> Iterator[Path | None]:
    """The partial download ``.<name>.partial`` beside ``dest``, locked for this process while
    the block runs, for a download to resume (``_resume``); None where another process holds it
    (that one downloads into it, this one into a temporary of its own, as both did before; each
    is verified and renamed). Left holding bytes, it stays for the next run; empty, it goes."""
    partial = dest.with_name(f".{dest.name}{PARTIAL_SUFFIX}")
    held = _lock_partial(partial)
    if held is None:
        yield None
        return
    fd, lock_fd = held
    try:
        yield partial
    finally:
        if os.fstat(fd).st_size == 0 and _same_file(fd, partial):
            partial.unlink()  # before the lock goes: no other process can hold it yet
        _release(partial, fd, lock_fd)


def _discard_partial(dest: Path, log: Callable[[str], None] | None) -> None:
    """Remove the partial download of a verified ``dest`` (a killed run's, which another run
    then completed): nothing would resume it, and it may be as large as the file. One that
    another process holds is left to it."""
    with _partial_download(dest) as partial:
        if partial is not None and partial.stat().st_size > 0:
            os.truncate(partial, 0)  # removed as the block ends, under the lock
            if log is not None:
                log(f"removed {partial}: {dest.name} is downloaded and verified")


#: Resumes of one URL at once, each after a cut-off that brought new bytes (``_resume``).
MAX_RESUMES = 100


def _resume(
    url: str,
    partial: Path,
    dest: Path,
    expected: Mapping[str, str],
    timeout: float,
    log: Callable[[str], None] | None,
    every_s: float,
) -> None:
    """Fetch ``url`` into the locked ``partial``, resuming the bytes it holds (a killed run's),
    check it and rename it onto ``dest``. A fetch cut off or timed out after new bytes is
    resumed at once, up to ``MAX_RESUMES`` times: a slow host drops connections (BSDS500's
    served 2-10 kB/s and cut one download off six times), and each drop ended the job; one
    that brought nothing, or a refusal by the server, is the URL's failure. A file that fails
    its checksum is emptied, never resumed again; a resumed one is then fetched again whole
    (its first part may be another file's: a mirror's damaged copy, an older version), a whole
    one raises the checksum error."""
    resumes = 0
    while True:
        held = partial.stat().st_size
        try:
            resumed = _fetch(url, partial, timeout, log, every_s)
        except (OSError, http.client.HTTPException) as exc:
            refused = isinstance(exc, urllib.error.HTTPError)
            disk = isinstance(exc, OSError) and exc.errno in _DISK_ERRORS
            if refused or disk or resumes == MAX_RESUMES or partial.stat().st_size <= held:
                raise
            resumes += 1
            if log is not None:
                log(f"{url}: {exc}; resuming at {partial.stat().st_size / 1e6:.1f} MB")
            continue
        try:
            _check_digests(partial, expected, url)
        except DataError as exc:
            os.truncate(partial, 0)
            if not resumed:
                raise
            if log is not None:
                log(f"fetching {url} again from its start: the resumed file failed ({exc})")
            continue
        install(partial, dest)  # as atomic_path does: flushed, a new file's mode
        return


def download(
    urls: str | Sequence[str],
    dest: Path,
    md5: str | None = None,
    sha256: str | None = None,
    *,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = None,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> Path:
    """Download ``dest`` from the first of ``urls`` (one, or mirrors in order) whose content has
    the checksum.

    A checksum is mandatory: an unverified dataset would make every result downstream
    unreproducible. The file is streamed to ``.<name>.partial`` beside ``dest``, verified and
    renamed, so ``dest`` is either absent or complete. A download cut off after new bytes
    resumes at once (``_resume``); one that was killed, or cut off with none,
    resumes there on the next run: the rest is asked for with an http ``Range`` and appended (from the start
    where a server sends the whole file or another range); one that already holds the whole
    file (killed before its rename) is renamed without touching the network. While another
    process downloads into it (a lock says so), this one downloads into a temporary of its own.
    An existing ``dest`` with the right checksum is kept without touching the network (a
    partial beside it is removed); temporaries of downloads killed before (unmodified for
    ``STALE_DOWNLOAD_S``) are removed. ``timeout``: seconds per socket operation (the
    connection, each read). ``log`` gets a progress line (MB done, rate, ETA) every
    ``progress_every_s`` seconds, one at the end of each fetch, and one per failed mirror.
    """
    dest = Path(dest)
    urls = [urls] if isinstance(urls, str) else list(urls)
    expected = _expected_digests(md5, sha256, str(dest))
    if not urls:
        raise DataError(f"{dest}: no URL given")
    failures = []
    for stale in remove_stale_temporaries(dest, ".part", idle_s=STALE_DOWNLOAD_S):
        if log is not None:
            log(f"removed {stale}, left by a download that was killed")
    if dest.is_file():
        try:
            _check_digests(dest, expected, str(dest))
        except DataError as exc:  # stale or corrupt copy: fetch it again, replacing it atomically
            failures.append(f"the cached copy: {exc}")  # said if no URL answers (offline)
            if log is not None:
                log(f"fetching again: {exc}")
        else:
            _discard_partial(dest, log)
            return dest
    try:  # a cache it cannot write to fails here, once, not as every mirror's failure
        dest.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=dest.parent).close()
    except OSError as exc:
        raise DataError(f"cache folder {dest.parent}: cannot write: {exc.strerror}") from None
    with _partial_download(dest) as partial:
        if partial is not None and _holds(partial, expected):
            install(partial, dest)
            if log is not None:
                log(f"installed {partial}: it held all of {dest.name}, verified")
            return dest
        for url in urls:
            try:
                if partial is not None:
                    _resume(url, partial, dest, expected, timeout, log, progress_every_s)
                    return dest
                with atomic_path(dest, suffix=".part") as tmp:  # renamed only if verified
                    _fetch(url, tmp, timeout, log, progress_every_s)
                    _check_digests(tmp, expected, url)
            # URLError is an OSError, DataError a ValueError; HTTPException covers truncation.
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
                    raise DataError(
                        f"cache folder {dest.parent}: {exc.strerror} while downloading {url}"
                    ) from None
                failures.append(f"{url}: {exc}")
                if log is not None:
                    log(f"failed {url}: {exc}")
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
    """What ``_check_member`` needs to know of a tar member: symlink, hardlink, device (or
    fifo) or file (a directory counts as one)."""
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        return "device"
    return "file"


def _extract_tar(archive: Path, into: Path) -> list[str]:
    """Check every tar member, then extract with tarfile's ``data`` filter as a second guard;
    then read the compressed stream to its end, where gzip keeps its CRC: tarfile stops at the
    end-of-archive block, so a flipped byte inside the stream changed pixels without a word."""
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        links = {"/".join(_parts(m.name)): m.linkname for m in members if m.issym()}
        before: set[str] = set()
        for m in members:
            _check_member(archive, m.name, _tar_kind(m), m.linkname or None, links)
            if m.islnk() and "/".join(_parts(m.linkname)) not in before:  # tarfile: KeyError
                raise DataError(
                    f"{archive}: hardlink {m.name!r} -> {m.linkname!r} names no member before it"
                )
            before.add("/".join(_parts(m.name)))
        try:
            tar.extractall(into, members=members, filter="data")
        except tarfile.FilterError as exc:
            raise DataError(f"{archive}: refused by tarfile's data filter: {exc}") from exc
        stream = tar.fileobj
        if stream is not None:
            while stream.read(_CHUNK_BYTES):
                pass
    return [m.name for m in members if m.isfile()]


def _zip_kind(info: zipfile.ZipInfo) -> str:
    """What ``_check_member`` needs to know of a zip member, from the Unix mode its external
    attributes may hold (zipfile itself treats every member as a file): symlink, device (or
    fifo, socket) or file."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "device"
    return "file"


def _check_zip_readable(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuse a member zipfile cannot read, which it says only when it gets there, outside the
    errors of a damaged archive: an encrypted one (RuntimeError) or one compressed by a method
    it lacks, e.g. deflate64 (NotImplementedError). Opening it reads its header alone."""
    try:
        zf.open(info).close()
    except (RuntimeError, NotImplementedError) as exc:
        raise DataError(f"{archive}: member {info.filename!r} cannot be read: {exc}") from exc


def _extract_zip(archive: Path, into: Path) -> list[str]:
    """Check every zip member (zipfile writes symlinks as plain files), then extract."""
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_zip_readable(archive, zf, info)
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
    # a corrupt compressed stream: OSError (gzip, bz2), zlib.error or lzma.LZMAError
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error,
            lzma.LZMAError) as exc:  # fmt: skip
        raise DataError(f"{archive}: cannot extract: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(dest.joinpath(*_parts(name)) for name in names)


@contextmanager
def extracted(archive: Path, near: Path) -> Iterator[Path]:
    """Safely extract ``archive`` into a temporary directory next to ``near``; removed after."""
    near.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=near.parent, prefix=f".{near.name}.") as work:
        root = Path(work) / "archive"
        safe_extract(archive, root)
        yield root


def archive_record(archive: Path, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance attributes shared by the archive-based datasets."""
    return {
        "provenance": dict(provenance),
        "archive_name": archive.name,
        "archive_sha256": file_digests(archive, ["sha256"])["sha256"],
    }
