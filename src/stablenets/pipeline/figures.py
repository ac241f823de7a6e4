"""Figures (PDF and PNG) from the pipeline's result files, in one shared style.

Every figure function reads result files, draws, saves ``stem.pdf`` and ``stem.png`` atomically
and returns the :class:`~matplotlib.figure.Figure` (for inspection in tests). Figures are built
with :class:`~matplotlib.figure.Figure` directly, never through ``pyplot``: no display, no
global figure registry, nothing to close.

Colours: :func:`model_colors` gives a model the same colour in every figure; every line drawn
for a model carries the model's name as its ``gid``.

Each figure is declared where it is drawn (``@outputs.figure``: name, inputs, and how the
registry's one call ``build(paths, stem, spec)`` reaches it, see
:mod:`~stablenets.pipeline.outputs`). This module reads files only (through
:func:`~stablenets.pipeline.runtime.read_results`); it imports neither torch nor the tables.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.typing import LineStyleType

from stablenets.atomic import atomic_path
from stablenets.pipeline import outputs
from stablenets.pipeline.labels import radius_label, sigma_in_path
from stablenets.pipeline.runtime import read_results

__all__ = [
    "FAMILY_COLORS",
    "KNOWN_MODELS",
    "SIZE_SHADES",
    "set_style",
    "model_colors",
    "save_figure",
    "robustness_figure",
    "families_figure",
    "training_figure",
    "denoising_examples_figure",
    "pnp_convergence_figure",
    "pnp_reconstructions_figure",
]

# ----------------------------------------------------------------------------- style constants

#: Known model names, in colour order: the i-th gets the i-th colour of ``KNOWN_COLORS``.
KNOWN_MODELS = (
    "nonexpansive",
    "resnet",
    "euler",
    "heun",
    "rk4",
    "euler_residual",
    "averaged",
    "dncnn",
    "tv",
    "observed",
)
#: Colours of ``KNOWN_MODELS``: seaborn's colour-blind-safe ``"colorblind"`` palette (Wong),
#: spelled out so that reading the figures' registry does not import seaborn (1.8 s at every
#: Snakemake start); TV gets a darker yellow than the palette's, observed its grey.
KNOWN_COLORS = (
    *("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4"),
    *("#56b4e9", "#b8850a", "#949494"),
)
#: The layer families (issue 12): one hue each from Paul Tol's colour-blind-safe "muted" set
#: (none of them in ``KNOWN_COLORS``); a size preset ``<family>_<size>`` takes a lighter shade
#: of it, lighter for smaller sizes.
FAMILY_COLORS = {"cpl": "#882255", "sll": "#44aa99", "aol": "#999933", "orthogonal": "#332288"}
SIZE_SHADES = ("XS", "S", "M", "L")
#: Colours for unknown names, taken in their sorted order (cycled if more are needed).
#: seaborn's ``"dark"`` palette, spelled out as ``KNOWN_COLORS`` is, less the colour a known
#: model has (its dark yellow is TV's).
EXTRA_COLORS = tuple(
    c
    for c in (
        *("#001c7f", "#b1400d", "#12711c", "#8c0800", "#591e71"),
        *("#592f0d", "#a23582", "#3c3c3c", "#b8850a", "#006374"),
    )
    if c not in KNOWN_COLORS
)

PNG_DPI = 150
FONT_SCALE = 1.1
STYLE_RC: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "pdf.fonttype": 42,  # embed TrueType: text stays editable and searchable
    "ps.fonttype": 42,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "lines.linewidth": 1.4,
    "savefig.dpi": PNG_DPI,
}
PANEL_SIZE = (3.3, 2.5)  # inches per plot panel
FAMILY_PANEL_SIZE = (3.4, 2.8)  # inches per panel of the layer-family comparison
ROBUSTNESS_SIZE = (7.0, 3.8)  # inches, the robustness plot (legends outside, on the right)
IMAGE_SIZE = 1.8  # inches of the longer side of one image panel
BAND_ALPHA = 0.18  # light bands (min-max over blocks or images)
EPS_PAD = 0.03  # left x margin (fraction of the ε range) so the ε=0 marker is not clipped
LEGEND_ROWS = 8  # entries per column of a side legend
LEGEND_COLUMN_WIDTH = 1.4  # inches a side legend's further column takes
CURVE_STYLES: dict[str, LineStyleType] = {"certified": "--", "empirical": "-", "pgd": ":"}
CURVE_LABELS = {
    "certified": "certified",
    "empirical": "empirical (strongest attack)",
    "pgd": "PGD",
}
TRAIN_VAL_STYLES: dict[str, LineStyleType] = {"train": "-", "val": "--"}
# horizontal reference lines (PnP)
REFERENCE_STYLES: dict[str, LineStyleType] = {"observed": ":", "final": "-."}
PSNR_MARGIN_DB = 3.0  # PnP PSNR axis: margin around the non-diverged results and observed
DIVERGED_MARKER = "x"  # PnP step panel: where an image diverged (an infinite step)
CORNER_BOX = {"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.85, "linewidth": 0}


def set_style() -> None:
    """The one style of all figures: seaborn ``paper`` context, white grid, colour-blind
    palette, embedded TrueType fonts."""
    import seaborn as sns  # here, not at import: see KNOWN_COLORS

    sns.set_theme(
        context="paper",
        style="whitegrid",
        palette=list(KNOWN_COLORS),
        font_scale=FONT_SCALE,
        rc=STYLE_RC,
    )


def _ordered(names: Iterable[str]) -> list[str]:
    """Known names in ``KNOWN_MODELS`` order, then unknown names sorted."""
    unique = set(names)
    known = [n for n in KNOWN_MODELS if n in unique]
    return known + sorted(unique - set(KNOWN_MODELS))


def _family_color(name: str) -> str | None:
    """``FAMILY_COLORS[family]`` for ``family`` or ``family_<size>`` (a shade per size)."""
    family, _, size = name.partition("_")
    if family not in FAMILY_COLORS or (size and size not in SIZE_SHADES):
        return None
    if not size:
        return FAMILY_COLORS[family]
    import seaborn as sns

    shades = sns.light_palette(FAMILY_COLORS[family], n_colors=len(SIZE_SHADES) + 3)[2:-1]
    return to_hex(shades[SIZE_SHADES.index(size)])


def model_colors(names: Iterable[str]) -> dict[str, str]:
    """Hex colour per model name: a fixed colour per known name (``KNOWN_MODELS``) and per layer
    family and size (``FAMILY_COLORS``), other names in sorted order from ``EXTRA_COLORS``.
    Deterministic, so the same known model has the same colour in every figure."""
    colors: dict[str, str] = {}
    unknown = 0
    for name in _ordered(names):
        if name in KNOWN_MODELS:
            colors[name] = KNOWN_COLORS[KNOWN_MODELS.index(name)]
        elif (family := _family_color(name)) is not None:
            colors[name] = family
        else:
            colors[name] = EXTRA_COLORS[unknown % len(EXTRA_COLORS)]
            unknown += 1
    return colors


def save_figure(fig: Figure, stem: Path) -> None:
    """Write ``stem.pdf`` and ``stem.png`` (``PNG_DPI``), tight bounding box, each atomically;
    without time stamps, so the same figure gives the same PDF."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    formats = {"pdf": {"metadata": {"CreationDate": None}}, "png": {"dpi": PNG_DPI}}
    for suffix, kwargs in formats.items():
        path = stem.with_name(f"{stem.name}.{suffix}")
        with atomic_path(path, suffix=f".{suffix}") as tmp:
            fig.savefig(tmp, format=suffix, bbox_inches="tight", **kwargs)


