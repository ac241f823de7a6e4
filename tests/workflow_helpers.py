"""Shared helpers for the tests that run Snakemake: a fresh copy of the workflow (as a new clone
would have it) and a subprocess call of the environment's snakemake."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stablenets.pipeline import outputs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
WORKFLOW_FILES = ("workflow", "config.yaml", "config", "environment.yml", "Makefile")
SMOKE_PROFILE = ("--workflow-profile", "workflow/profiles/smoke")
#: The tables and figures the pipeline makes, from their registry (as the rules read them).
TABLES, FIGURES = outputs.names("table"), outputs.names("figure")


def copy_workflow(dest: Path) -> Path:
    """A fresh copy of the workflow (no results), as a new clone would have."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    return dest


def local_env() -> dict[str, str]:
    """The environment of local (not SLURM) Snakemake runs.

    Snakemake loads the SLURM executor plugin at every start, and the plugin asks `scontrol` for
    the controller's settings. Where SLURM is installed but no controller runs (the suite starts
    one only for tests/test_slurm.py), every start waits 9 s for that answer. Local runs need no
    SLURM: they get a SLURM_CONF whose controller port nothing listens on, so the question fails
    at once."""
    if shutil.which("scontrol") is None:
        return dict(os.environ)
    conf = Path(tempfile.gettempdir()) / "stablenets-tests-no-slurm.conf"
    if not conf.is_file():
        text = "ClusterName=none\nSlurmctldHost=localhost\nSlurmctldPort=1\nMessageTimeout=1\n"
        tmp = conf.with_name(f"{conf.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(conf)
    return {**os.environ, "SLURM_CONF": str(conf)}


def snakemake(workdir: Path, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=local_env(),
    )


def training_processes(work: Path, checkpoint: Path) -> list[int]:
    """The pids of the training jobs (``python -m stablenets train``) in ``work`` whose
    checkpoint folder is ``checkpoint``'s."""
    from stablenets.pipeline import locks

    wanted = str(checkpoint.parent.relative_to(work))
    return [
        pid for pid, command in locks.workflow_processes(work)
        if " -m stablenets train " in f" {command} " and wanted in command
    ]  # fmt: skip
