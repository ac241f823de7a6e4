"""Stale Snakemake locks: clear the one a killed Snakemake left behind, never a live run's.

Snakemake locks its working directory (``.snakemake/locks/*.lock``) while it runs and removes the
lock when it ends, also on Ctrl-C. A Snakemake killed with SIGKILL (the OOM killer, ``kill -9``, a
lost session's process group) cannot, and the next run stops at "Directory cannot be locked"
asking for ``snakemake --unlock``, which removes a live run's lock just as readily.

``python -m stablenets.pipeline.locks [snakemake options]``, which ``make smoke``, ``make
smoke-slurm`` and ``make rehearsal`` run before Snakemake, removes the lock files only when no
process of the workflow runs in this directory: no Snakemake, and no job that a killed Snakemake
left running (``python -m stablenets <job>``: a rerun would start a second writer of its
checkpoint). Otherwise it leaves the lock and names the process, in one line, and exits 0: a
Snakemake whose outputs differ from the live run's (another scale) may start beside it, which
Snakemake's own lock allows. Without a lock it does nothing.

The removal is what ``snakemake --unlock`` does with its default file persistence (Snakemake
reads only ``.snakemake/locks/<n>.{input,output}.lock``), less its window: only the lock files
seen by the check go, after a second look finds no new lock file and no workflow process (a
Snakemake that started meanwhile keeps its lock), and two runs of this tool in one directory take
turns (an ``flock`` on ``.snakemake/stablenets-unlock.flock``).

SLURM jobs a killed Snakemake left in the queue (this user's jobs of Snakemake's SLURM executor,
comment ``rule_...``, working directory here) would be such second writers on other nodes. When
each was submitted from this machine (SLURM's ``AllocNode``) and no Snakemake runs here, their
Snakemake is dead: they are cancelled (``scancel``: SIGTERM, on which training and evaluation
save their progress and exit), the tool waits until they and their processes on this machine
are gone (``CANCEL_WAIT_S``), looks once more for a Snakemake or new jobs, and unlocks; the rerun
resumes them. The lock stays, with one line saying why, for jobs submitted from another machine
(whose Snakemake this machine cannot see) or from one SLURM does not name, and while ``squeue``
does not answer for a SLURM run: one whose options say ``executor: slurm`` (``--executor``, or a
profile's ``config.yaml``), or whose dead Snakemake left a job marked incomplete with a cluster
job id (``.snakemake/incomplete/``), as a SLURM run killed before a local one does.

A Snakemake counts however it was started (``snakemake``, Python with its options before the
script, ``-m snakemake``, a Nix or Guix wrapper: ``is_workflow_command``, generous, since one
counted wrongly only keeps a lock). Processes are read from ``/proc``, every user's: a workflow
process counts when its working directory is this directory or one below it, compared by device
and inode, so that a Snakemake in a container that mounts the project at another path counts too.
Where its working directory cannot be read it counts when it may hold the lock: it runs as this
user (under another group) or root, or its user owns one of the lock files; another user's
Snakemake elsewhere on a shared machine does not keep this user's stale lock. Without ``/proc``
(macOS) ``ps`` gives this user's command lines but no directories, so any Snakemake or job of
this user keeps the lock. A Snakemake on another machine that shares the file system is not seen.
Snakemake's default file persistence is assumed (``--persistence-backend db`` keeps its locks in
the database: unlock by hand).

A Snakemake the process list does not show (one in another container or PID namespace that
mounts the same folder, or hidden by ``/proc``'s ``hidepid``) still keeps its lock: the
workflow's Snakefile takes a shared ``flock`` on ``.snakemake/stablenets-live.flock`` when it is
read (``hold_live_marker``), which the kernel releases when that process ends, however it ends,
and the lock is removed only where an exclusive one can be had at once (on a file system without
locks, the process list alone decides). ``--directory``/``-d`` among the options names the
directory, as for Snakemake; profiles are looked for where Snakemake looks (a path, or a name in
the user's and the system's profile folders).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

from stablenets.pipeline.snakemake_args import options, profile_settings

__all__ = [
    "LOCK_DIR",
    "CANCEL_WAIT_S",
    "SlurmJob",
    "is_workflow_command",
    "workflow_processes",
    "slurm_jobs",
    "cancel_orphans",
    "unlock_if_stale",
    "hold_live_marker",
    "main",
]

LOCK_DIR = Path(".snakemake") / "locks"
PROC = Path("/proc")
# How long cancelled jobs may take to leave: SLURM's KillWait (30 s by default) between SIGTERM
# and SIGKILL, plus a checkpoint write and the controller's bookkeeping.
CANCEL_WAIT_S = 300.0
# Held by this tool while it checks and removes a lock (beside Snakemake's own files).
TOOL_LOCK = Path(".snakemake") / "stablenets-unlock.flock"
# Held (shared) by the main Snakemake of the workflow from the reading of its Snakefile to its end.
LIVE_MARKER = Path(".snakemake") / "stablenets-live.flock"
_HELD: dict[tuple[int, int], int] = {}  # this process's live markers (device, inode) -> fd
# How long a held marker is looked at again before it counts: a process killed a moment ago has
# left the process list (its command line goes with its memory) before its files are closed.
MARKER_SETTLE_S = 3.0
_MAX_DEPTH = 256  # folders walked up from a working directory


# Program names (a path's last part) of Snakemake, of the pipeline's console script and of
# Python: as installed, and as Nix (``.snakemake-wrapped``, ``.python3.11-wrapped``) or Guix
# (``.snakemake-real``) wrap them.
_WRAPPED = r"(?:-wrapped|-real)*"
_SNAKEMAKE = re.compile(rf"\.*snakemake{_WRAPPED}")
_JOB_SCRIPT = re.compile(rf"\.*stablenets{_WRAPPED}")
_PYTHON = re.compile(rf"(?:[\w.]+-)?\.*(?:python|pypy)[\w.]*{_WRAPPED}")  # platform-python
# Launchers whose command runs on another machine (its process is not in this one's list)
_REMOTE_LAUNCHERS = ("srun", "salloc", "ssh")
# Python's options that take a value (``-W ignore``, ``-Wignore``; ``-c`` and ``-m`` end them)
_PYTHON_VALUED = "WX"
# The modules the workflow's jobs run as (``python -m stablenets <job>``, and its entry point)
_JOB_MODULES = ("stablenets", "stablenets.__main__", "stablenets.pipeline.cli")


def _python_runs(argv: list[str]) -> tuple[str, str] | None:
    """What Python's command line ``argv`` runs after its options: ``("module", name)`` (``-m
    name``, ``-mname``, also after ``-u``, ``-X utf8``, ``-W ignore``, ``-Im``...), ``("script",
    path)``, or ``None`` (``-c``, standard input, an interactive session)."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg == "-" or not arg.startswith("-"):
            break
        if arg.startswith("--"):  # --check-hash-based-pycs takes a value
            i += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        for j, flag in enumerate(arg[1:], start=2):  # a cluster: -uB, -Wignore, -msnakemake
            rest = arg[j:]
            if flag in "cm":
                value = rest or (argv[i + 1] if i + 1 < len(argv) else "")
                return ("module", value) if flag == "m" else None
            if flag in _PYTHON_VALUED:
                i += 0 if rest else 1  # its value: the rest of the word, or the next word
                break
        i += 1
    return ("script", argv[i]) if i < len(argv) else None


