"""Result tables (CSV, Markdown, LaTeX) from the pipeline's HDF5 evaluation files.

Each ``*_table`` function reads result files and returns one row per model (several seeds are
aggregated), keeping numbers raw: a metric ``m`` comes with ``m_std`` (spread over seeds, or over
test images for PSNR, as in the paper) and, for PSNR, ``m_seed_std`` (spread of the per-seed
means). :func:`write_table` writes the CSV with those raw numbers and formats Markdown and LaTeX
for reading: accuracies in %, ``mean ± std``, units in the headers.

Each table is declared where it is built (``@outputs.table``: name, inputs, caption, summary
title and headline, see :mod:`~stablenets.pipeline.outputs`). This module reads files only
(through :func:`~stablenets.pipeline.runtime.read_results`); it imports neither torch nor the
figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import pandas as pd

from stablenets.atomic import atomic_write
from stablenets.pipeline import outputs
from stablenets.pipeline.labels import radius_label, sigma_in_path
from stablenets.pipeline.runtime import read_results

__all__ = [
    "Column",
    "COLUMNS",
    "classification_table",
    "families_table",
    "denoising_table",
    "pnp_table",
    "write_table",
    "display_frame",
    "column_spec",
    "table_notes",
    "choice_text",
    "format_bound",
]

STD_SUFFIX = "_std"  # column holding the spread of the column before it
SEED_STD_SUFFIX = "_seed_std"  # spread over seeds where ``_std`` is the spread over images
RADIUS_SEP = "@"  # ``certified@36/255``: a metric at one of the standard radii
MISSING = "n/a"  # what a table shows for NaN: only where a metric does not apply to a model
TV = "tv"  # the TV baseline's variant (and deblurring method): no Lipschitz numbers, a weight
SEEDS = "seeds"  # the column counting the result files behind a row
SEED_COUNT_SUFFIX = "_n_seeds"  # seeds behind a value, where fewer than the row's (the rest NaN)
CHOICE_FMT = "{:g}"  # a chosen setting (one of the config's candidates) as the config writes it
_TEXT_COLUMNS = (
    "method",
    "family",
    "variant",
    "model",
    "strong_method",
    "train_loss",
)  # left-aligned in LaTeX


@dataclass(frozen=True)
class Column:
    """How one table column is aggregated over seeds and shown to readers.

    ``agg``: ``key`` (groups rows), ``first`` (descriptive text), ``mean`` (mean and std over
    seeds), ``fixed`` (mean only: the same for every seed by design, e.g. the noisy PSNR),
    ``image`` (mean; the per-seed image spread pooled into ``_std``; spread of seed means in
    ``_seed_std``), ``sum`` (counts), ``all`` (0/1 flags: true only if true for every seed),
    ``choice`` (a setting each seed chose: the value when they agree, else each choice with its
    seeds, never their mean, a setting no run used), ``bound`` (a bound of each seed's model:
    the largest over seeds for an upper bound, the smallest for a lower one, which holds for
    every seed's model; a mean of bounds holds for none of them).
    ``fmt`` formats a (scaled) value, ``std_fmt`` its spread (default ``fmt``). ``bound``:
    ``upper`` or ``lower`` for a bound, rounded up or down to ``fmt``'s significant digits (with
    more where an upper bound below 1 would round to 1), never past what it guarantees.
    """

    label: str
    unit: str = ""
    scale: float = 1.0
    fmt: str = "{:.3g}"
    agg: str = "mean"
    std_fmt: str = ""
    bound: str = ""

    @property
    def spread_fmt(self) -> str:
        return self.std_fmt or self.fmt


class _Display(TypedDict, total=False):
    """Display options shared by several columns (keyword arguments of :class:`Column`)."""

    unit: str
    scale: float
    fmt: str


_ACC: _Display = {"unit": "%", "scale": 100.0, "fmt": "{:.1f}"}
_DB: _Display = {"unit": "dB", "fmt": "{:.2f}"}

COLUMNS: dict[str, Column] = {
    # keys and descriptions
    "sigma": Column("σ", fmt="{:g}", agg="key"),
    "denoiser_sigma": Column("denoiser σ", fmt="{:g}", agg="key"),
    "method": Column("method", agg="key"),
    "variant": Column("variant", agg="key"),
    "model": Column("model", agg="first"),
    "strong_method": Column("strong attack", agg="first"),
    "train_loss": Column("training loss", agg="first"),
    SEEDS: Column("seeds", fmt="{:d}", agg="first"),
    # classification
    "clean_accuracy": Column("clean acc.", **_ACC),
    "certified": Column("certified", **_ACC),
    "empirical": Column("empirical (strongest)", **_ACC),
    "pgd": Column("PGD", **_ACC),
    "auc_certified": Column("AUC certified", fmt="{:.3f}"),
    "auc_empirical": Column("AUC empirical", fmt="{:.3f}"),
    "auc_pgd": Column("AUC PGD", fmt="{:.3f}"),
    "audited_certified": Column("audits of certified points", fmt="{:.0f}"),
    "lipschitz_bound": Column("Lipschitz bound", fmt="{:.4g}", agg="bound", bound="upper"),
    "n_params": Column("parameters", fmt="{:,.0f}", agg="fixed"),
    "total_substeps": Column("total sub-steps", fmt="{:.1f}"),
    "train_time_s": Column("training time", unit="s", fmt="{:.0f}"),
    "family": Column("family", agg="key"),
    "base_width": Column("width", fmt="{:.0f}", agg="fixed"),
    "epoch_time_s": Column("time per epoch", unit="s", fmt="{:.3g}"),
    "peak_memory_mb": Column("peak memory", unit="MiB", fmt="{:,.0f}"),
    # denoising
    "psnr": Column("PSNR", agg="image", **_DB),
    "psnr_1": Column("PSNR peak 1", agg="image", **_DB),
    "noisy_psnr": Column("noisy PSNR", agg="fixed", **_DB),
    "noisy_psnr_1": Column("noisy PSNR peak 1", agg="fixed", **_DB),
    "empirical_lipschitz": Column(
        "empirical Lipschitz (lower bound)", fmt="{:.4g}", agg="bound", bound="lower"
    ),
    "averagedness": Column("averagedness α", fmt="{:.3g}", agg="bound", bound="upper"),
    "tv_weight": Column("TV weight", fmt=CHOICE_FMT, agg="choice"),
    "strength": Column("denoiser strength β", fmt=CHOICE_FMT, agg="choice"),
    # plug-and-play
    "observed_psnr_1": Column("observed PSNR peak 1", agg="fixed", **_DB),
    "iterations": Column("mean iterations", fmt="{:.1f}"),
    # never 100 % with an image unconverged (``_below_full``)
    "converged_fraction": Column("converged", unit="%", scale=100.0, fmt="{:.1f}"),
    "diverged_count": Column("diverged images (all seeds)", fmt="{:.0f}", agg="sum"),
    "nonincreasing": Column("non-increasing steps", agg="all"),
}

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_UNICODE = {
    "ε": r"$\varepsilon$",
    "σ": r"$\sigma$",
    "α": r"$\alpha$",
    "β": r"$\beta$",
    "±": r"$\pm$",
}


# ----------------------------------------------------------------------------- reading


# What every result file of a kind holds as a finite number (jobs.py writes it so), by attribute
# name: read as NaN, a failed or foreign file's value showed as 'n/a: not applicable' or its
# column vanished. Costs written with a NaN fallback (training time, memory, width) are not here.
_CLASSIFICATION_FINITE = (
    "clean_accuracy",
    "auc_certified",
    "auc_empirical",
    "auc_pgd",
    "lipschitz_bound",
    "empirical_lipschitz",
    "n_params",
    "audited_certified",
)
_DENOISING_FINITE = ("mean_psnr", "mean_psnr_1", "noisy_mean_psnr", "noisy_mean_psnr_1")
_DEBLUR_FINITE = (
    "observed_mean_psnr",
    "mean_psnr",
    "mean_iterations",
    "converged_fraction",
)
# ... and by model: TV's chosen weight; a trained denoiser's Lipschitz numbers (its averagedness
# only where one is guaranteed: not here), and in PnP its chosen strength and step flag
_TV_FINITE = ("tv_weight",)
_DENOISER_FINITE = ("lipschitz_bound", "empirical_lipschitz")
_PNP_FINITE = ("lipschitz_bound", "nonincreasing", "strength", "diverged_count")


def _finite(value: Any) -> bool:
    """Whether ``value`` is a finite number, or an array of them."""
    try:
        return bool(np.isfinite(np.asarray(value, dtype=float)).all())
    except (TypeError, ValueError):
        return False


def _check_finite(path: Path, values: dict[str, Any], keys: Iterable[str]) -> None:
    """An error naming the file and the key where one of ``keys`` is not in ``values`` or not a
    finite number there."""
    for key in keys:
        if key not in values:
            raise ValueError(f"{path}: has no {key}; not a complete result file (rerun its job)")
        if not _finite(values[key]):
            raise ValueError(f"{path}: {key} is {values[key]!r}, not a finite number")


def _attrs(path: Path, finite: Iterable[str] = ()) -> dict[str, Any]:
    """The attributes of a result file; each of ``finite`` must be one, a finite number."""
    attrs = read_results(path, ())[0]
    _check_finite(path, attrs, finite)
    return attrs


def _num(attrs: dict[str, Any], key: str) -> float:
    """A numeric attribute, NaN when absent or not a number."""
    try:
        return float(attrs[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def _standard_radii(path: Path, data: dict[str, np.ndarray]) -> list[str]:
    """The labels of a file's standard radii, one per value of each ``standard_*`` curve; an
    error naming the file where two radii share a label or a curve has another length."""
    labels = [radius_label(float(eps)) for eps in np.asarray(data["standard_eps"], dtype=float)]
    if len(set(labels)) < len(labels):
        raise ValueError(f"{path}: two standard radii share a label: {labels}")
    for metric in _RADIUS_METRICS:
        if len(data[f"standard_{metric}"]) != len(labels):
            raise ValueError(
                f"{path}: standard_{metric} has {len(data[f'standard_{metric}'])} values for "
                f"{len(labels)} standard radii"
            )
    return labels


def _classification_record(path: Path) -> dict[str, Any]:
    names = ["standard_eps", *(f"standard_{m}" for m in _RADIUS_METRICS)]
    attrs, data = read_results(path, names, required=names)
    _check_finite(path, attrs, _CLASSIFICATION_FINITE)
    _check_finite(path, data, names)
    radii = _standard_radii(path, data)
    standard = {m: np.asarray(data[f"standard_{m}"], dtype=float) for m in _RADIUS_METRICS}
    record: dict[str, Any] = {
        "variant": str(attrs.get("variant", path.parent.name)),
        "model": str(attrs.get("model", "")),
        "seed": attrs.get("seed", -1),
        "clean_accuracy": _num(attrs, "clean_accuracy"),
    }
    for metric in _RADIUS_METRICS:
        for label, value in zip(radii, standard[metric], strict=True):
            record[f"{metric}{RADIUS_SEP}{label}"] = float(value)
    for key in _CLASSIFICATION_SCALARS:
        record[key] = _num(attrs, key)
    if record["total_substeps"] == 0:  # no block takes sub-steps (ResNet, SLL, AOL, ...): n/a
        record["total_substeps"] = math.nan
    record["strong_method"] = str(attrs.get("strong_method", ""))
    record["train_loss"] = str(attrs.get("train_loss", ""))
    return record


_RADIUS_METRICS = ("certified", "empirical", "pgd")
_CLASSIFICATION_SCALARS = (
    "auc_certified",
    "auc_empirical",
    "auc_pgd",
    "lipschitz_bound",
    "n_params",
    "total_substeps",
    "train_time_s",
    "audited_certified",
)


def _denoising_record(path: Path) -> dict[str, Any]:
    a = _attrs(path, _DENOISING_FINITE)
    _check_finite(path, a, _TV_FINITE if a.get("variant") == TV else _DENOISER_FINITE)
    return {
        "sigma": _num(a, "sigma"),
        "variant": str(a.get("variant", path.stem)),
        "seed": a.get("seed", -1),
        "psnr": _num(a, "mean_psnr"),
        "psnr_std": _num(a, "std_psnr"),
        "psnr_1": _num(a, "mean_psnr_1"),
        "psnr_1_std": _num(a, "std_psnr_1"),
        "noisy_psnr": _num(a, "noisy_mean_psnr"),
        "noisy_psnr_1": _num(a, "noisy_mean_psnr_1"),
        "lipschitz_bound": _num(a, "lipschitz_bound"),
        "empirical_lipschitz": _num(a, "empirical_lipschitz"),
        "averagedness": _num(a, "averagedness"),
        "tv_weight": _num(a, "tv_weight"),
    }


def _pnp_record(path: Path) -> dict[str, Any]:
    # the denoiser's folder; TV deblurring has none
    a, sigma = _attrs(path, _DEBLUR_FINITE), sigma_in_path(path)
    _check_finite(path, a, _TV_FINITE if a.get("method") == TV else _PNP_FINITE)
    return {
        "method": str(a.get("method", "")),
        "variant": str(a.get("variant", path.parent.name)),
        "denoiser_sigma": math.nan if sigma is None else float(sigma),
        "seed": a.get("seed", -1),
        # PnP's PSNR has peak 1 (jobs.run_pnp), the denoising table's peak max(x): named so
        "observed_psnr_1": _num(a, "observed_mean_psnr"),
        "psnr_1": _num(a, "mean_psnr"),
        "psnr_1_std": _num(a, "std_psnr"),
        "iterations": _num(a, "mean_iterations"),
        "converged_fraction": _num(a, "converged_fraction"),
        "diverged_count": _num(a, "diverged_count"),
        "nonincreasing": _num(a, "nonincreasing"),
        "lipschitz_bound": _num(a, "lipschitz_bound"),
        "averagedness": _num(a, "averagedness"),
        "tv_weight": _num(a, "tv_weight"),  # TV's, chosen on validation images
        "strength": _num(a, "strength"),  # PnP's, chosen on validation images
    }


# ----------------------------------------------------------------------------- aggregation


def column_spec(name: str) -> Column:
    """The :class:`Column` of a table column (``certified@36/255`` -> ``certified``)."""
    base, _, radius = name.partition(RADIUS_SEP)
    spec = COLUMNS.get(base, Column(name))
    if radius:
        return replace(spec, label=f"{spec.label} ε={radius}")
    return spec


def _series(frame: pd.DataFrame, name: str) -> pd.Series:
    """The column ``name`` of ``frame``; an error if the name is not unique (pandas would then
    return a frame of all the columns of that name)."""
    column = frame[name]
    if not isinstance(column, pd.Series):
        raise ValueError(f"table column {name!r} is not unique")
    return column


def _seed_std(values: pd.Series) -> float:
    finite = values.dropna()
    if len(finite) < 2:
        return math.nan
    # Series.std is unannotated in pandas; for a Series it returns a scalar
    return float(cast(float, finite.std(ddof=1)))


def _choices(values: pd.Series, seeds: pd.Series, fmt: str) -> float | str:
    """The setting the seeds chose: the value where they agree (NaN where none has one), else
    each distinct choice with its seeds, ``1 (seed 0), 0.1 (seeds 1, 2)``."""
    distinct = list(dict.fromkeys(values.dropna()))
    if len(distinct) <= 1:
        return float(distinct[0]) if distinct else math.nan
    parts = []
    for value in distinct:
        chose = [str(seed) for seed in seeds[values == value]]
        plural = "s" if len(chose) > 1 else ""
        parts.append(f"{fmt.format(value)} (seed{plural} {', '.join(chose)})")
    return ", ".join(parts)


def choice_text(value: Any) -> str:
    """A ``choice`` column's cell as the tables show it, also read back from the CSV file (where
    a column holding the seeds' differing choices is text): a number as :data:`CHOICE_FMT`."""
    try:
        return CHOICE_FMT.format(float(value))
    except ValueError:
        return str(value)


