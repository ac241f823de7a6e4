"""Stale Snakemake locks: clear the one a killed Snakemake left behind, never a live run's.

Snakemake locks its working directory (``.snakemake/locks/``) while it runs and removes the lock
when it ends, also on Ctrl-C. A Snakemake killed with SIGKILL (the OOM killer, ``kill -9``, a
lost session's process group) cannot, and the next run stops at "Directory cannot be locked"
asking for ``snakemake --unlock``, which removes a live run's lock just as readily.

``python -m stablenets.pipeline.locks [snakemake options]``, which ``make smoke``, ``make
smoke-slurm`` and ``make rehearsal`` run before Snakemake, unlocks (``snakemake <options>
--unlock``) only when no process of the workflow runs in this directory: no Snakemake, and no job
that a killed Snakemake left running (``python -m stablenets <job>``: a rerun would start a
second writer of its checkpoint). Otherwise it leaves the lock and names the process, in one
line; without a lock it does nothing.

SLURM jobs a killed Snakemake left in the queue (this user's jobs of Snakemake's SLURM executor,
comment ``rule_...``, working directory here) would be such second writers on other nodes. When
each was submitted from this machine (SLURM's ``AllocNode``) and no Snakemake runs here, their
Snakemake is dead: they are cancelled (``scancel``: SIGTERM, on which training and evaluation
save their progress and exit), the tool waits until they and their processes on this machine
are gone (``CANCEL_WAIT_S``), and unlocks; the rerun resubmits them and they resume. Jobs
submitted from another machine, whose Snakemake this machine cannot see, keep the lock, in one
line naming that machine.

Processes are read from ``/proc`` (command line and working directory, this user's only: another
user's Snakemake cannot write here). Without ``/proc`` (macOS) ``ps`` gives command lines but not
directories, so any Snakemake or job of this user keeps the lock. Snakemake's default file
persistence is assumed (``--persistence-backend db`` keeps its locks in the database: unlock by
hand).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "LOCK_DIR",
    "CANCEL_WAIT_S",
    "SlurmJob",
    "is_workflow_command",
    "workflow_processes",
    "slurm_jobs",
    "cancel_orphans",
    "unlock_if_stale",
    "main",
]

LOCK_DIR = Path(".snakemake") / "locks"
PROC = Path("/proc")
# How long cancelled jobs may take to leave: SLURM's KillWait (30 s by default) between SIGTERM
# and SIGKILL, plus a checkpoint write and the controller's bookkeeping.
CANCEL_WAIT_S = 300.0


def is_workflow_command(argv: list[str]) -> bool:
    """Whether ``argv`` runs Snakemake (``snakemake``, ``python .../bin/snakemake``, ``python -m
    snakemake``) or a pipeline job (``python -m stablenets <job>``)."""
    if any(Path(arg).name == "snakemake" for arg in argv[:2]):
        return True
    modules = (module for flag, module in zip(argv, argv[1:], strict=False) if flag == "-m")
    return any(module in ("snakemake", "stablenets") for module in modules)


def _proc_processes() -> Iterator[tuple[int, list[str], Path]]:
    """``(pid, argv, cwd)`` of this user's processes, from ``/proc``."""
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:  # ended meanwhile
            continue
        yield int(entry.name), argv, cwd