def _is_workflow_module(module: str) -> bool:
    """Snakemake (``snakemake``, ``snakemake.cli``...) or the pipeline's jobs (``_JOB_MODULES``;
    not this tool, a benchmark or the config check, which write no output of the workflow)."""
    return module == "snakemake" or module.startswith("snakemake.") or module in _JOB_MODULES


def is_workflow_command(argv: list[str]) -> bool:
    """Whether ``argv`` runs Snakemake or a pipeline job (``python -m stablenets <job>``), told by
    the program alone: ``argv[0]`` named as a Snakemake program (``snakemake``, Nix's
    ``.snakemake-wrapped``) or the console script ``stablenets``, or what Python runs after
    its options (``python -u -X utf8 .../bin/snakemake``, ``-m snakemake[.<module>]``,
    ``-mstablenets``). A word elsewhere is no program: a ``tmux new -s snakemake`` session, or
    ``conda run -n snakemake make``, would keep a dead run's lock for ever. Wrappers that exec
    (``nice``, ``nohup``, ``env``) become the program, and those that start it as a child
    (``conda run``, ``timeout``, a shell) leave the child in the process list. A launcher whose
    child runs on another machine (``srun``, ``salloc``, ``ssh``: ``_REMOTE_LAUNCHERS``) counts
    when any of its words from one on starts a workflow command (``srun -p gpu snakemake``,
    ``ssh node 'cd w && snakemake'``): told generously, as no process here shows the child."""
    if not argv:
        return False
    program = argv[0]
    if Path(program).name in _REMOTE_LAUNCHERS:
        words = [word for arg in argv[1:] for word in arg.split()]
        return any(is_workflow_command(words[i:]) for i in range(len(words)))
    if _PYTHON.fullmatch(Path(program).name):
        runs = _python_runs(argv)
        if runs is None:
            return False
        if runs[0] == "module":
            return _is_workflow_module(runs[1])
        program = runs[1]
    name = Path(program).name
    return bool(_SNAKEMAKE.fullmatch(name) or _JOB_SCRIPT.fullmatch(name))


