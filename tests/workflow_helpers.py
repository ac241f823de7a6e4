"""Shared helpers for the tests that run Snakemake: a fresh copy of the workflow (as a new clone
would have it) and a subprocess call of the environment's snakemake."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
WORKFLOW_FILES = ("Snakefile", "workflow", "config.yaml", "config", "environment.yml", "Makefile")
SMOKE_PROFILE = ("--workflow-profile", "workflow/profiles/smoke")


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


def snakemake(workdir: Path, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