# ----------------------------------------------------------------------------- reading


@dataclass
class _Result:
    """One HDF5 result file: attributes and the requested datasets that exist."""

    path: Path
    attrs: dict[str, Any]
    data: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.attrs.get("variant", self.path.stem))

    @property
    def seed(self) -> int:
        value = self.attrs.get("seed", -1)
        return int(value) if np.isfinite(value) else -1

    def number(self, key: str) -> float:
        try:
            return float(self.attrs[key])
        except (KeyError, TypeError, ValueError):
            return math.nan


def _read(path: Path, datasets: Sequence[str], required: Iterable[str] = ()) -> _Result:
    """A result file's attributes and ``datasets``; each of ``required`` must be there."""
    return _Result(Path(path), *read_results(Path(path), datasets, required))


def _common_grid(results: Sequence[_Result], key: str, curves: Iterable[str]) -> np.ndarray:
    """The radii ``key`` every result was evaluated at, with a value per radius in each of
    ``curves``; an error naming the file where not (two files whose radii differ: one was
    evaluated under an older config, and mixed, their curves would be averaged or labelled at
    radii one of them never saw)."""
    grid = results[0].data[key].astype(np.float64)
    for r in results:
        other = r.data[key].astype(np.float64)
        if other.shape != grid.shape or not np.allclose(other, grid, rtol=1e-9, atol=0.0):
            raise ValueError(
                f"{r.path} and {results[0].path} hold different {key} radii (one was "
                "evaluated under another config): rerun the older evaluation"
            )
        for curve in curves:
            if r.data[curve].shape != grid.shape:
                raise ValueError(f"{r.path}: {curve} has {r.data[curve].size} values for "
                                 f"{grid.size} radii")  # fmt: skip
    return grid


def _first_seed(
    results: Iterable[_Result], key: Callable[[_Result], str] = lambda r: r.name
) -> dict[str, _Result]:
    """One result per model (its lowest seed), in model order."""
    chosen: dict[str, _Result] = {}
    for r in sorted(results, key=lambda r: r.seed):
        chosen.setdefault(key(r), r)
    return {k: chosen[k] for k in _ordered(chosen)}


def _group(results: Iterable[_Result]) -> dict[str, list[_Result]]:
    groups: dict[str, list[_Result]] = {}
    for r in results:
        groups.setdefault(r.name, []).append(r)
    return {k: groups[k] for k in _ordered(groups)}


# ----------------------------------------------------------------------------- drawing helpers