def _proc_processes() -> Iterator[tuple[int, list[str], Path]]:
    """``(pid, argv, /proc/<pid>)`` of every user's processes whose command line can be read."""
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:  # ended meanwhile, or hidden
            continue
        yield int(entry.name), argv, entry


def _file_id(path: Path | str) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _works_in(entry: Path, directory: tuple[int, int]) -> bool:
    """Whether the process of ``/proc/<pid>`` ``entry`` works in the folder of device and inode
    ``directory`` or below it: its ``cwd``, then ``cwd/..`` and so on up to its root, which the
    kernel walks in the process's own mounts (a bind mount at another path is the same folder).
    Raises ``OSError`` where the directory cannot be read (``FileNotFoundError``: it ended)."""
    path, last = entry / "cwd", None
    for _ in range(_MAX_DEPTH):
        here = _file_id(path)
        if here == directory:
            return True
        if here == last:  # the root is its own parent
            return False
        path, last = path / "..", here
    return False


def _may_lock_here(entry: Path, directory: Path) -> bool:
    """Whether the process of ``/proc/<pid>`` ``entry``, whose working directory cannot be read,
    may hold ``directory``'s lock: it runs as this user (under another group, which hides its
    directory too) or as root, or its user owns one of the lock files. Other users' processes
    elsewhere on a shared machine do not keep a stale lock of this user's."""
    try:
        uid = entry.stat().st_uid
    except FileNotFoundError:  # ended meanwhile
        return False
    if uid in (0, os.geteuid()):
        return True
    owners = set()
    for path in (directory / LOCK_DIR).glob("*.lock"):
        try:
            owners.add(path.stat().st_uid)
        except FileNotFoundError:
            continue
    return uid in owners


