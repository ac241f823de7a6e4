"""Stale Snakemake locks: clear the one a killed Snakemake left behind, never a live run's.

Snakemake locks its working directory (``.snakemake/locks/``) while it runs and removes the lock
when it ends, also on Ctrl-C. A Snakemake killed with SIGKILL (the OOM killer, ``kill -9``, a
lost session's process group) cannot, and the next run stops at "Directory cannot be locked"
asking for ``snakemake --unlock``, which removes a live run's lock just as readily.

``python -m stablenets.pipeline.locks [snakemake options]``, which ``make smoke`` and ``make smoke-slurm``
run before Snakemake, unlocks (``snakemake <options> --unlock``) only when no process of the
workflow runs in this directory: no Snakemake, and no job that a killed Snakemake left running
(``python -m stablenets <job>``: a rerun would start a second writer of its checkpoint).
Otherwise it leaves the lock and names the process, in one line; without a lock it does nothing.

Processes are read from ``/proc`` (command line and working directory, this user's only: another
user's Snakemake cannot write here). Without ``/proc`` (macOS) ``ps`` gives command lines but not
directories, so any Snakemake or job of this user keeps the lock. Jobs on other machines (SLURM
nodes) are not seen: after killing a Snakemake that submitted jobs, wait for them or ``scancel``
them (``squeue --me``). Snakemake's default file persistence is assumed (``--persistence-backend
db`` keeps its locks in the database: unlock by hand).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_DIR", "is_workflow_command", "workflow_processes", "unlock_if_stale", "main"]

LOCK_DIR = Path(".snakemake") / "locks"
PROC = Path("/proc")


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


def workflow_processes(directory: Path) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the Snakemake and job processes (``is_workflow_command``) working
    in ``directory`` or below it; where directories cannot be read (no ``/proc``), every one."""
    directory = directory.resolve()
    found = []
    processes = _proc_processes() if PROC.is_dir() else _ps_processes()
    for pid, argv, cwd in processes:
        if pid == os.getpid() or not is_workflow_command(argv):
            continue
        if cwd is None or cwd == directory or directory in cwd.parents:
            found.append((pid, " ".join(argv)))
    return found


def unlock_if_stale(directory: Path, snakemake_args: list[str]) -> str | None:
    """Remove ``directory``'s Snakemake lock if no workflow process runs there; the line that
    says what was done, or ``None`` when there is no lock. Raises ``RuntimeError`` (one line)
    when ``snakemake --unlock`` fails."""
    if not any((directory / LOCK_DIR).glob("*.lock")):
        return None
    holders = workflow_processes(directory)
    if holders:
        pid, command = holders[0]
        more = f" and {len(holders) - 1} more" if len(holders) > 1 else ""
        return (
            f"leaving the lock in {directory / LOCK_DIR}: pid {pid} ({command[:120]}){more} "
            f"runs in {directory}"
        )
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
        "(no Snakemake or job runs there)"
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
