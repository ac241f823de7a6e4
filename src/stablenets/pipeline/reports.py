"""Entry points of the report rules: tables, figures and the summary, from result files.

Apart from the training and evaluation entry points (``experiments.py``) so that these jobs,
which only read HDF5 and CSV files, start without importing torch (2-3 s per job, 13 jobs in the
smoke DAG).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from stablenets.atomic import atomic_write
from stablenets.pipeline.runtime import write_sidecar

__all__ = ["make_table", "make_figure", "write_summary"]

Log = Callable[[str], None]


_TABLE_CAPTIONS = {
    "classification": "CIFAR-10 robustness (L2, inputs in [0, 1])",
    "denoising": "Gaussian denoising PSNR on the test images",
    "pnp": "Plug-and-Play deblurring",
    "families": "1-Lipschitz layer families (L2, inputs in [0, 1])",
}


def make_table(spec: dict, inputs: list[Path], out: Path, log: Log = print) -> None:
    """``tables/<kind>.{csv,md,tex}`` from the result files of one experiment."""
    from stablenets.pipeline import tables

    kind = spec["kind"]
    build = {
        "classification": tables.classification_table,
        "families": tables.families_table,
        "denoising": tables.denoising_table,
        "pnp": tables.pnp_table,
    }[kind]
    df = build([Path(p) for p in inputs])
    write_sidecar(out, spec, -1, inputs)
    tables.write_table(df, Path(out).with_suffix(""), _TABLE_CAPTIONS[kind])
    log(f"wrote {kind} table with {len(df)} rows")


def _one_log_per_variant(paths: list[Path]) -> dict[str, Path]:
    """``models/<task>/[sigma<s>/]<variant>/seed<k>/train_log.csv``: the first log per variant
    (lowest noise level and seed), keyed by the variant name so colours match other figures."""
    chosen: dict[str, Path] = {}
    for path in sorted(paths):
        chosen.setdefault(path.parent.parent.name, path)
    return chosen


def make_figure(spec: dict, inputs: list[Path], out: Path, log: Log = print) -> None:
    """``figures/<kind>.{pdf,png}`` from result files or training logs."""
    from stablenets.pipeline import figures

    kind, stem, paths = spec["kind"], Path(out).with_suffix(""), [Path(p) for p in inputs]
    figures.set_style()
    write_sidecar(out, spec, -1, inputs)
    if kind.startswith("training_"):
        figures.training_figure(_one_log_per_variant(paths), stem)
    elif kind == "denoising_examples":
        figures.denoising_examples_figure(paths, stem, sigma=spec.get("sigma"))
    else:
        draw = {
            "robustness": figures.robustness_figure,
            "families": figures.families_figure,
            "pnp_convergence": figures.pnp_convergence_figure,
            "pnp_reconstructions": figures.pnp_reconstructions_figure,
        }[kind]
        draw(paths, stem)
    log(f"wrote {stem}.pdf and {stem}.png")


SUMMARY_TITLES = {
    "classification": "Classification: robustness",
    "denoising": "Denoising",
    "pnp": "Plug-and-Play deblurring",
    "families": "1-Lipschitz layer families",
}


def _headlines(tables: list[Path]) -> list[str]:
    """One line per model of the key numbers, read from the tables' CSV files."""
    out = []
    for path in tables:
        kind, csv = Path(path).stem, Path(path).with_suffix(".csv")
        if not csv.exists():
            continue
        for row in pd.read_csv(csv).to_dict("records"):
            if kind == "classification":
                out.append(
                    f"- {row['variant']}: clean {100 * row['clean_accuracy']:.1f}%, certified "
                    f"{100 * row['certified@36/255']:.1f}% and empirical "
                    f"{100 * row['empirical@36/255']:.1f}% at ε = 36/255, certified Lipschitz "
                    f"bound {row['lipschitz_bound']:.4g}"
                )
            elif kind == "denoising":
                out.append(
                    f"- denoiser {row['variant']} (σ = {row['sigma']:g}): {row['psnr']:.2f} dB "
                    f"(noisy {row['noisy_psnr']:.2f} dB)"
                )
            elif kind == "pnp":
                verdict = "non-increasing steps" if row["nonincreasing"] else "steps not monotone"
                out.append(
                    f"- PnP {row['variant']}: {row['psnr']:.2f} dB (observed "
                    f"{row['observed_psnr']:.2f} dB), {int(row['diverged_count'])} diverged, "
                    f"{verdict}"
                )
    return out


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
        f"({cfg['classification']['train']['steps']} steps, batch "
        f"{cfg['classification']['train']['batch_size']})",
        f"- denoisers: {', '.join(cfg['denoising']['variants'])} + TV, noise levels "
        f"{cfg['denoising']['noise_levels']} ({cfg['denoising']['train']['steps']} steps)",
        f"- PnP deblurring: {', '.join(cfg['pnp']['denoisers'])} + TV; Gaussian blur "
        f"{cfg['pnp']['blur']['size']}x{cfg['pnp']['blur']['size']}, σ_blur "
        f"{cfg['pnp']['blur']['sigma']}, noise {cfg['pnp']['noise']}, η {cfg['pnp']['eta']}",
        "",
    ]
    lines += ["## Headline numbers", "", *_headlines(inputs), ""]
    figures = ", ".join(sorted(p.stem for p in (Path(out).parent / "figures").glob("*.png")))
    for path in inputs:
        title = SUMMARY_TITLES.get(Path(path).stem, Path(path).stem)
        lines += [f"## {title}", "", Path(path).read_text().strip(), ""]
    lines += [
        "## Where the files are",
        "",
        f"- the report with every figure and table and their captions: `snakemake "
        f"--workflow-profile <profile> --report results/{scale}/report.html`",
        f"- tables: `results/{scale}/tables/*.{{csv,md,tex}}`",
        f"- figures: `results/{scale}/figures/*.{{pdf,png}}` ({figures})",
        f"- per-model results (HDF5, with config hash, seed, versions, git commit): "
        f"`results/{scale}/eval/`, `results/{scale}/pnp/`",
        f"- trained models and training logs: `results/{scale}/models/`",
        f"- logs per rule: `logs/{scale}/`; timings per rule: `benchmarks/{scale}/`",
        "",
    ]
    out = Path(out)
    write_sidecar(out, spec, -1, inputs)
    atomic_write(out, "\n".join(lines))
    log(f"wrote {out}")