def _ps_processes() -> Iterator[tuple[int, list[str], None]]:
    """``(pid, argv, None)`` of this user's processes, from ``ps`` (arguments split at spaces;
    no working directory)."""
    done = subprocess.run(
        ["ps", "-ww", "-U", str(os.getuid()), "-o", "pid=", "-o", "args="],  # -ww: whole lines
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ps failed, so no process can be checked: {done.stderr.strip()}")
    for line in done.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        yield int(pid), args.split(), None


def _slurm_job_of(pid: int) -> int | None:
    """The SLURM job a process runs in (its ``SLURM_JOB_ID``), or ``None``."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"SLURM_JOB_ID="):
            value = entry.partition(b"=")[2]
            return int(value) if value.isdigit() else None
    return None


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _counts(entry: Path, directory: Path, here: tuple[int, int]) -> str | None:
    """Whether the workflow process of ``/proc/<pid>`` ``entry`` may work in ``directory`` (of
    device and inode ``here``): ``"runs in"`` where it does (``_works_in``), ``"may run in"``
    where its directory cannot be read and it may hold the lock (``_may_lock_here``), else
    ``None``."""
    try:
        return "runs in" if _works_in(entry, here) else None
    except FileNotFoundError:  # ended meanwhile
        return None
    except OSError:  # another user's, or another group's: /proc does not say
        return "may run in" if _may_lock_here(entry, directory) else None


def workflow_processes(directory: Path, jobs: Collection[int] = ()) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the Snakemake and job processes (``is_workflow_command``) of any
    user working in ``directory`` or below it (``_counts``), but those of the SLURM jobs ``jobs``;
    where directories cannot be read (no ``/proc``), every one of this user."""
    found = []
    here = _file_id(directory)
    processes = _proc_processes() if PROC.is_dir() else _ps_processes()
    for pid, argv, entry in processes:
        if pid == os.getpid() or not is_workflow_command(argv):
            continue
        where = "runs in" if entry is None else _counts(entry, directory, here)
        if where is None or (jobs and _slurm_job_of(pid) in jobs):
            continue
        found.append((pid, " ".join(argv) + ("" if where == "runs in" else _UNREAD)))
    return found


# Said of a process that may work in the directory: /proc does not give its directory.
_UNREAD = " [its working directory cannot be read]"


class SlurmJob(NamedTuple):
    """A queued or running SLURM job of Snakemake's SLURM executor."""

    id: int
    comment: str  # rule_<rule>_wildcards_<...>
    submitted_from: str  # SLURM's AllocNode: the machine sbatch ran on ("" when unknown)


def _is_this_machine(name: str) -> bool:
    """Whether a host name SLURM recorded (``AllocNode``) is this machine: its own name, or one
    that resolves to a loopback address or to this machine's address (a single-node cluster
    records ``localhost``)."""
    own = {socket.gethostname(), socket.getfqdn(), "localhost"}
    if name.split(".")[0].lower() in {n.split(".")[0].lower() for n in own}:
        return True
    try:
        address = socket.gethostbyname(name)
        return address.startswith("127.") or address == socket.gethostbyname(socket.gethostname())
    except OSError:
        return False


def _submitted_from(job: int) -> str | None:
    """The machine sbatch ran on for ``job`` (``scontrol show job``: ``AllocNode:Sid=host:sid``),
    or ``None`` when SLURM does not say."""
    try:
        shown = subprocess.run(
            ["scontrol", "-o", "show", "job", str(job)], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"\bAllocNode:Sid=([^:\s]+)", shown)
    return found[1] if found else None


def _queued(directory: Path) -> dict[int, str] | None:
    """Job id -> comment of this user's pending or running SLURM jobs of Snakemake's SLURM
    executor (comment ``rule_...``) working in ``directory`` or below it (an element of a job
    array by its own id); ``None`` when ``squeue`` fails (no controller answers) or is not on
    the ``PATH`` (a shell without ``module load slurm``): neither tells that no job runs."""
    if shutil.which("squeue") is None:
        return None
    try:
        listed = subprocess.run(
            ["squeue", "-h", "-u", str(os.getuid()), "-o", "%A|%k|%Z"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    directory = directory.resolve()
    ours = {}
    for line in listed.stdout.splitlines():
        job, comment, workdir = line.split("|", 2)
        if job.isdigit() and comment.startswith("rule_") and _inside(Path(workdir), directory):
            ours[int(job)] = comment
    return ours


def _with_hosts(queued: dict[int, str]) -> list[SlurmJob]:
    return [SlurmJob(job, comment, _submitted_from(job) or "") for job, comment in queued.items()]


def slurm_jobs(directory: Path) -> list[SlurmJob]:
    """The SLURM jobs Snakemake submitted for ``directory`` that are still queued or running
    (``_queued``), each with the machine it was submitted from; none when the cluster cannot be
    asked (a cluster that cannot be asked cannot take the rerun's jobs either)."""
    return _with_hosts(_queued(directory) or {})


def cancel_orphans(directory: Path, jobs: list[SlurmJob], wait_s: float = CANCEL_WAIT_S) -> None:
    """``scancel`` ``jobs`` (SIGTERM to their processes: training and evaluation save their
    progress and exit), then wait until they have left the queue and none of their processes
    runs in ``directory`` on this machine (a process that outlived its job, as one escaping
    ``proctrack/linuxproc`` does, gets SIGTERM too). Raises ``RuntimeError`` (one line) when
    ``scancel`` cannot run, or when that takes longer than ``wait_s`` (also while ``squeue``
    cannot say)."""
    ids = {job.id for job in jobs}
    try:  # a job that ended meanwhile makes scancel complain: the wait below tells
        subprocess.run(["scancel", *map(str, sorted(ids))], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"scancel of SLURM jobs {_ids(ids)} failed: {err}") from None
    deadline = time.monotonic() + wait_s
    while (queued := _queued(directory)) is None or queued.keys() & ids:
        if time.monotonic() > deadline:
            state = (
                "still queued" if queued is not None else "not known to have ended (squeue fails)"
            )
            raise RuntimeError(f"SLURM jobs {_ids(ids)} {state} {wait_s:.0f} s after scancel")
        time.sleep(1)
    signalled: set[int] = set()
    while left := [pid for pid, _ in workflow_processes(directory) if _slurm_job_of(pid) in ids]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {left[0]} of cancelled SLURM jobs {_ids(ids)} still runs")
        for pid in set(left) - signalled:
            for sig in (signal.SIGTERM, signal.SIGCONT):  # SIGCONT: a stopped one acts on it
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):  # ended, its pid taken by another
                    pass
        signalled |= set(left)
        time.sleep(0.5)


def _ids(ids: Collection[int], shown: int = 5) -> str:
    """``1, 2, 3`` or ``1, 2, 3, 4, 5 and 7 more``."""
    first = ", ".join(map(str, sorted(ids)[:shown]))
    return first + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def _leaving(directory: Path, why: str) -> str:
    return f"leaving the lock in {directory / LOCK_DIR}: {why}"


def _holders_line(directory: Path, holders: list[tuple[int, str]]) -> str:
    pid, command = holders[0]
    more = f" and {len(holders) - 1} more" if len(holders) > 1 else ""
    command, unread, _ = command.partition(_UNREAD)
    where = f"may run in {directory}{_UNREAD}" if unread else f"runs in {directory}"
    return _leaving(
        directory,
        f"pid {pid} ({command[:120]}){more} {where}; a Snakemake with other outputs may start "
        "beside it, one with the same must wait for it (not --unlock)",
    )


def _orphans_kept(directory: Path, jobs: list[SlurmJob]) -> str | None:
    """Why the SLURM jobs ``jobs`` must not be cancelled from here (the lock stays), or ``None``
    when each was submitted from this machine, where no Snakemake runs: their Snakemake is
    dead."""
    for job in jobs:
        if not job.submitted_from:
            return _leaving(
                directory,
                f"SLURM does not say which machine submitted job {job.id} ({job.comment}), so "
                "this machine cannot tell whether its Snakemake still runs; once sure it does "
                "not, scancel its jobs (squeue --me) and unlock by hand",
            )
        if not _is_this_machine(job.submitted_from):
            return _leaving(
                directory,
                f"SLURM job {job.id} ({job.comment}) was submitted from {job.submitted_from}, "
                "whose Snakemake this machine cannot see; rerun there, or scancel its jobs and "
                "unlock by hand",
            )
    return None


def _uses_slurm(snakemake_args: list[str], directory: Path) -> bool:
    """Whether the Snakemake run of ``snakemake_args`` submits to SLURM: ``--executor slurm``,
    or a profile it loads says ``executor: slurm`` (``snakemake_args.profile_settings``)."""
    if any(f in ("--executor", "-e") and v == "slurm" for f, v in options(snakemake_args)):
        return True
    return any(s.get("executor") == "slurm" for s in profile_settings(snakemake_args, directory))


def _left_cluster_jobs(directory: Path) -> bool:
    """Whether a stopped Snakemake left a job marked incomplete with a cluster job id
    (``.snakemake/incomplete/``, ``{"external_jobid": ...}``): the run was a SLURM run, whatever
    the options of the next one say."""
    for record in (directory / LOCK_DIR.parent / "incomplete").rglob("*"):
        try:
            if record.is_file() and json.loads(record.read_text()).get("external_jobid"):
                return True
        except (OSError, ValueError, AttributeError):  # not a record
            continue
    return False


def _lock_files(directory: Path) -> dict[Path, tuple[int, int]]:
    """Snakemake's lock files in ``directory``, each with its device and inode."""
    found = {}
    for path in (directory / LOCK_DIR).glob("*.lock"):
        try:
            found[path] = _file_id(path)
        except FileNotFoundError:  # removed meanwhile
            continue
    return found


@contextmanager
def _serialised(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory``'s ``TOOL_LOCK``, so that two runs of this
    tool in one directory check and remove one after the other."""
    path = directory / TOOL_LOCK
    try:  # for writing: NFS turns flock into a POSIX lock, exclusive only on such a descriptor
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RuntimeError(f"cannot open {path}: {err.strerror}") from None
    try:
        # a file system without locks (Lustre without -o flock): unserialised, the second look
        # before removing (``_appeared``) still guards a live run
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove(files: dict[Path, tuple[int, int]]) -> None:
    """Remove each of ``files`` that is still the file it was (same device and inode)."""
    for path, seen in files.items():
        try:
            if _file_id(path) == seen:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise RuntimeError(f"cannot remove {path}: {err.strerror}") from None


def _cancel_dead_runs_jobs(directory: Path, queued: dict[int, str]) -> str | None:
    """Cancel and await (``cancel_orphans``) the SLURM jobs ``queued`` of a dead Snakemake of
    this machine; the line saying why the lock stays instead, or ``None``."""
    jobs = _with_hosts(queued)
    if kept := _orphans_kept(directory, jobs):
        return kept
    cancel_orphans(directory, jobs)
    if new := (_queued(directory) or {}).keys() - queued.keys():
        return _leaving(directory, f"SLURM jobs {_ids(new)} were submitted meanwhile")
    return None


def _appeared(
    directory: Path, seen: dict[Path, tuple[int, int]], jobs: Collection[int]
) -> str | None:
    """The line saying why the lock stays when, since the lock files ``seen`` were listed, a
    Snakemake wrote a new one, a workflow process (but of the SLURM jobs ``jobs``) runs in
    ``directory`` or one holds the live marker (``_marker_held``); else ``None``."""
    if new := sorted(p.name for p, key in _lock_files(directory).items() if seen.get(p) != key):
        return _leaving(directory, f"a Snakemake locked it meanwhile ({', '.join(new)})")
    if holders := workflow_processes(directory, jobs):
        return _holders_line(directory, holders)
    if _marker_held(directory):
        return _marker_line(directory)
    return None


def _marker_line(directory: Path) -> str:
    return _leaving(
        directory,
        f"a process holds {directory / LIVE_MARKER}: a Snakemake of this workflow runs that "
        "this machine's process list does not show (in another container or PID namespace, "
        "or hidden by /proc's hidepid); rerun once it has ended",
    )


def hold_live_marker(directory: Path) -> None:
    """Hold a shared ``flock`` on ``directory``'s ``LIVE_MARKER`` until this process ends (the
    workflow's Snakefile calls it in the main Snakemake, not in those SLURM jobs run): the kernel
    releases it however the process ends, SIGKILL included, so a held marker means a live
    Snakemake, wherever it runs. Not inherited by the jobs. Does nothing where the folder cannot
    be written or the file system has no locks."""
    path = directory / LIVE_MARKER
    with suppress(OSError):
        known = os.stat(path)
        if (known.st_dev, known.st_ino) in _HELD:  # held already (the Snakefile read twice):
            return  # no second descriptor, whose close would drop NFS's emulated (POSIX) lock
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # as umask allows
    except OSError:
        return
    key = os.fstat(fd)
    try:  # for writing too: NFS turns flock into a POSIX lock, which needs the descriptor's mode
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return
    _HELD[key.st_dev, key.st_ino] = fd


def _marker_held(directory: Path, settle_s: float = MARKER_SETTLE_S) -> bool:
    """Whether a process holds ``directory``'s ``LIVE_MARKER``: an exclusive ``flock`` cannot be
    had within ``settle_s`` (``MARKER_SETTLE_S``); ``False`` without the file or where the file
    system has no locks."""
    try:
        fd = os.open(directory / LIVE_MARKER, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    deadline = time.monotonic() + settle_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return True
                time.sleep(0.05)
            except OSError:
                return False
    finally:
        os.close(fd)


def unlock_if_stale(directory: Path, snakemake_args: list[str]) -> str | None:
    """Remove ``directory``'s Snakemake lock if no workflow process runs there; the line that
    says what was done, or ``None`` when there is no lock. Raises ``RuntimeError`` (one line)
    when a lock file cannot be removed or cancelled SLURM jobs do not end.

    Before unlocking, the SLURM jobs a dead Snakemake of this machine left running are cancelled
    and awaited (``cancel_orphans``); jobs submitted from another machine keep the lock. Then
    the directory is checked once more (``_appeared``: a Snakemake that started meanwhile keeps
    its lock) and only the lock files listed at first are removed (``_remove``)."""
    if not _lock_files(directory):
        return None
    with _serialised(directory):
        seen = _lock_files(directory)
        if not seen:  # another run of this tool removed it meanwhile
            return None
        queued = _queued(directory)
        if queued is None:
            if _uses_slurm(snakemake_args, directory) or _left_cluster_jobs(directory):
                silent = (
                    "is not on the PATH" if shutil.which("squeue") is None else "does not answer"
                )
                return _leaving(
                    directory,
                    f"squeue {silent}, so this machine cannot tell whether SLURM jobs of the "
                    "stopped Snakemake still run; rerun once it does, or unlock by hand",
                )
            queued = {}  # a local run on a machine with SLURM's client but no cluster
        if holders := workflow_processes(directory, queued):
            return _holders_line(directory, holders)
        if _marker_held(directory):  # before cancelling: the jobs may be a live run's
            return _marker_line(directory)
        if queued and (kept := _cancel_dead_runs_jobs(directory, queued)):
            return kept
        if kept := _appeared(directory, seen, queued):
            return kept
        _remove(seen)
    cancelled = (
        f"; cancelled the SLURM jobs it left running ({_ids(queued)}): the rerun resumes them"
        if queued
        else ""
    )
    return (
        f"removed the lock a stopped Snakemake left in {directory / LOCK_DIR} "
        f"(no Snakemake or job runs there){cancelled}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m stablenets.pipeline.locks [snakemake options]`` in the workflow's directory (or
    the one ``--directory``/``-d`` names); the options are those of the Snakemake run that
    follows (profiles, ``--config``)."""
    args = sys.argv[1:] if argv is None else argv
    directory = next(
        (Path(value) for flag, value in options(args) if flag in ("--directory", "-d") and value),
        Path.cwd(),
    )
    try:
        said = unlock_if_stale(directory.absolute(), args)
    except RuntimeError as err:
        print(f"stablenets.pipeline.locks: error: {err}", file=sys.stderr)
        return 1
    if said is not None:
        print(f"stablenets.pipeline.locks: {said}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