def _new_figure(nrows: int, ncols: int, panel: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    set_style()
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _finish(fig: Figure, stem: Path) -> Figure:
    save_figure(fig, stem)
    return fig


def _model_handles(
    colors: Mapping[str, str], labels: Mapping[str, str] | None = None
) -> list[Line2D]:
    labels = labels or {}
    return [Line2D([], [], color=c, label=labels.get(n, n)) for n, c in colors.items()]


def _style_handles(
    styles: Mapping[str, LineStyleType], labels: Mapping[str, str] | None = None
) -> list[Line2D]:
    labels = labels or {}
    return [
        Line2D([], [], color="0.3", linestyle=ls, label=labels.get(k, k))
        for k, ls in styles.items()
    ]


def _side_legends(fig: Figure, *groups: tuple[str, Sequence[Artist]]) -> None:
    """Legends outside the plot area on the right, one per (title, handles) group, each in
    columns of at most ``LEGEND_ROWS`` entries (the paper's 18 classifiers in one column ran
    past the figure into the legend below)."""
    locations = ("outside right upper", "outside right lower")
    widest = 1
    for (title, handles), loc in zip(groups, locations, strict=False):
        if handles:
            ncol = -(-len(handles) // LEGEND_ROWS)
            fig.legend(handles=handles, title=title, loc=loc, ncol=ncol)
            widest = max(widest, ncol)
    # the columns beyond the first widen the figure: its panels keep their width
    fig.set_figwidth(fig.get_figwidth() + (widest - 1) * LEGEND_COLUMN_WIDTH)


def _band(
    ax: Axes,
    x: np.ndarray,
    rows: np.ndarray,
    color: str,
    gid: str,
    center: str,
    steps: bool = False,
    log: bool = False,
) -> None:
    """``center`` (mean or median) line over the rows of ``rows`` with a light min-max band;
    ``steps``: piecewise constant (integer counts); ``log``: for a log axis, the band's lower
    edge stops at the smallest positive value and a non-positive centre is not drawn."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are expected
        middle = np.nanmean(rows, 0) if center == "mean" else np.nanmedian(rows, 0)
        low, high = np.nanmin(rows, 0), np.nanmax(rows, 0)
    if log:
        positive = rows[rows > 0]
        low = np.maximum(low, positive.min()) if positive.size else low
        middle = np.where(middle > 0, middle, np.nan)
    if rows.shape[0] > 1:
        step = "post" if steps else None
        ax.fill_between(
            x, low, high, color=color, alpha=BAND_ALPHA, linewidth=0, gid=gid, step=step
        )
    ax.plot(x, middle, color=color, gid=gid, drawstyle="steps-post" if steps else "default")


def _band_handle(label: str) -> Patch:
    return Patch(color="0.3", alpha=BAND_ALPHA, label=label)


def _diverged_handle() -> Line2D:
    return Line2D([], [], color="0.3", marker=DIVERGED_MARKER, ls="none", label="diverged (∞ step)")


def _show_image(ax: Axes, chw: np.ndarray) -> None:
    """A (C, H, W) image clipped to [0, 1], without ticks."""
    image = np.clip(np.asarray(chw, dtype=np.float64), 0.0, 1.0)
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.moveaxis(image, 0, -1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _corner(ax: Axes, text: str) -> None:
    ax.text(0.03, 0.04, text, transform=ax.transAxes, ha="left", va="bottom", bbox=CORNER_BOX)


def _image_grid(nrows: int, ncols: int, shape: tuple[int, ...]) -> tuple[Figure, np.ndarray]:
    height, width = shape[-2:]
    scale = IMAGE_SIZE / max(height, width)
    return _new_figure(nrows, ncols, (width * scale, height * scale))


def _psnr_peak1(x: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN (without a warning) when there is none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _db(value: float) -> str:
    return f"{value:.2f} dB" if np.isfinite(value) else "n/a"


# ----------------------------------------------------------------------------- robustness

_ROBUST_SETS = ("eps", "certified", "empirical", "pgd")


def _mean_curves(results: list[_Result]) -> dict[str, np.ndarray]:
    """Curves averaged over seeds, which share their ε grid."""
    out: dict[str, np.ndarray] = {"eps": _common_grid(results, "eps", CURVE_STYLES)}
    for curve in CURVE_STYLES:
        out[curve] = np.mean([r.data[curve] for r in results], axis=0)
    out["clean"] = np.array([np.mean([r.number("clean_accuracy") for r in results])])
    return out


@outputs.figure(name="robustness", source="robustness_evals")
def robustness_figure(eval_paths: Iterable[Path], stem: Path) -> Figure:
    """Robust accuracy (%) against the L2 radius ε: certified dashed, strongest empirical
    solid, PGD dotted, clean accuracy marked at ε = 0; one colour per model (mean over
    seeds)."""
    groups = _group(_read(p, _ROBUST_SETS, [*_ROBUST_SETS, "clean_accuracy"]) for p in eval_paths)
    if not groups:
        raise ValueError("no evaluation files given")
    colors = model_colors(groups)
    fig, axes = _new_figure(1, 1, ROBUSTNESS_SIZE)
    ax, eps_max = axes[0, 0], 0.0
    labels = {}
    for name, results in groups.items():
        curves = _mean_curves(results)
        eps_max = max(eps_max, float(curves["eps"].max()))
        for curve, style in CURVE_STYLES.items():
            ax.plot(curves["eps"], 100 * curves[curve], ls=style, color=colors[name], gid=name)
        ax.plot([0.0], 100 * curves["clean"], "o", color=colors[name], gid=name, clip_on=False)
        n = len(results)
        labels[name] = f"{name} (mean of {n} seeds)" if n > 1 else name
    ax.set_xlim(-EPS_PAD * eps_max, eps_max * (1 + EPS_PAD))
    ax.set_ylim(0, 100)
    ax.set_xlabel("L2 radius ε (inputs in [0, 1])")
    ax.set_ylabel("robust accuracy (%)")
    clean = Line2D([], [], color="0.3", marker="o", ls="none", label="clean (ε = 0)")
    _side_legends(
        fig,
        ("model", _model_handles(colors, labels)),
        ("accuracy", [*_style_handles(CURVE_STYLES, CURVE_LABELS), clean]),
    )
    return _finish(fig, stem)


_FAMILY_SETS = ("standard_eps", "standard_certified", "standard_empirical")
#: Bars of the layer-family comparison: (label, alpha, hatch) per accuracy.
FAMILY_BARS = {
    "clean": ("clean", 0.35, ""),
    "standard_empirical": ("empirical (strongest attack)", 0.65, "//"),
    "standard_certified": ("certified", 1.0, ""),
}


def _family_order(results: Mapping[str, list[_Result]]) -> list[str]:
    """Variants grouped by layer family (the paper's models first), narrowest first."""

    def key(name: str) -> tuple[int, str, float, str]:
        first = results[name][0]
        family = str(first.attrs.get("model", name)).removesuffix("_classifier")
        rank = KNOWN_MODELS.index(family) if family in KNOWN_MODELS else len(KNOWN_MODELS)
        width = first.number("base_width")
        return (rank, family, width if np.isfinite(width) else 0.0, name)

    return sorted(results, key=key)


@outputs.figure(name="families", source="classification_evals")
def families_figure(eval_paths: Iterable[Path], stem: Path) -> Figure:
    """Layer families side by side (mean over seeds): clean, empirical and certified accuracy
    at the smallest standard radius (bars), certified accuracy against the standard radii, and
    training time per epoch; one colour per variant, as in the robustness figure."""
    groups = _group(_read(p, _FAMILY_SETS, [*_FAMILY_SETS, "clean_accuracy"]) for p in eval_paths)
    if not groups:
        raise ValueError("no classification result files given")
    names = _family_order(groups)
    colors = model_colors(names)
    fig, axes = _new_figure(1, 3, FAMILY_PANEL_SIZE)
    bars, curve, timing = axes[0]
    x = np.arange(len(names))
    every = [r for name in names for r in groups[name]]
    radii = _common_grid(every, "standard_eps", ["standard_certified", "standard_empirical"])
    first = int(np.argmin(radii))  # the smallest standard radius, whatever the config's order
    width = 0.8 / len(FAMILY_BARS)
    for i, name in enumerate(names):
        rs = groups[name]
        for j, (key, (_, alpha, hatch)) in enumerate(FAMILY_BARS.items()):
            value = _nanmean(
                [r.number("clean_accuracy") if key == "clean" else r.data[key][first] for r in rs]
            )
            offset = (j - (len(FAMILY_BARS) - 1) / 2) * width
            bars.bar(
                x[i] + offset,
                100 * value,
                width,
                color=colors[name],
                alpha=alpha,
                hatch=hatch,
                gid=name,
                edgecolor=colors[name],
                linewidth=0.6,
            )
        certified = np.mean([r.data["standard_certified"] for r in rs], axis=0)
        order = np.argsort(radii)  # a curve in increasing radius, not the config's order
        curve.plot(255 * radii[order], 100 * certified[order], "o-", color=colors[name], gid=name)
        timing.bar(
            x[i],
            _nanmean([r.number("epoch_time_s") for r in rs]),
            0.6,
            color=colors[name],
            gid=name,
        )
    for ax in (bars, timing):
        ax.set_xticks(x, names, rotation=45, ha="right")
    bars.set_ylabel(f"accuracy at ε = {radius_label(float(radii[first]))} (%)")
    bars.set_ylim(0, 100)
    curve.set_xlabel("L2 radius ε (/255)")
    curve.set_ylabel("certified accuracy (%)")
    curve.set_ylim(0, 100)
    timing.set_ylabel("training time per epoch (s)")
    accuracy = [
        Patch(facecolor="0.3", alpha=alpha, hatch=hatch, label=label)
        for label, alpha, hatch in FAMILY_BARS.values()
    ]
    _side_legends(fig, ("model", _model_handles(colors)), ("bars", accuracy))
    return _finish(fig, stem)


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class _Panel:
    """One training-diagnostics panel: what it shows and whether a log has it."""

    key: str
    ylabel: str
    log_y: bool = False


def _block_columns(log: pd.DataFrame, kind: str) -> list[str]:
    pattern = re.compile(rf"block(\d+)_{kind}")
    found = [(int(m.group(1)), c) for c in log.columns if (m := pattern.fullmatch(c))]
    return [c for _, c in sorted(found)]


def _has(log: pd.DataFrame, columns: Sequence[str]) -> bool:
    return (
        bool(columns)
        and all(c in log.columns for c in columns)
        and bool(log[list(columns)].notna().to_numpy().any())
    )


def _shows(log: pd.DataFrame, key: str) -> bool:
    """Whether a model's log has data for a panel; models without constrained blocks (total
    sub-steps always 0) are left out of the sub-step panel rather than drawn as a zero line."""
    if not _has(log, _panel_columns(log, key)):
        return False
    return key != "substeps" or bool((log["substeps"].fillna(0) > 0).any())


def _panel_columns(log: pd.DataFrame, key: str) -> list[str]:
    if key in ("norms", "block_substeps"):
        return _block_columns(log, "norm" if key == "norms" else "substeps")
    return [key] if key in log.columns else []


# The training figure's metric panel per task: label and the scale of the logged values.
TRAINING_METRICS = {
    "classification": ("accuracy (%)", 100.0),
    "denoising": ("PSNR (dB, peak max(x))", 1.0),
}


def _task_option(task: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The ``options`` of a training figure's registration: its task, which names the metric
    (not guessed from the logs' paths, where a scale may be called ``denoising``)."""
    return lambda spec: {"task": task}


def _log_rows(log: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The rows of one ``kind`` (``train`` or ``val``) of a training log."""
    return cast(pd.DataFrame, log[log["kind"] == kind])  # a boolean mask selects rows


def _draw_panel(ax: Axes, key: str, log: pd.DataFrame, color: str, name: str, scale: float) -> None:
    train = _log_rows(log, "train")
    if key == "metric":
        val = _log_rows(log, "val")
        for part, style in ((train, TRAIN_VAL_STYLES["train"]), (val, TRAIN_VAL_STYLES["val"])):
            rows = part.dropna(subset=["metric"])
            if len(rows):
                marker = "o" if part is val else None
                ax.plot(
                    rows["step"],
                    scale * rows["metric"],
                    ls=style,
                    marker=marker,
                    markersize=3,
                    color=color,
                    gid=name,
                )
    elif key in ("norms", "block_substeps"):
        columns = _panel_columns(train, key)
        rows = train[columns].to_numpy(float).T
        _band(ax, train["step"].to_numpy(), rows, color, name, "median", key != "norms")
    else:
        rows = train.dropna(subset=[key])
        drawstyle = "steps-post" if key == "substeps" else "default"
        ax.plot(rows["step"], rows[key], color=color, gid=name, drawstyle=drawstyle)


def _one_log_per_variant(paths: list[Path]) -> dict[str, Path]:
    """``models/<task>/[sigma<s>/]<variant>/seed<k>/train_log.csv``: the first log per variant
    (lowest noise level and seed), keyed by the variant name so colours match other figures."""
    chosen: dict[str, Path] = {}
    for path in sorted(paths, key=_sigma_and_seed):
        chosen.setdefault(path.parent.parent.name, path)
    return chosen


def _run_label(name: str, path: Path) -> str:
    """``euler (σ = 0.05, seed 0)``: the run a training log is of, read from its path
    (``.../sigma<s>/<variant>/seed<k>/train_log.csv``), so that a reader knows which of the
    variant's runs the figure shows (one per variant: ``_one_log_per_variant``)."""
    parts = [f"σ = {sigma}"] if (sigma := sigma_in_path(path)) is not None else []
    if re.fullmatch(r"seed\d+", path.parent.name):
        parts.append(f"seed {path.parent.name.removeprefix('seed')}")
    return f"{name} ({', '.join(parts)})" if parts else name


def _sigma_and_seed(path: Path) -> tuple[float, int]:
    """``(sigma, seed)`` of a training log's path, as numbers (``seed10`` after ``seed2``)."""
    sigma = sigma_in_path(path)
    return float(sigma) if sigma is not None else 0.0, int(path.parent.name.removeprefix("seed"))


@outputs.figure(
    name="training_classification",
    source="classification_logs",
    inputs=_one_log_per_variant,
    options=_task_option("classification"),
)
@outputs.figure(
    name="training_denoising",
    source="denoising_logs",
    inputs=_one_log_per_variant,
    options=_task_option("denoising"),
)
def training_figure(log_paths: Mapping[str, Path], stem: Path, task: str) -> Figure:
    """Training diagnostics against step, one colour per model: loss, accuracy or PSNR (train
    solid, validation dashed), learning rate, total sub-steps, and for models with constrained
    blocks the per-block norm estimates and sub-steps (median line, min-max band over blocks).
    Panels no log has are left out; the legend names each model's run (noise level, seed) as
    its log's path does. ``task`` (``TRAINING_METRICS``) names the metric."""
    if not log_paths:
        raise ValueError("no training logs given")
    metric_label, scale = TRAINING_METRICS[task]
    logs = {n: pd.read_csv(log_paths[n]) for n in _ordered(log_paths)}
    panels = [
        _Panel("loss", "training loss", log_y=True),
        _Panel("metric", metric_label),
        _Panel("lr", "learning rate", log_y=True),
        _Panel("substeps", "total sub-steps"),
        _Panel("norms", r"block norm estimate $\Vert A_i \Vert$"),
        _Panel("block_substeps", "sub-steps per block"),
    ]
    panels = [p for p in panels if any(_shows(g, p.key) for g in logs.values())]
    if not panels:
        raise ValueError(f"training logs without data: {', '.join(map(str, log_paths.values()))}")
    ncols = 3 if len(panels) > 4 else min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _new_figure(nrows, ncols, PANEL_SIZE)
    colors = model_colors(logs)
    runs = {n: _run_label(n, Path(log_paths[n])) for n in logs}
    for ax, panel in zip(axes.flat, panels, strict=False):
        for name, log in logs.items():
            if _shows(log, panel.key):
                _draw_panel(ax, panel.key, log, colors[name], name, scale)
        ax.set_xlabel("training step")
        ax.set_ylabel(panel.ylabel)
        if panel.log_y:
            ax.set_yscale("log")
    for ax in axes.flat[len(panels) :]:
        fig.delaxes(ax)
    _side_legends(
        fig,
        ("model", _model_handles(colors, runs)),
        (
            "curve",
            [
                *_style_handles(TRAIN_VAL_STYLES, {"val": "validation"}),
                _band_handle("min-max over blocks"),
            ],
        ),
    )
    return _finish(fig, stem)


# ----------------------------------------------------------------------------- denoising

_CROP_SETS = ("crops/clean", "crops/noisy", "crops/denoised", "crops/psnr", "psnr", "noisy_psnr")


def _noisy_crop_psnr(ref: _Result, k: int) -> str:
    """PSNR label of noisy crop ``k``: its full image's noisy PSNR when the crops are of the
    first test images (as ``crops/psnr`` then shows), else computed on the crop itself."""
    d = ref.data
    full = "crops/psnr" in d and "psnr" in d and "noisy_psnr" in d
    if full and np.allclose(d["crops/psnr"], d["psnr"][: len(d["crops/psnr"])], equal_nan=True):
        return _db(float(d["noisy_psnr"][k]))
    clean = d["crops/clean"][k]
    peak = float(np.max(clean)) ** 2
    mse = float(np.mean((d["crops/noisy"][k].astype(np.float64) - clean) ** 2))
    return f"{_db(10 * math.log10(peak / mse))} (crop)"


def _at_sigma(results: list[_Result], sigma: float | None) -> tuple[list[_Result], float]:
    """The results at noise level ``sigma`` (``None``: the only one there is)."""
    sigmas = sorted({s for s in (r.number("sigma") for r in results) if np.isfinite(s)})
    if sigma is None:
        if len(sigmas) > 1:
            raise ValueError(f"results of several noise levels {sigmas}: choose one with sigma")
        return results, sigmas[0] if sigmas else math.nan
    chosen = [r for r in results if np.isclose(r.number("sigma"), sigma)]
    if not chosen:
        raise ValueError(f"no results at noise level {sigma:g}; found {sigmas}")
    return chosen, float(sigma)


def _same_images(results: Iterable[_Result], key: str, n: int) -> np.ndarray:
    results = list(results)
    reference = results[0].data[key][:n]
    for r in results[1:]:
        if r.data[key][:n].shape != reference.shape or not np.allclose(r.data[key][:n], reference):
            raise ValueError(f"{r.path} shows other images ({key}) than {results[0].path}")
    return reference


def _pnp_noise_level(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The figure job's ``sigma`` (the noise level of PnP's denoisers): the one shown."""
    return {"sigma": spec.get("sigma")}


@outputs.figure(name="denoising_examples", source="denoising_evals", options=_pnp_noise_level)
def denoising_examples_figure(
    eval_paths: Iterable[Path],
    stem: Path,
    n_crops: int | None = None,
    sigma: float | None = None,
) -> Figure:
    """Grid of example crops at one noise level ``sigma`` (``None``: the only one in
    ``eval_paths``): clean, noisy, then each denoiser (lowest seed), with the PSNR of the crop's
    full test image (paper's peak definition) in the corner. ``n_crops`` rows (``None``: every
    crop saved, ``denoising.evaluate.crops``)."""
    results = [_read(p, _CROP_SETS) for p in eval_paths]
    if not results:
        raise ValueError("no evaluation files given")
    results, sigma = _at_sigma(results, sigma)
    models = _first_seed(results)
    reference = next(iter(models.values()))
    n = len(reference.data["crops/clean"][:n_crops])
    clean = _same_images(models.values(), "crops/clean", n)
    noisy_title = f"noisy (σ = {sigma:g})" if np.isfinite(sigma) else "noisy"
    titles = ["clean", noisy_title, *models]
    fig, axes = _image_grid(n, len(titles), clean.shape)
    for k in range(n):
        row = axes[k]
        _show_image(row[0], clean[k])
        _show_image(row[1], reference.data["crops/noisy"][k])
        _corner(row[1], _noisy_crop_psnr(reference, k))
        for ax, r in zip(row[2:], models.values(), strict=True):
            _show_image(ax, r.data["crops/denoised"][k])
            _corner(ax, _db(float(r.data["crops/psnr"][k])))
        row[0].set_ylabel(f"test image {k + 1}")
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title)
    return _finish(fig, stem)


# ----------------------------------------------------------------------------- plug-and-play

_PNP_SETS = (
    "diverged",
    "history/step_norm",
    "history/psnr_1",
    "images/clean",
    "images/observed",
    "images/recon",
    "psnr_final",
)


def _pnp_labels(results: list[_Result]) -> dict[int, str]:
    """Legend label per result: the variant, plus the denoiser's σ when several are shown."""
    sigmas = {sigma_in_path(r.path) for r in results if r.name != "tv"}
    several = len(sigmas) > 1
    labels = {}
    for i, r in enumerate(results):
        sigma = sigma_in_path(r.path)
        labels[i] = f"{r.name} (σ = {sigma})" if several and sigma else r.name
    return labels


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    """Stack (N_i, K_i) histories into (sum N_i, max K_i), NaN-padded."""
    width = max(r.shape[1] for r in rows)
    padded = [
        np.pad(r.astype(float), ((0, 0), (0, width - r.shape[1])), constant_values=np.nan)
        for r in rows
    ]
    return np.concatenate(padded, axis=0)


def _forward_fill(rows: np.ndarray) -> np.ndarray:
    """Hold each image's last value after it stopped (NaN padding)."""
    return pd.DataFrame(rows).ffill(axis=1).to_numpy()


def _held_steps(
    rows: np.ndarray, flagged: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Step norms with each image that stopped held at its last value (as the PSNR is: a mean
    over the images still running rises when the fastest stop), except an image that diverged:
    held, its rejected step (``+inf`` for a non-finite iterate, a huge one for an iterate past
    the blow-up bound) made the mean and the band infinite or huge, and the method's curve
    vanished; it leaves from its divergence on (NaN). An image diverged where its step is
    infinite, or at its last step where ``flagged`` (the result's per-image ``diverged``).
    Also the column where each image diverged, -1 where it did not."""
    diverged = np.isinf(rows)
    if flagged is not None:
        last = np.where(np.isnan(rows), -1, np.arange(rows.shape[1])[None]).max(1)
        diverged[np.flatnonzero(flagged), last[np.flatnonzero(flagged)]] = True
    at = np.where(diverged.any(1), diverged.argmax(1), -1)
    held = _forward_fill(np.where(diverged, np.nan, rows))
    gone = (at[:, None] >= 0) & (np.arange(rows.shape[1])[None] >= at[:, None])
    return np.where(gone, np.nan, held), at


def _draw_history(axes: np.ndarray, name: str, results: list[_Result], color: str) -> bool:
    """PSNR of ``x_k`` at ``k`` (``history/psnr_1[:, j]`` is that of ``x_{j+1}``) and the step
    ``||x_{k+1} - x_k||`` at ``k`` (``history/step_norm[:, j]`` is ``||x_{j+1} - x_j||``), an
    image's divergence marked at the top of the step panel; False when there is no history."""
    have = [r for r in results if "history/psnr_1" in r.data and r.data["history/psnr_1"].size]
    if not have:
        return False
    psnr = _forward_fill(_stack([r.data["history/psnr_1"] for r in have]))
    _band(axes[0], np.arange(1, psnr.shape[1] + 1), psnr, color, name, "mean")
    stepped = [r for r in have if "history/step_norm" in r.data]
    if stepped:
        steps = [r.data["history/step_norm"] for r in stepped]
        flags = [
            r.data.get("diverged", np.zeros(len(s), bool))
            for r, s in zip(stepped, steps, strict=True)
        ]
        norm, diverged = _held_steps(_stack(steps), np.concatenate(flags).astype(bool))
        _band(axes[1], np.arange(norm.shape[1]), norm, color, name, "mean", log=True)
        if (diverged >= 0).any():
            _mark_divergence(axes[1], diverged[diverged >= 0], color, name)
    return True


def _mark_divergence(ax: Axes, ks: np.ndarray, color: str, gid: str) -> None:
    """``DIVERGED_MARKER`` at the top of ``ax`` at each iteration ``ks`` where an image's step
    was infinite (no value to plot it at on the log axis)."""
    ax.plot(ks, np.ones(len(ks)), ls="none", marker=DIVERGED_MARKER, color=color, gid=gid,
            transform=ax.get_xaxis_transform(), clip_on=False)  # fmt: skip


def _diverged(result: _Result) -> int:
    """How many of a run's test images diverged: 0 where it records none (TV: NaN)."""
    count = float(result.attrs.get("diverged_count", math.nan))
    return 0 if math.isnan(count) else int(count)


def _diverged_label(label: str, results: list[_Result]) -> str:
    """``label``, plus how many of its test images diverged (over all its runs) when any did (the
    PSNR axis is then cut below, so the legend must say where the curve went)."""
    runs = [r for r in results if "diverged_count" in r.attrs]
    diverged = sum(_diverged(r) for r in runs)
    if not diverged:
        return label
    total = sum(len(r.data["psnr_final"]) for r in runs if "psnr_final" in r.data)
    return f"{label} (diverged {diverged}/{total})" if total else f"{label} (diverged)"


def _focus_psnr(ax: Axes, results: list[_Result], observed: float) -> None:
    """PSNR axis from a little below the worst to a little above the best value of the
    non-diverged runs (final, history and observed PSNR), so that one diverging method does not
    flatten every other curve."""
    values = [observed]
    for r in results:
        if _diverged(r):
            continue
        values.append(r.number("mean_psnr"))
        history = r.data.get("history/psnr_1")
        if history is not None and np.isfinite(history).any():
            values += [float(np.nanmin(history)), float(np.nanmax(history))]
    finite = [v for v in values if np.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) - PSNR_MARGIN_DB, max(finite) + PSNR_MARGIN_DB)


@outputs.figure(name="pnp_convergence", source="pnp_runs")
def pnp_convergence_figure(pnp_paths: Iterable[Path], stem: Path) -> Figure:
    """PSNR (dB, peak 1) of ``x_k`` and ``||x_{k+1} - x_k||`` (log scale) against iteration
    ``k``: mean over test images (and seeds) with a light min-max band, an image that stopped
    held at its last value (so an averaged denoiser's mean step never rises), one that diverged
    left out of the steps from its divergence on and marked there, one colour per method;
    methods without a history (TV) as a horizontal line at their final PSNR, the observed PSNR
    dotted."""
    results = [_read(p, _PNP_SETS) for p in pnp_paths]
    if not results:
        raise ValueError("no PnP result files given")
    labels = _pnp_labels(results)
    groups: dict[str, list[_Result]] = {}
    for i, r in enumerate(results):
        groups.setdefault(labels[i], []).append(r)
    groups = {_diverged_label(label, rs): rs for label, rs in groups.items()}
    variant = {label: rs[0].name for label, rs in groups.items()}
    colors = model_colors([*variant.values(), "observed"])
    fig, axes = _new_figure(1, 2, PANEL_SIZE)
    axes = axes[0]
    rank = _ordered(variant.values())
    order = sorted(groups, key=lambda label: (rank.index(variant[label]), label))
    for label in order:
        rs, color = groups[label], colors[variant[label]]
        if not _draw_history(axes, variant[label], rs, color):
            final = _nanmean([r.number("mean_psnr") for r in rs])
            axes[0].axhline(final, color=color, ls=REFERENCE_STYLES["final"], gid=variant[label])
    observed = _nanmean([r.number("observed_mean_psnr") for r in results])
    if np.isfinite(observed):
        axes[0].axhline(
            observed, color=colors["observed"], ls=REFERENCE_STYLES["observed"], gid="observed"
        )
    _focus_psnr(axes[0], results, observed)
    axes[0].set_ylabel("PSNR (dB, peak 1)")
    axes[1].set_ylabel(r"$\Vert x_{k+1} - x_k \Vert$")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("iteration k")
    if not axes[1].lines:
        fig.delaxes(axes[1])
    refs = [
        Line2D([], [], color=colors["observed"], ls=REFERENCE_STYLES["observed"], label="observed"),
        Line2D([], [], color="0.3", ls=REFERENCE_STYLES["final"], label="final (no history)"),
        _band_handle("min-max over images"),
    ]
    if any(line.get_marker() == DIVERGED_MARKER for line in axes[1].lines):
        refs.append(_diverged_handle())
    methods = {label: colors[variant[label]] for label in order}
    _side_legends(fig, ("method", _model_handles(methods)), ("reference", refs))
    return _finish(fig, stem)


@outputs.figure(name="pnp_reconstructions", source="pnp_runs")
def pnp_reconstructions_figure(
    pnp_paths: Iterable[Path], stem: Path, n_images: int | None = None
) -> Figure:
    """Grid: clean, observed (blurred and noisy), then each method's reconstruction (lowest
    seed), with its PSNR (dB, peak 1) in the corner: the table's, of the iterate itself, which
    may leave [0, 1]; the image is shown clipped to [0, 1]. ``n_images`` rows (``None``: every
    image saved, ``pnp.n_show``)."""
    results = [_read(p, _PNP_SETS) for p in pnp_paths]
    if not results:
        raise ValueError("no PnP result files given")
    labels = _pnp_labels(results)
    index = {id(r): labels[i] for i, r in enumerate(results)}
    methods = _first_seed(results, key=lambda r: index[id(r)])
    reference = next(iter(methods.values()))
    n = len(reference.data["images/clean"][:n_images])
    clean = _same_images(methods.values(), "images/clean", n)
    observed = reference.data["images/observed"][:n]
    titles = ["clean", "observed", *methods]
    fig, axes = _image_grid(n, len(titles), clean.shape)
    for k in range(n):
        row = axes[k]
        _show_image(row[0], clean[k])
        _show_image(row[1], observed[k])
        _corner(row[1], _db(_psnr_peak1(observed[k], clean[k])))
        for ax, r in zip(row[2:], methods.values(), strict=True):
            recon = r.data["images/recon"][k]
            _show_image(ax, recon)
            _corner(ax, _db(_psnr_peak1(recon, clean[k])))
        row[0].set_ylabel(f"test image {k + 1}")
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title)
    return _finish(fig, stem)