def _aggregate_group(group: pd.DataFrame, metrics: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {SEEDS: len(group)}
    for name in metrics:
        spec = column_spec(name)
        agg, values = spec.agg, _series(group, name)
        if agg == "first":
            row[name] = values.iloc[0]
            continue
        if agg == "choice":
            row[name] = _choices(values, _series(group, "seed"), spec.fmt)
        elif agg == "fixed":
            row[name] = float(values.mean())
        elif agg == "sum":
            row[name] = float(values.sum(min_count=1))
        elif agg == "all":
            row[name] = float(values.min()) if values.notna().any() else math.nan
        elif agg == "bound":
            row[name] = float(values.max() if spec.bound == "upper" else values.min())
        elif agg == "image":
            row[name] = float(values.mean())
            spread = _series(group, name + STD_SUFFIX).dropna()
            row[name + STD_SUFFIX] = float(np.sqrt(np.mean(spread**2))) if len(spread) else math.nan
            row[name + SEED_STD_SUFFIX] = _seed_std(values)
        else:
            row[name] = float(values.mean())
            row[name + STD_SUFFIX] = _seed_std(values)
        if 0 < values.notna().sum() < len(group):  # a mean (or sum) of fewer seeds: say so
            row[name + SEED_COUNT_SUFFIX] = int(values.notna().sum())
    return row


def _derived(name: str) -> bool:
    """A column that belongs to the metric before it (its spread, or its count of seeds)."""
    return name.endswith((STD_SUFFIX, SEED_COUNT_SUFFIX))


def _aggregate(records: list[dict[str, Any]], keys: Sequence[str]) -> pd.DataFrame:
    """One row per distinct ``keys``: mean/std over seeds (see :class:`Column`), a seeds count."""
    if not records:
        raise ValueError("no result files given")
    frame = pd.DataFrame.from_records(records)
    keys = [k for k in keys if _series(frame, k).notna().any()]
    metrics = [c for c in frame.columns if c not in keys and c != "seed" and not _derived(c)]
    rows = []
    for values, group in frame.groupby(keys, dropna=False, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        rows.append({**dict(zip(keys, values, strict=True)), **_aggregate_group(group, metrics)})
    return pd.DataFrame.from_records(rows)


def _radius_value(label: str) -> float:
    """The radius of a :func:`radius_label`."""
    top, _, bottom = label.partition("/")
    return float(top) / float(bottom) if bottom else float(top)


def _classification_headline(row: outputs.Row) -> str:
    """Accuracies at the smallest standard radius (36/255 in the paper)."""
    prefix = "certified" + RADIUS_SEP
    radii = [k.removeprefix(prefix) for k in row if k.startswith(prefix) and not _derived(k)]
    eps = min(radii, key=_radius_value)
    return (
        f"- {row['variant']}: clean {100 * row['clean_accuracy']:.1f}%, certified "
        f"{100 * row[prefix + eps]:.1f}% and empirical "
        f"{100 * row['empirical' + RADIUS_SEP + eps]:.1f}% at ε = {eps}, certified Lipschitz "
        f"bound {format_bound(row['lipschitz_bound'], COLUMNS['lipschitz_bound'].fmt)}"
    )


@outputs.table(
    name="classification",
    source="classification_evals",
    caption="Classification robustness (L2, inputs in [0, 1])",
    title="Classification: robustness",
    headline=_classification_headline,
)
def classification_table(paths: Iterable[Path]) -> pd.DataFrame:
    """One row per classifier variant: clean, certified, strongest-empirical and PGD accuracy at
    the standard radii (fractions), AUCs, Lipschitz bound, size, sub-steps, training time, and
    how many audits of certified points the strong attack ran (summed over the standard radii,
    each point audited once)."""
    return _aggregate([_classification_record(Path(p)) for p in paths], ["variant"])


def _family_record(path: Path) -> dict[str, Any]:
    """The classification record reduced to what the layer-family comparison shows."""
    full = _classification_record(path)
    attrs = _attrs(path)
    record = {
        "family": full["model"].removesuffix("_classifier") or full["variant"],
        "variant": full["variant"],
        "seed": full["seed"],
        "base_width": _num(attrs, "base_width"),
        "train_loss": full["train_loss"],
        "clean_accuracy": full["clean_accuracy"],
    }
    for metric in ("certified", "empirical"):
        record.update({k: v for k, v in full.items() if k.startswith(metric + RADIUS_SEP)})
    for key in ("empirical_lipschitz", "lipschitz_bound", "n_params"):
        record[key] = _num(attrs, key)
    for key in ("epoch_time_s", "peak_memory_mb"):
        record[key] = _num(attrs, key)
    return record


@outputs.table(
    name="families",
    source="classification_evals",
    caption="1-Lipschitz layer families (L2, inputs in [0, 1])",
    title="1-Lipschitz layer families",
)
def families_table(paths: Iterable[Path]) -> pd.DataFrame:
    """One row per classifier variant, grouped by layer family and ordered by width: clean,
    certified and strongest-empirical accuracy at the standard radii, the empirical Lipschitz
    lower bound next to the certified bound, parameters, time per epoch, peak memory."""
    df = _aggregate([_family_record(Path(p)) for p in paths], ["family", "variant"])
    order = df.sort_values(["family", "base_width", "variant"], kind="stable").index
    return df.loc[order].reset_index(drop=True)


def _denoising_headline(row: outputs.Row) -> str:
    return (
        f"- denoiser {row['variant']} (σ = {row['sigma']:g}): {row['psnr']:.2f} dB peak max(x) "
        f"(noisy {row['noisy_psnr']:.2f} dB)"
    )


@outputs.table(
    name="denoising",
    source="denoising_evals",
    caption="Gaussian denoising PSNR on the test images",
    title="Denoising",
    headline=_denoising_headline,
)
def denoising_table(paths: Iterable[Path]) -> pd.DataFrame:
    """One row per (σ, denoiser) including TV: PSNR (paper's peak and peak 1; ± is the spread
    over test images), noisy PSNR, certified and empirical Lipschitz, averagedness, TV weight."""
    return _aggregate([_denoising_record(Path(p)) for p in paths], ["sigma", "variant"])


def _deblur_label(row: outputs.Row) -> str:
    """``PnP <denoiser>``, or the TV baseline by its name (it plugs in no denoiser)."""
    return "TV deblurring (baseline)" if row["method"] == TV else f"PnP {row['variant']}"


def _pnp_headline(row: outputs.Row) -> str:
    flag = row["nonincreasing"]
    verdict = (
        "" if math.isnan(flag) else ", non-increasing steps" if flag else ", steps not monotone"
    )
    diverged, strength, weight = row["diverged_count"], row["strength"], row["tv_weight"]
    converged = row["converged_fraction"]
    return (
        f"- {_deblur_label(row)}: {row['psnr_1']:.2f} dB peak 1 (observed "
        f"{row['observed_psnr_1']:.2f} dB)"
        + ("" if pd.isna(strength) else f" at denoiser strength {choice_text(strength)}")
        + ("" if pd.isna(weight) else f" at weight {choice_text(weight)}")
        # an unconverged run's PSNR is that of its capped iterate: said where it is one
        + (
            ""
            if not converged < 1
            else f", {_below_full(100 * converged, COLUMNS['converged_fraction'].fmt)} % converged"
        )
        + ("" if math.isnan(diverged) else f", {int(diverged)} diverged")
        + verdict
    )


@outputs.table(
    name="pnp",
    source="pnp_runs",
    caption="Plug-and-Play deblurring",
    title="Plug-and-Play deblurring",
    headline=_pnp_headline,
)
def pnp_table(paths: Iterable[Path]) -> pd.DataFrame:
    """One row per (method, variant[, denoiser σ]): observed and final PSNR (peak 1; ± over
    images), iterations, converged fraction, diverged images (summed over seeds), the
    non-increasing-steps flag (1 only if it held for every seed), Lipschitz, averagedness, TV
    weight, PnP denoiser strength."""
    records = [_pnp_record(Path(p)) for p in paths]
    return _aggregate(records, ["method", "variant", "denoiser_sigma"])


# ----------------------------------------------------------------------------- display


def _significant_digits(fmt: str) -> int:
    """The significant digits of a ``{:.Ng}`` format; an error naming any other."""
    digits = fmt.removeprefix("{:.").removesuffix("g}")
    if not digits.isdigit():
        raise ValueError(f"a bound's format must be '{{:.Ng}}', not {fmt!r}")
    return int(digits)


def format_bound(value: float, fmt: str, upper: bool = True) -> str:
    """A bound to ``fmt``'s (``{:.Ng}``) significant digits, rounded up (an upper bound) or down
    (a lower bound) so that it still holds as shown; an upper bound below 1 with the digits it
    needs to stay below 1 (an averagedness of 0.9996 shown as 1 reads as none)."""
    if value == 0 or not math.isfinite(value):
        return fmt.format(value)
    exact = Decimal(repr(value))  # the shortest decimal that reads back as ``value``
    digits = _significant_digits(fmt)
    while True:
        step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
        shown = exact.quantize(step, rounding=ROUND_CEILING if upper else ROUND_FLOOR)
        if not (upper and value < 1 <= shown) or shown == exact:
            return f"{float(shown):.{digits}g}"
        digits += 1


def _format_value(value: Any, spec: Column, spread: bool = False) -> str:
    if isinstance(value, str):
        return value or MISSING
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if spec.agg == "all":
        return "yes" if value >= 1 else "no"
    if spec.fmt == "{:d}":
        return str(int(value))
    if spec.bound and not spread:
        return format_bound(float(value) * spec.scale, spec.fmt, spec.bound == "upper")
    if spec.unit == "%" and not spread and float(value) < 1:
        return _below_full(float(value) * spec.scale, spec.fmt)
    return (spec.spread_fmt if spread else spec.fmt).format(float(value) * spec.scale)


def _below_full(percent: float, fmt: str) -> str:
    """A percentage below 100 as ``fmt`` shows it, rounded down where it would round to 100: one
    image of 2,000 unconverged is 99.9 %, not 100.0 %, which reads as all of them."""
    shown = fmt.format(percent)
    fixed = re.fullmatch(r"\{:\.(\d+)f\}", fmt)
    if float(shown) < 100 or fixed is None:
        return shown
    digits = int(fixed[1])
    return f"{math.floor(percent * 10**digits) / 10**digits:.{digits}f}"


def _header(spec: Column) -> str:
    return f"{spec.label} ({spec.unit})" if spec.unit else spec.label


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Strings for readers: ``mean ± std`` cells, scaled units, headers with units; drops
    columns with no value at all (a metric that applies to none of the rows: one a row's model
    has is a finite number in its result file, or the table was refused)."""
    out: dict[str, list[str]] = {}
    for name in df.columns:
        if _derived(name) or _series(df, name).isna().all():
            continue
        spec = column_spec(name)
        cells = [_format_value(v, spec) for v in df[name]]
        std = name + STD_SUFFIX
        if std in df.columns:
            cells = [
                c if c == MISSING or pd.isna(s) else f"{c} ± {_format_value(s, spec, True)}"
                for c, s in zip(cells, df[std], strict=True)
            ]
        counted = name + SEED_COUNT_SUFFIX
        if counted in df.columns:
            cells = [
                c if pd.isna(k) else f"{c} ({int(k)} of {int(n)} seeds)"
                for c, k, n in zip(cells, df[counted], df[SEEDS], strict=True)
            ]
        out[_header(spec)] = cells
        seed_std = name + SEED_STD_SUFFIX
        if seed_std in df.columns and _series(df, seed_std).notna().any():
            seed_spec = replace(spec, label=f"{spec.label} seed std", agg="mean")
            out[_header(seed_spec)] = [_format_value(v, seed_spec, True) for v in df[seed_std]]
    return pd.DataFrame(out)


def _latex_escape(text: str) -> str:
    escaped = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    for symbol, command in _LATEX_UNICODE.items():
        escaped = escaped.replace(symbol, command)
    return escaped


def table_notes(df: pd.DataFrame) -> str:
    """What ``±`` means in this table, and what ``n/a`` stands for."""
    names = [c for c in df.columns if not _derived(c)]
    notes = []
    image = [column_spec(c).label for c in names if column_spec(c).agg == "image"]
    if image:
        notes.append(
            f"{', '.join(image)}: mean ± standard deviation over test images (pooled over "
            "seeds); 'seed std': standard deviation of the per-seed means."
        )
    several = SEEDS in df.columns and bool((df[SEEDS] > 1).any())
    if several and any(column_spec(c).agg == "mean" for c in names):
        notes.append(f"{'Other' if image else 'All'} ±: standard deviation over seeds.")
    bounds = [column_spec(c).label for c in names if column_spec(c).agg == "bound"]
    if several and bounds:
        notes.append(
            f"{', '.join(bounds)}: the one that holds for every seed's model (the largest of "
            "upper bounds, the smallest of lower bounds)."
        )
    if any(c.endswith(SEED_COUNT_SUFFIX) for c in df.columns):
        notes.append("(k of n seeds): the other seeds' result files have no value there.")
    one = ", or the seed std of a single seed" if several else ""
    notes.append(f"{MISSING}: not applicable to that model{one}.")
    return " ".join(notes)


def _left_aligned(shown: pd.DataFrame) -> list[bool]:
    text_headers = {COLUMNS[k].label for k in _TEXT_COLUMNS}
    return [c in text_headers for c in shown.columns]


def _to_markdown(shown: pd.DataFrame, caption: str, notes: str) -> str:
    align = ["left" if left else "right" for left in _left_aligned(shown)]
    table = shown.to_markdown(index=False, disable_numparse=True, colalign=align)
    return f"{caption}\n\n{table}\n\n{notes}\n"


def _to_latex(shown: pd.DataFrame, caption: str, label: str, notes: str) -> str:
    escaped = shown.map(_latex_escape)
    escaped.columns = [_latex_escape(c) for c in shown.columns]
    latex = escaped.to_latex(
        index=False,
        escape=False,
        caption=_latex_escape(caption),
        label=label,
        column_format="".join("l" if left else "r" for left in _left_aligned(shown)),
    )
    note = f"\\par\\footnotesize {_latex_escape(notes)}\n"
    return latex.replace("\\end{table}", note + "\\end{table}")


def write_table(df: pd.DataFrame, stem: Path, caption: str) -> None:
    """Write ``stem.csv`` (raw numbers, mean and std as separate columns), ``stem.md`` and
    ``stem.tex`` (formatted, units in headers), each atomically."""
    stem = Path(stem)
    shown, notes = display_frame(df), table_notes(df)
    atomic_write(stem.with_name(stem.name + ".csv"), df.to_csv(index=False))
    atomic_write(stem.with_name(stem.name + ".md"), _to_markdown(shown, caption, notes))
    tex = _to_latex(shown, caption, f"tab:{stem.name}", notes)
    atomic_write(stem.with_name(stem.name + ".tex"), tex)