def _ps_processes() -> Iterator[tuple[int, list[str], None]]:
    """``(pid, argv, None)`` of this user's processes, from ``ps`` (arguments split at spaces;
    no working directory)."""
    out = subprocess.run(
        ["ps", "-ww", "-U", str(os.getuid()), "-o", "pid=", "-o", "args="],  # -ww: whole lines
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
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


def workflow_processes(directory: Path, jobs: Collection[int] = ()) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the Snakemake and job processes (``is_workflow_command``) working
    in ``directory`` or below it, but those of the SLURM jobs ``jobs``; where directories cannot be
    read (no ``/proc``), every one."""
    directory = directory.resolve()
    found = []
    processes = _proc_processes() if PROC.is_dir() else _ps_processes()
    for pid, argv, cwd in processes:
        if pid == os.getpid() or not is_workflow_command(argv):
            continue
        if cwd is not None and not _inside(cwd, directory):
            continue
        if jobs and _slurm_job_of(pid) in jobs:
            continue
        found.append((pid, " ".join(argv)))
    return found


class SlurmJob(NamedTuple):
    """A queued or running SLURM job of Snakemake's SLURM executor."""

    id: int
    comment: str  # rule_<rule>_wildcards_<...>
    submitted_from: str  # SLURM's AllocNode: the machine sbatch ran on


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


def _submitted_from(job: int) -> str:
    """The machine sbatch ran on for ``job`` (``scontrol show job``: ``AllocNode:Sid=host:sid``);
    ``"an unknown machine"`` when SLURM does not say."""
    try:
        shown = subprocess.run(
            ["scontrol", "-o", "show", "job", str(job)], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        shown = ""
    found = re.search(r"\bAllocNode:Sid=([^:\s]+)", shown)
    return found[1] if found else "an unknown machine"


def _queued(directory: Path) -> dict[int, str]:
    """Job id -> comment of this user's pending or running SLURM jobs of Snakemake's SLURM
    executor (comment ``rule_...``) working in ``directory`` or below it; none without ``squeue``
    or a controller that answers it (a cluster that cannot be asked cannot take the rerun's jobs
    either)."""
    if shutil.which("squeue") is None:
        return {}
    try:
        listed = subprocess.run(
            ["squeue", "-h", "-u", str(os.getuid()), "-o", "%i|%k|%Z"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {}
    if listed.returncode != 0:  # no controller to ask (slurm-client alone): none to cancel
        return {}
    directory = directory.resolve()
    ours = {}
    for line in listed.stdout.splitlines():
        job, comment, workdir = line.split("|", 2)
        if job.isdigit() and comment.startswith("rule_") and _inside(Path(workdir), directory):
            ours[int(job)] = comment
    return ours


def slurm_jobs(directory: Path) -> list[SlurmJob]:
    """The SLURM jobs Snakemake submitted for ``directory`` that are still queued or running
    (``_queued``), each with the machine it was submitted from."""
    return [
        SlurmJob(job, comment, _submitted_from(job)) for job, comment in _queued(directory).items()
    ]


def cancel_orphans(directory: Path, jobs: list[SlurmJob], wait_s: float = CANCEL_WAIT_S) -> None:
    """``scancel`` ``jobs`` (SIGTERM to their processes: training and evaluation save their
    progress and exit), then wait until they have left the queue and none of their processes
    runs in ``directory`` on this machine (a process that outlived its job, as one escaping
    ``proctrack/linuxproc`` does, gets SIGTERM too). Raises ``RuntimeError`` (one line) when
    that takes longer than ``wait_s``."""
    ids = {job.id for job in jobs}
    subprocess.run(["scancel", *map(str, ids)], check=True, capture_output=True, timeout=120)
    deadline = time.monotonic() + wait_s
    while _queued(directory).keys() & ids:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"SLURM jobs {sorted(ids)} still queued {wait_s:.0f} s after scancel"
            )
        time.sleep(1)
    signalled: set[int] = set()
    while left := [pid for pid, _ in workflow_processes(directory) if _slurm_job_of(pid) in ids]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {left[0]} of cancelled SLURM jobs {sorted(ids)} still runs")
        for pid in set(left) - signalled:
            for sig in (signal.SIGTERM, signal.SIGCONT):  # SIGCONT: a stopped one acts on it
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        signalled |= set(left)
        time.sleep(0.5)


def unlock_if_stale(directory: Path, snakemake_args: list[str]) -> str | None:
    """Remove ``directory``'s Snakemake lock if no workflow process runs there; the line that
    says what was done, or ``None`` when there is no lock. Raises ``RuntimeError`` (one line)
    when ``snakemake --unlock`` fails or cancelled SLURM jobs do not end.

    Before unlocking, the SLURM jobs a dead Snakemake of this machine left running are cancelled
    and awaited (``cancel_orphans``); jobs submitted from another machine keep the lock."""
    if not any((directory / LOCK_DIR).glob("*.lock")):
        return None
    jobs = slurm_jobs(directory)
    holders = workflow_processes(directory, {job.id for job in jobs})
    if holders:
        pid, command = holders[0]
        more = f" and {len(holders) - 1} more" if len(holders) > 1 else ""
        return (
            f"leaving the lock in {directory / LOCK_DIR}: pid {pid} ({command[:120]}){more} "
            f"runs in {directory}"
        )
    if away := [job for job in jobs if not _is_this_machine(job.submitted_from)]:
        return (
            f"leaving the lock in {directory / LOCK_DIR}: SLURM job {away[0].id} "
            f"({away[0].comment}) was submitted from {away[0].submitted_from}, whose Snakemake "
            f"this machine cannot see; rerun there, or scancel its jobs and unlock by hand"
        )
    cancelled = ""
    if jobs:
        cancel_orphans(directory, jobs)
        ids = ", ".join(str(job) for job in sorted(job.id for job in jobs))
        cancelled = f"; cancelled the SLURM jobs it left running ({ids}): the rerun resumes them"
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", *snakemake_args, "--unlock"],
        cwd=directory,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"snakemake --unlock failed in {directory}: {last}")
    return (
        f"removed the lock a stopped Snakemake left in {directory / LOCK_DIR} "
        f"(no Snakemake or job runs there){cancelled}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m stablenets.pipeline.locks [snakemake options]`` in the workflow's directory; the
    options are those of the Snakemake run that follows (profiles, ``--config``)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        said = unlock_if_stale(Path.cwd(), args)
    except RuntimeError as err:
        print(f"stablenets.pipeline.locks: error: {err}", file=sys.stderr)
        return 1
    if said is not None:
        print(f"stablenets.pipeline.locks: {said}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
