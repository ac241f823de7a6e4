"""Entry points of the report rules: tables, figures and the summary, from result files.

Apart from the training and evaluation entry points (``jobs.py``) so that these jobs, which only
read HDF5 and CSV files, start without importing torch (2-3 s per job, 13 jobs in the smoke DAG).
What each table and figure is, and how it is built, is declared once in the registry
(:mod:`~stablenets.pipeline.outputs`); these functions only look the output up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from stablenets.atomic import atomic_write
from stablenets.pipeline import outputs
from stablenets.pipeline.runtime import write_sidecar
from stablenets.pipeline.tables import write_table

__all__ = ["make_table", "make_figure", "write_summary"]

Log = Callable[[str], None]


def make_table(spec: dict, inputs: list[Path], out: Path, log: Log = print) -> None:
    """``tables/<name>.{csv,md,tex}`` of the registered table ``spec["kind"]``, captioned with
    its declared caption, the data it was computed on and the scale (``Jobs.report_spec``)."""
    table = outputs.get("table", spec["kind"])
    df = table.build([Path(p) for p in inputs])
    write_sidecar(out, spec, -1, inputs)
    caption = f"{table.caption}; {spec['data']}, {spec['scale']} scale"
    write_table(df, Path(out).with_suffix(""), caption)
    log(f"wrote {table.name} table with {len(df)} rows")


def make_figure(spec: dict, inputs: list[Path], out: Path, log: Log = print) -> None:
    """``figures/<name>.{pdf,png}`` of the registered figure ``spec["kind"]``."""
    figure, stem = outputs.get("figure", spec["kind"]), Path(out).with_suffix("")
    write_sidecar(out, spec, -1, inputs)
    figure.build([Path(p) for p in inputs], stem, spec)
    log(f"wrote {stem}.pdf and {stem}.png")


def _headlines(tables: list[Path]) -> list[str]:
    """One line per row of each table that declares a headline, read from its CSV file."""
    out = []
    for path in map(Path, tables):
        headline, csv = outputs.get("table", path.stem).headline, path.with_suffix(".csv")
        if headline is not None and csv.exists():
            out += [headline(row) for row in pd.read_csv(csv).to_dict("records")]
    return out


def _training_length(train: dict) -> str:
    """How long a task's default training runs: its ``steps``, or the ``budget_minutes`` that
    replaces them (the captions' ``training_length`` macro says the same)."""
    budget = train.get("budget_minutes")
    if budget is None:
        return f"{train['steps']} steps"
    return f"a budget of {budget:g} min (steps derived per run)"


def write_summary(spec: dict, inputs: list[Path], out: Path, log: Log = print) -> None:
    """``summary.md``: what was run, the headline tables, and where every file is."""
    cfg, scale = spec["config"], spec["scale"]
    lines = [
        f"# stablenets results: `{scale}` scale",
        "",
        "## What was run",
        "",
        f"- seeds: {cfg['seeds']}; device setting: `{cfg['device']}`",
        f"- classifiers: {', '.join(cfg['classification']['variants'])} "
        f"({_training_length(cfg['classification']['train'])}, batch "
        f"{cfg['classification']['train']['batch_size']}, unless a variant overrides them)",
        f"- denoisers: {', '.join(cfg['denoising']['variants'])} + TV, noise levels "
        f"{cfg['denoising']['noise_levels']} ({_training_length(cfg['denoising']['train'])} "
        "unless a variant overrides them)",
        f"- PnP deblurring: {', '.join(cfg['pnp']['denoisers'])} + TV; Gaussian blur "
        f"{cfg['pnp']['blur']['size']}x{cfg['pnp']['blur']['size']}, σ_blur "
        f"{cfg['pnp']['blur']['sigma']}, noise {cfg['pnp']['noise']}, η {cfg['pnp']['eta']}",
        "",
    ]
    lines += ["## Headline numbers", "", *_headlines(inputs), ""]
    figures = ", ".join(sorted(outputs.names("figure")))  # the rule's inputs: no stale file
    for path in inputs:
        title = outputs.get("table", Path(path).stem).title
        lines += [f"## {title}", "", Path(path).read_text().strip(), ""]
    lines += [
        "## Where the files are",
        "",
        f"- the report with every figure and table and their captions: `snakemake "
        f"--workflow-profile <profile> --report results/{scale}/report.html`",
        f"- tables: `results/{scale}/tables/*.{{csv,md,tex}}`",
        f"- figures: `results/{scale}/figures/*.{{pdf,png}}` ({figures})",
        f"- per-model results (HDF5, with config hash, seed, versions, git commit, the sha256 "
        f"of the model and data files): "
        f"`results/{scale}/eval/`, `results/{scale}/pnp/`",
        f"- trained models and training logs: `results/{scale}/models/`",
        f"- logs per rule: `logs/{scale}/`; timings per rule: `benchmarks/{scale}/`",
        "",
    ]
    out = Path(out)
    write_sidecar(out, spec, -1, inputs)
    atomic_write(out, "\n".join(lines))
    log(f"wrote {out}")
