"""``pip install stablenets`` without extras, for real: pip resolves what a fresh virtual
environment (no system site packages) would get, that set holds torch and numpy and no pipeline
package, and the library installed there with exactly that set trains a model.

The resolution is pip's own (``pip install --dry-run --report``, the same resolver, indexes and
pins as a real install). The resolved distributions are then lent to the fresh environment by
symbolic links to this environment's installed copies (same name, same version, checked), so the
test needs kilobytes of disk instead of the several GB a CUDA build of torch takes; stablenets
itself is installed into the fresh environment by pip (beside the pip and setuptools that venv
puts there). A distribution the library imports but does not declare is missing there, and a
pipeline package among the resolved ones fails the test. tests/test_layers.py checks the same
quickly by making the pipeline's packages unimportable in this environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import venv
from importlib import metadata
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


def _pip(python: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """``python -m pip args``, asserted to succeed."""
    proc = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _resolved(python: Path, source: Path, report: Path) -> dict[str, str]:
    """Name -> version of every distribution ``pip install source`` would install (extras none),
    constrained to the versions installed here (which distributions, not which releases, is
    the question: torch's unpinned dependencies move on)."""
    here = report.with_name("installed-here.txt")
    here.write_text(
        "".join(
            f"{d.metadata['Name']}=={d.version}\n"
            for d in metadata.distributions()
            if d.metadata["Name"] and d.metadata["Name"].lower() != "stablenets"
        )
    )
    _pip(python, "install", "--quiet", "--dry-run", "--ignore-installed", "--constraint", here,
         "--report", report, source)  # fmt: skip
    items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}


def _lend(resolved: dict[str, str], overlay: Path) -> None:
    """Link each resolved distribution's top-level files from this environment into ``overlay``;
    fail when this environment's copy is not the version pip resolved."""
    overlay.mkdir()
    for name, version in resolved.items():
        if name == "stablenets":
            continue
        dist = metadata.distribution(name)
        assert dist.version == version, f"{name}: resolved {version}, lent {dist.version}"
        for file in dist.files or ():
            if file.parts[0] == ".." or ("/" not in str(file) and file.suffix != ".py"):
                continue  # scripts outside site-packages; stray top-level data files
            top = Path(str(dist.locate_file(file.parts[0])))
            link = overlay / file.parts[0]
            if not link.exists() and top.exists():
                link.symlink_to(top)


@pytest.mark.slow
def test_pip_install_without_extras_trains_a_model_and_installs_no_pipeline_package(tmp_path):
    env = tmp_path / "env"
    venv.create(env, with_pip=True, system_site_packages=False)
    python = env / "bin" / "python"
    source = _source_copy(tmp_path / "sdist")

    resolved = _resolved(python, source, tmp_path / "report.json")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pipeline = {
        r.split("=")[0].split("[")[0].lower() for r in project["optional-dependencies"]["pipeline"]
    }
    assert {"stablenets", "torch", "numpy"} <= resolved.keys()
    assert resolved.keys() & pipeline == set(), "the core install pulls in pipeline packages"

    _pip(python, "install", "--quiet", "--no-deps", source)
    _lend(resolved, tmp_path / "lent")
    site = next((env / "lib").glob("python*/site-packages"))
    (site / "lent.pth").write_text(f"{tmp_path / 'lent'}\n")

    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(
        [python, "-I", "-c", TRAIN_A_SMALL_MODEL, str(work)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert Path(got["file"]).is_relative_to(env), "imported the checkout, not the installed copy"
    assert not Path(got["file"]).resolve().is_relative_to(Path(sys.prefix).resolve())
    assert_trained_alone(got, work, {"snakemake", "h5py", "pandas", "yaml", "pyautoattack"})
