"""The package's annotations hold and ship: basedpyright (``[tool.basedpyright]`` in
``pyproject.toml``, the check ``make lint`` runs) finds nothing, and ``py.typed`` (PEP 561) is
part of the package, so that its users' type checkers read the annotations too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASEDPYRIGHT = Path(sys.executable).parent / "basedpyright"


def test_the_package_type_checks_clean() -> None:
    run = subprocess.run(
        [str(BASEDPYRIGHT), "--outputjson"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.stdout, f"basedpyright printed nothing (exit {run.returncode}): {run.stderr}"
    report = json.loads(run.stdout)
    summary = report["summary"]
    found = [d for d in report["generalDiagnostics"] if d["severity"] in ("error", "warning")]
    shown = "\n".join(
        f"{d['file']}:{d['range']['start']['line'] + 1}: {d['severity']}: {d['message']}"
        + (f" ({d['rule']})" if "rule" in d else "")
        for d in found[:10]
    )
    assert summary["filesAnalyzed"] > 0
    assert (summary["errorCount"], summary["warningCount"]) == (0, 0), (
        f"{summary['errorCount']} errors, {summary['warningCount']} warnings; first ones:\n{shown}"
    )


def test_py_typed_ships_with_the_package() -> None:
    import tomllib

    import stablenets

    assert (Path(stablenets.__file__).parent / "py.typed").is_file()
    with open(ROOT / "pyproject.toml", "rb") as fh:
        package_data = tomllib.load(fh)["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["stablenets"]
