"""The reference docs (`make docs`): rendered from the docstrings, strictly, for every module.

``mkdocs build --strict`` (mkdocs.yml, mkdocstrings reading the sources with griffe, nothing
imported) must finish without a single warning, and every module of the package must be rendered
by a ``::: stablenets...`` directive of some ``docs/api/*.md`` page, so that a module added
without a page fails here. About 3 s.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "stablenets"
DIRECTIVE = re.compile(r"^:::\s+(stablenets(?:\.\w+)*)\s*$", re.MULTILINE)


def _modules() -> set[str]:
    """Every module's dotted name (``stablenets.nn.models``; a package by its own name)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.add(".".join(parts))
    return names


def _documented() -> set[str]:
    return {
        name
        for page in sorted((ROOT / "docs" / "api").glob("*.md"))
        for name in DIRECTIVE.findall(page.read_text())
    }


def test_every_module_of_the_package_has_a_reference_page():
    missing = sorted(_modules() - _documented())
    assert not missing, f"modules without a `::: <module>` directive in docs/api/*.md: {missing}"
    unknown = sorted(_documented() - _modules())
    assert not unknown, f"docs/api/*.md renders modules that do not exist: {unknown}"


def test_the_reference_docs_build_without_a_warning(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    for page in (
        "index.html",
        *(f"api/{p.stem}/index.html" for p in (ROOT / "docs/api").glob("*.md")),
    ):
        assert (tmp_path / "site" / page).is_file(), f"{page} was not built:\n{output}"


def test_every_test_the_readme_cites_exists():
    """The README's guarantee table names the tests that hold each promise: a renamed test must
    not leave a citation of nothing behind."""
    defined = {
        name
        for path in (ROOT / "tests").rglob("test_*.py")
        for name in re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE)
    }
    cited = set(re.findall(r"`(test_\w+)`", (ROOT / "README.md").read_text()))
    assert len(cited) > 10
    assert not cited - defined, f"README.md cites tests that do not exist: {cited - defined}"


def test_the_readme_names_every_setting_the_resume_hash_leaves_out():
    """``channels_last`` and ``cudnn_benchmark`` joined ``RUN_ONLY`` without the README's list."""
    from stablenets.pipeline.specs import JOB_RUN_ONLY, RUN_ONLY

    text = (ROOT / "README.md").read_text()
    listed = text[
        text.index("The hash leaves out") : text.index("`RUN_ONLY` in `pipeline/specs.py`")
    ]
    keys = {k for ks in RUN_ONLY.values() for k in ks}
    keys |= {path[-1] for paths in JOB_RUN_ONLY.values() for path in paths}
    assert sorted(k for k in keys if f"`{k}`" not in listed and f".{k}`" not in listed) == []
