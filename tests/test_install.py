"""``pip install stablenets`` without extras, for real: a fresh virtual environment (no system
site packages) gets the library with torch and numpy only, no Snakemake, and trains a model.

Slow (about 1.5 minutes: pip copies torch, several GB, from this machine's wheel cache) but the
only proof that the core dependencies suffice; tests/test_layers.py checks the same quickly by
making the pipeline's packages unimportable in this environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest
from test_layers import TRAIN_A_SMALL_MODEL, assert_trained_alone

ROOT = Path(__file__).resolve().parents[1]


def _source_copy(dest: Path) -> Path:
    """What a source distribution holds, so that pip builds nothing inside the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(
        ROOT / "src" / "stablenets",
        dest / "src" / "stablenets",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return dest


@pytest.mark.slow
def test_pip_install_without_extras_trains_a_model_and_installs_no_pipeline_package(tmp_path):
    env = tmp_path / "env"
    venv.create(env, with_pip=True, system_site_packages=False)
    python = env / "bin" / "python"
    pip = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", _source_copy(tmp_path / "sdist")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pipeline = {
        r.split("=")[0].split("[")[0].lower() for r in project["optional-dependencies"]["pipeline"]
    }
    assert {"stablenets", "torch", "numpy"} <= installed
    assert installed & pipeline == set(), "the core install pulled in pipeline packages"

    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(
        [python, "-I", "-c", TRAIN_A_SMALL_MODEL, str(work)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert Path(got["file"]).is_relative_to(env), "imported the checkout, not the installed copy"
    assert_trained_alone(got, work, {"snakemake", "h5py", "pandas", "yaml", "pyautoattack"})
