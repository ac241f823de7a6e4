"""Figures from small, seeded fake result files written in the pipeline's schema."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
from fake_results import STANDARD_EPS, write_classification, write_denoising, write_pnp
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from test_outputs import CAPTIONS, CONFIGS, SCHEMA, _render

matplotlib.use("Agg")

from stablenets.pipeline import outputs
from stablenets.pipeline.config import load_config
from stablenets.pipeline.figures import (
    EXTRA_COLORS,
    FAMILY_COLORS,
    KNOWN_COLORS,
    KNOWN_MODELS,
    SIZE_SHADES,
    _one_log_per_variant,
    denoising_examples_figure,
    families_figure,
    model_colors,
    pnp_convergence_figure,
    pnp_reconstructions_figure,
    robustness_figure,
    save_figure,
    training_figure,
)
from stablenets.pipeline.labels import radius_label

PDF_MAGIC = b"%PDF-"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 5_000  # a blank PNG of these sizes is far smaller
SIGMA = 0.15
CROP = (3, 12, 16)  # C, h, w
N_IMAGES, N_ITER = 3, 12


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def classification_eval(root: Path, variant: str, seed: int) -> Path:
    eps = np.linspace(0, 1, 20)
    clean = 0.7 + 0.02 * seed + (0.1 if variant == "resnet" else 0.0)
    decay = 8.0 if variant == "resnet" else 3.0
    pgd = clean * np.exp(-decay * eps)
    certified = pgd * (0.0 if variant == "resnet" else 0.6)
    standard = STANDARD_EPS
    attrs = {
        "model": variant,
        "clean_accuracy": clean,
        "lipschitz_bound": 1.0,
        "n_params": 1000,
        "total_substeps": 15,
        "train_time_s": 10.0,
        "best_step": 5,
        "auc_certified": 0.1,
        "auc_pgd": 0.2,
        "auc_empirical": 0.2,
        "n_test": 50,
        "strong_method": "pgd",
        "base_width": 16,
        "epoch_time_s": 2.0 + seed,
    }
    data = {
        "eps": eps,
        "certified": certified,
        "pgd": pgd,
        "empirical": 0.95 * pgd,
        **{
            f"standard_{k}": np.interp(standard, eps, v)
            for k, v in {
                "certified": certified,
                "pgd": pgd,
                "empirical": 0.95 * pgd,
            }.items()
        },
    }
    return write_classification(root, variant, seed, attrs, data)


def training_log(
    root: Path, task: str, variant: str, n_blocks: int, seed: int = 0, drop: tuple = ()
) -> Path:
    """Train rows every step, validation rows every 5 steps; block columns when n_blocks > 0."""
    g, steps = rng(seed), np.arange(0, 40, 2)
    train = pd.DataFrame(
        {
            "step": steps,
            "kind": "train",
            "loss": 2.0 * np.exp(-steps / 20) + 0.01 * g.random(len(steps)),
            "metric": 1 - np.exp(-steps / 20),
            "lr": np.interp(steps, [0, 20, 40], [1e-5, 1.0, 1e-5]),
            "substeps": 10 + steps // 10,
            "images_per_s": 100.0,
        }
    )
    for i in range(n_blocks):
        train[f"block{i}_substeps"] = 1 + (steps > 10 * (i + 1))
        train[f"block{i}_norm"] = 1 + 0.01 * steps * (i + 1)
    val = pd.DataFrame({"step": steps[::5], "kind": "val", "metric": 0.9 * train["metric"][::5]})
    path = root / f"models/{task}/{variant}/seed{seed}/train_log.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = pd.concat([train, val]).sort_values("step", kind="stable")
    log.drop(columns=list(drop)).to_csv(path, index=False)
    return path


N_SAVED = 3  # examples the jobs saved (denoising.evaluate.crops, pnp.n_show): a figure shows
# every one (a fixed 2 ignored the settings)


def denoising_eval(root: Path, variant: str, seed: int, sigma: float = SIGMA) -> Path:
    """Crops of the first test images; ``crops/psnr`` are those images' PSNRs."""
    g = rng(100)  # the same clean and noisy images in every file
    clean = g.random((N_IMAGES, *CROP)).astype(np.float32)
    noisy = clean + sigma * g.standard_normal(clean.shape).astype(np.float32)
    shift = {"tv": 0.08, "dncnn": 0.03}.get(variant, 0.05)
    denoised = clean + shift * rng(seed + 7).standard_normal(clean.shape).astype(np.float32)
    psnr = 25.0 + 3 * rng(seed + 1).random(N_IMAGES)
    tv = variant == "tv"
    attrs = {
        "averagedness": None,
        "mean_psnr": psnr.mean(),
        "std_psnr": psnr.std(),
        "mean_psnr_1": psnr.mean(),
        "std_psnr_1": psnr.std(),
        "noisy_mean_psnr": 17.0,
        "noisy_mean_psnr_1": 17.0,
        "tv_weight": 0.1 if tv else None,
    }
    data = {
        "psnr": psnr,
        "psnr_1": psnr,
        "noisy_psnr": np.array([17.0, 17.5, 18.0]),
        "image_index": np.arange(N_IMAGES),
        "crops/clean": clean[:N_SAVED],
        "crops/noisy": noisy[:N_SAVED],
        "crops/denoised": denoised[:N_SAVED],
        "crops/psnr": psnr[:N_SAVED],
    }
    return write_denoising(root, variant, seed, sigma, attrs, data)


def pnp_result(root: Path, variant: str, seed: int, history: bool = True) -> Path:
    g = rng(200)
    clean = g.random((N_SAVED, 3, 16, 16)).astype(np.float32)
    observed = (clean + 0.1 * g.standard_normal(clean.shape)).astype(np.float32)
    recon = (clean + 0.03 * rng(seed + 3).standard_normal(clean.shape)).astype(np.float32)
    stops = np.array([N_ITER, N_ITER - 4, N_ITER - 2])  # images stop at different iterations
    k = np.arange(1, N_ITER + 1)
    step = np.where(
        k[None] <= stops[:, None], np.exp(-0.3 * k)[None] * (1 + np.arange(3))[:, None], np.nan
    )
    step[0, -1] = 0.0  # exact convergence: must not break the log scale
    curve = 22 + 6 * (1 - np.exp(-0.4 * k))[None] + np.arange(3)[:, None]  # per-image offset
    psnr = np.where(np.isfinite(step), curve, np.nan)
    attrs = {
        "observed_mean_psnr": 20.0,
        "mean_psnr": 27.0,
        "std_psnr": 1.0,
        "mean_iterations": 10.0,
        "converged_fraction": 1.0,
        "diverged_count": None if variant == "tv" else 0,  # TV records none (as its job)
        "nonincreasing": 1,
        "averagedness": 0.5 if variant == "averaged" else None,
    }
    data = {
        "psnr_final": np.full(3, 27.0),
        "psnr_observed": np.full(3, 20.0),
        "iterations": stops,
        "images/clean": clean,
        "images/observed": observed,
        "images/recon": recon,
    }
    if history:
        data.update({"history/step_norm": step, "history/psnr_1": psnr, "history/residual": step})
    return write_pnp(root, variant, seed, attrs, data)


def assert_saved(stem: Path) -> None:
    pdf, png = stem.with_name(stem.name + ".pdf"), stem.with_name(stem.name + ".png")
    assert pdf.read_bytes().startswith(PDF_MAGIC)
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert png.stat().st_size > MIN_PNG_BYTES
    leftovers = [p.name for p in stem.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def assert_no_empty_axes(fig: Figure) -> None:
    for ax in fig.axes:
        if ax.get_visible():
            assert ax.lines or ax.images or ax.patches, (
                f"empty axes {ax.get_ylabel() or ax.get_title()!r}"
            )


def line_colors(fig: Figure) -> dict[str, str]:
    """Model name (line gid) -> colour; fails if one model is drawn in two colours."""
    found: dict[str, str] = {}
    for ax in fig.axes:
        for line in ax.lines:
            gid = line.get_gid()
            if gid is not None:
                color = to_hex(line.get_color())
                assert found.setdefault(gid, color) == color, gid
    return found


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def classification_paths(root: Path) -> list[Path]:
    return [classification_eval(root, v, s) for v in ("nonexpansive", "resnet") for s in (0, 1)]


@pytest.fixture(scope="module")
def training_logs(root: Path) -> dict[str, Path]:
    return {
        "nonexpansive": training_log(root, "classification", "nonexpansive", n_blocks=3),
        "resnet": training_log(root, "classification", "resnet", n_blocks=0),
    }


@pytest.fixture(scope="module")
def robust_fig(classification_paths: list[Path], root: Path) -> Figure:
    return robustness_figure(classification_paths, root / "figures" / "robustness")


@pytest.fixture(scope="module")
def training_fig(training_logs: dict[str, Path], root: Path) -> Figure:
    return training_figure(training_logs, root / "figures" / "training", "classification")


@pytest.fixture()
def denoising_paths(tmp_path: Path) -> list[Path]:
    return [
        denoising_eval(tmp_path, "euler", 0),
        denoising_eval(tmp_path, "euler", 1),
        denoising_eval(tmp_path, "dncnn", 0),
        denoising_eval(tmp_path, "tv", -1),
    ]


@pytest.fixture()
def pnp_paths(tmp_path: Path) -> list[Path]:
    return [
        pnp_result(tmp_path, "averaged", 0),
        pnp_result(tmp_path, "averaged", 1),
        pnp_result(tmp_path, "dncnn", 0),
        pnp_result(tmp_path, "tv", -1, history=False),
    ]


def test_model_colors_deterministic_and_distinct() -> None:
    known = model_colors(KNOWN_MODELS)
    assert len(set(known.values())) == len(KNOWN_MODELS)
    assert model_colors(["resnet"])["resnet"] == known["resnet"]
    mixed = model_colors(["zeta", "resnet", "alpha"])
    assert list(mixed) == ["resnet", "alpha", "zeta"]
    assert mixed["resnet"] == known["resnet"]
    assert mixed["alpha"] != mixed["zeta"]
    assert model_colors(["alpha", "zeta"]) == {k: mixed[k] for k in ("alpha", "zeta")}


def test_the_spelled_out_colours_are_seaborns_palettes() -> None:
    """``KNOWN_COLORS`` and ``EXTRA_COLORS`` are written as hex codes (importing seaborn at
    every Snakemake start cost 1.8 s): they stay seaborn's "colorblind" and "dark" palettes."""
    import seaborn as sns

    colorblind = [to_hex(c) for c in sns.color_palette("colorblind", 10)]
    assert KNOWN_COLORS == (*colorblind[:7], colorblind[9], "#b8850a", colorblind[7])
    dark = [to_hex(c) for c in sns.color_palette("dark", 10)]
    assert EXTRA_COLORS == tuple(c for c in dark if c not in KNOWN_COLORS) and len(dark) == 10


def test_no_unknown_model_takes_a_known_or_family_colour_until_the_extras_cycle() -> None:
    """The ninth unknown name took TV's dark yellow: two models of one figure alike."""
    names = [f"my_denoiser{i}" for i in range(len(EXTRA_COLORS))]
    colors = model_colors([*names, *KNOWN_MODELS, *FAMILY_COLORS])
    assert len(set(colors.values())) == len(colors)


def test_family_colours_are_fixed_distinct_and_shaded_by_size() -> None:
    """Every family x size keeps its colour whatever else is drawn; no two are alike, none is a
    paper model's; within a family, larger sizes are darker."""
    from matplotlib.colors import to_rgb

    names = [f"{f}_{s}" for f in FAMILY_COLORS for s in SIZE_SHADES] + list(FAMILY_COLORS)
    every = model_colors([*names, *KNOWN_MODELS])
    assert len(set(every.values())) == len(names) + len(KNOWN_MODELS)
    for name in names:
        assert model_colors([name, "zeta"])[name] == every[name]
    for family in FAMILY_COLORS:
        light = [sum(to_rgb(every[f"{family}_{s}"])) for s in SIZE_SHADES]
        assert light == sorted(light, reverse=True)
    assert model_colors(["cpl_XXL"])["cpl_XXL"] == model_colors(["zeta"])["zeta"]  # not a size


def test_robustness_figure(robust_fig: Figure, root: Path) -> None:
    fig = robust_fig
    assert_saved(root / "figures" / "robustness")
    assert_no_empty_axes(fig)
    (ax,) = fig.axes
    assert "%" in ax.get_ylabel() and "ε" in ax.get_xlabel()
    styles = {line.get_linestyle() for line in ax.lines}
    assert {"--", "-", ":"} <= styles
    clean = [line for line in ax.lines if line.get_marker() == "o" and line.get_gid() == "resnet"]
    assert clean[0].get_ydata()[0] == pytest.approx(100 * (0.80 + 0.82) / 2)  # mean of seeds
    assert ax.get_xlim()[0] < 0  # the ε = 0 marker is inside the axes
    assert line_colors(fig) == model_colors(["nonexpansive", "resnet"])
    legend_text = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    assert "certified" in legend_text and "PGD" in legend_text


def test_training_figure_with_and_without_blocks(training_fig: Figure, root: Path) -> None:
    """One model with constrained blocks, one without: six panels, block panels only for the
    model that has blocks."""
    fig = training_fig
    assert_saved(root / "figures" / "training")
    assert_no_empty_axes(fig)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "accuracy (%)" in labels and "learning rate" in labels
    assert any("norm" in label for label in labels) and len(fig.axes) == 6
    norms = fig.axes[[i for i, label in enumerate(labels) if "norm" in label][0]]
    assert {line.get_gid() for line in norms.lines} == {"nonexpansive"}  # resnet has no blocks
    assert norms.collections, "expected a min-max band over blocks"
    metric = fig.axes[labels.index("accuracy (%)")]
    assert max(max(line.get_ydata()) for line in metric.lines) > 1  # fractions shown as %
    assert line_colors(fig) == model_colors(["nonexpansive", "resnet"])


def test_training_figure_without_blocks_denoising(tmp_path: Path) -> None:
    """A log without block columns and without sub-steps: three panels in a 2x2 grid (the
    fourth axes removed), the metric as PSNR for a denoising log."""
    bare = training_log(tmp_path, "denoising/sigma0.15", "dncnn", 0, drop=("substeps",))
    fig = training_figure({"dncnn": bare}, tmp_path / "bare", "denoising")
    assert_no_empty_axes(fig)
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "training loss",
        "PSNR (dB, peak max(x))",
        "learning rate",
    ]
    metric = fig.axes[1]
    assert max(max(line.get_ydata()) for line in metric.lines) < 1  # PSNR values are not scaled


def test_the_training_figures_take_their_task_from_the_registry_not_the_scales_name(
    tmp_path: Path,
) -> None:
    """A scale named ``denoising`` made the classification figure a PSNR plot, and one named
    ``sigma_test`` crashed the denoising figure (``float('_test')``): the task is the figure's,
    the noise level the nearest ``sigma<label>`` folder's."""
    root = tmp_path / "sigma_test" / "denoising"
    logs = [training_log(root, "classification", "resnet", 0, seed=s) for s in (2, 1)]
    build = outputs.get("figure", "training_classification").build
    fig = build(logs, tmp_path / "classification", {"kind": "training_classification"})
    assert fig.axes[1].get_ylabel() == "accuracy (%)"
    logs = [training_log(root, "denoising/sigma0.15", "dncnn", 0, seed=s) for s in (2, 1)]
    build = outputs.get("figure", "training_denoising").build
    fig = build(logs, tmp_path / "denoising", {"kind": "training_denoising"})
    assert fig.axes[1].get_ylabel() == "PSNR (dB, peak max(x))"


def test_training_logs_without_data_are_an_error_naming_them(tmp_path: Path) -> None:
    empty = tmp_path / "train_log.csv"
    empty.write_text("step,kind,loss,metric,lr\n")
    with pytest.raises(ValueError, match=f"training logs without data: {empty}"):
        training_figure({"dncnn": empty}, tmp_path / "empty", "denoising")


def test_denoising_examples_figure(denoising_paths: list[Path], tmp_path: Path) -> None:
    stem = tmp_path / "denoising_examples"
    fig = denoising_examples_figure(denoising_paths, stem)
    assert_saved(stem)
    assert_no_empty_axes(fig)
    columns = 2 + 3  # clean, noisy, euler, dncnn, tv
    assert len(fig.axes) == N_SAVED * columns  # a row per saved example (crops, n_show)
    titles = [ax.get_title() for ax in fig.axes[:columns]]
    assert titles == ["clean", "noisy (σ = 0.15)", "euler", "dncnn", "tv"]
    euler = h5py.File(denoising_paths[0], "r")  # seed 0 is the one shown
    with euler:
        expected = f"{euler['crops/psnr'][1]:.2f} dB"
    second_row_euler = fig.axes[columns + 2]
    assert [t.get_text() for t in second_row_euler.texts] == [expected]
    assert fig.axes[columns + 1].texts[0].get_text() == "17.50 dB"  # full-image noisy PSNR
    noisy = fig.axes[columns + 1].images[0].get_array()
    with h5py.File(denoising_paths[0], "r") as fh:
        assert fh["crops/noisy"][1].max() > 1  # the test data leave [0, 1] ...
    assert 0 <= noisy.min() and noisy.max() <= 1  # ... the figure shows them clipped


def test_denoising_examples_choose_noise_level(denoising_paths: list[Path], tmp_path: Path) -> None:
    other = denoising_eval(tmp_path, "dncnn", 0, sigma=0.05)
    with pytest.raises(ValueError, match="several noise levels"):
        denoising_examples_figure([*denoising_paths, other], tmp_path / "bad")
    fig = denoising_examples_figure([*denoising_paths, other], tmp_path / "low", sigma=0.05)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["clean", "noisy (σ = 0.05)", "dncnn"]
    assert len(fig.axes) == N_SAVED * 3


def test_the_registry_draws_denoising_examples_at_the_specs_noise_level(
    denoising_paths: list[Path], tmp_path: Path
) -> None:
    """The figure job's one call, ``build(paths, stem, spec)``: the spec's ``sigma`` chooses the
    noise level among the results given."""
    build = outputs.get("figure", "denoising_examples").build
    other = denoising_eval(tmp_path, "dncnn", 0, sigma=0.05)
    fig = build([*denoising_paths, other], tmp_path / "low", {"kind": "x", "sigma": 0.05})
    assert [ax.get_title() for ax in fig.axes[:3]] == ["clean", "noisy (σ = 0.05)", "dncnn"]
    assert_saved(tmp_path / "low")


def test_the_registry_draws_one_training_log_per_variant_its_lowest_seed(tmp_path: Path) -> None:
    logs = {
        (variant, seed): training_log(tmp_path, "classification", variant, 2, seed=seed)
        for variant in ("resnet", "nonexpansive")
        for seed in (1, 0)
    }
    build = outputs.get("figure", "training_classification").build
    fig = build(list(logs.values()), tmp_path / "training", {"kind": "training_classification"})
    loss = fig.axes[[ax.get_ylabel() for ax in fig.axes].index("training loss")]
    drawn = {line.get_gid(): line.get_ydata() for line in loss.lines}
    assert sorted(drawn) == ["nonexpansive", "resnet"]
    for variant, ydata in drawn.items():
        log = pd.read_csv(logs[variant, 0])
        np.testing.assert_array_equal(ydata, log.loc[log["kind"] == "train", "loss"])


def test_pnp_convergence_figure(pnp_paths: list[Path], tmp_path: Path) -> None:
    stem = tmp_path / "pnp_convergence"
    fig = pnp_convergence_figure(pnp_paths, stem)
    assert_saved(stem)
    assert_no_empty_axes(fig)
    psnr_ax, step_ax = fig.axes
    assert step_ax.get_yscale() == "log" and "PSNR (dB" in psnr_ax.get_ylabel()
    assert "iteration" in step_ax.get_xlabel()
    tv = [line for line in psnr_ax.lines if line.get_gid() == "tv"]
    assert tv and np.allclose(tv[0].get_ydata(), 27.0)  # no history: its final PSNR
    averaged = [line for line in psnr_ax.lines if line.get_gid() == "averaged"][0]
    assert np.isfinite(averaged.get_ydata()).all()
    with h5py.File(pnp_paths[0], "r") as fh:
        history = fh["history/psnr_1"][()]
    last = [row[np.isfinite(row)][-1] for row in history]
    # images that stopped hold their last value (both seeds have the same history)
    assert averaged.get_ydata()[-1] == pytest.approx(np.mean(last))
    colors = line_colors(fig)
    assert colors == model_colors(["averaged", "dncnn", "tv", "observed"])
    # every image's steps fall, so their mean does, though the images stop at different
    # iterations (a mean over the images still running rose) and one reaches an exact zero
    step = [line for line in step_ax.lines if line.get_gid() == "averaged"][0].get_ydata()
    assert np.isfinite(step).all() and (np.diff(step) <= 0).all(), step


def test_pnp_convergence_without_histories(tmp_path: Path) -> None:
    fig = pnp_convergence_figure([pnp_result(tmp_path, "tv", -1, history=False)], tmp_path / "c")
    assert len(fig.axes) == 1
    assert_no_empty_axes(fig)


def test_pnp_reconstructions_figure(pnp_paths: list[Path], tmp_path: Path) -> None:
    stem = tmp_path / "pnp_reconstructions"
    fig = pnp_reconstructions_figure(pnp_paths, stem)
    assert_saved(stem)
    assert_no_empty_axes(fig)
    columns = 2 + 3  # clean, observed, averaged, dncnn, tv
    assert len(fig.axes) == N_SAVED * columns  # a row per saved example (crops, n_show)
    assert [ax.get_title() for ax in fig.axes[:columns]] == [
        "clean",
        "observed",
        "averaged",
        "dncnn",
        "tv",
    ]
    with h5py.File(pnp_paths[2], "r") as fh:  # dncnn
        clean, recon = fh["images/clean"][0], fh["images/recon"][0]
    mse = np.mean((recon.astype(np.float64) - clean) ** 2)
    assert fig.axes[3].texts[0].get_text() == f"{10 * np.log10(1 / mse):.2f} dB"


def test_save_figure_is_reproducible(tmp_path: Path) -> None:
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "a")
    save_figure(fig, tmp_path / "b")
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_training_figure_leaves_models_without_substeps_out_of_that_panel(tmp_path: Path) -> None:
    """A plain ResNet logs 0 sub-steps: drawn as a zero line it would read as a measurement."""
    blocks = training_log(tmp_path, "classification", "nonexpansive", 2)
    plain = training_log(tmp_path, "classification", "resnet", 0)
    log = pd.read_csv(plain)
    log.loc[log["kind"] == "train", "substeps"] = 0
    log.to_csv(plain, index=False)
    fig = training_figure(
        {"nonexpansive": blocks, "resnet": plain}, tmp_path / "t", "classification"
    )
    labels = [ax.get_ylabel() for ax in fig.axes]
    panel = fig.axes[labels.index("total sub-steps")]
    assert {line.get_gid() for line in panel.lines} == {"nonexpansive"}
    loss = fig.axes[labels.index("training loss")]
    assert {line.get_gid() for line in loss.lines} == {"nonexpansive", "resnet"}


def test_pnp_convergence_labels_diverged_runs_and_keeps_the_others_readable(
    pnp_paths: list[Path], tmp_path: Path
) -> None:
    """A diverging method (PSNR to -100 dB) must not flatten the converging curves: the PSNR
    axis stays near the non-diverged results and the legend says the method diverged."""
    path = pnp_result(tmp_path / "diverging", "dncnn", 0)
    with h5py.File(path, "r+") as fh:
        fh.attrs["diverged_count"] = 3
        fh.attrs["mean_psnr"] = -100.0
        fh["history/psnr_1"][...] = np.linspace(25, -100, fh["history/psnr_1"].shape[1])
    others = [p for p in pnp_paths if "dncnn" not in p.parts]
    fig = pnp_convergence_figure([*others, path], tmp_path / "diverged")
    low, high = fig.axes[0].get_ylim()
    assert 10 < low < 20 and 28 < high < 40, (low, high)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "dncnn (diverged 3/3)" in labels and "averaged" in labels


def test_families_figure(classification_paths: list[Path], root: Path) -> None:
    """Bars per variant (clean, empirical, certified at the smallest radius), certified accuracy
    at the standard radii, time per epoch; colours as in the robustness figure."""
    stem = root / "figures" / "families"
    fig = families_figure(classification_paths, stem)
    assert_saved(stem)
    assert_no_empty_axes(fig)
    bars, curve, timing = fig.axes
    assert "36/255" in bars.get_ylabel() and "(%)" in curve.get_ylabel()
    assert "per epoch (s)" in timing.get_ylabel()
    assert [t.get_text() for t in timing.get_xticklabels()] == ["nonexpansive", "resnet"]
    heights = {p.get_gid(): p.get_height() for p in timing.patches}
    assert heights == {"nonexpansive": pytest.approx(2.5), "resnet": pytest.approx(2.5)}
    resnet = [p.get_height() for p in bars.patches if p.get_gid() == "resnet"]
    assert len(resnet) == 3 and resnet[2] == 0.0  # certified accuracy of the ResNet is 0
    assert line_colors(fig) == model_colors(["nonexpansive", "resnet"])


def test_the_families_figures_legends_do_not_overlap_at_the_papers_18_classifiers(
    tmp_path: Path,
) -> None:
    """The model legend, one column of 18 entries, ran past the figure into the bars' key; its
    columns then took the panels' width (40 % less at a fixed figure width)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def drawn(variants: list[str], name: str) -> tuple[Figure, list[float]]:
        paths = [classification_eval(tmp_path, v, 0) for v in variants]
        fig = families_figure(paths, tmp_path / name)
        FigureCanvasAgg(fig).draw()
        renderer = fig.canvas.get_renderer()  # pyright: ignore[reportAttributeAccessIssue]
        return fig, [ax.get_window_extent(renderer).width / fig.dpi for ax in fig.axes]

    sizes = [f"{f}_{s}" for f in FAMILY_COLORS for s in SIZE_SHADES]
    fig, widths = drawn(["nonexpansive", "resnet", *sizes], "families")
    renderer = fig.canvas.get_renderer()  # pyright: ignore[reportAttributeAccessIssue]
    models, key = fig.legends
    assert len(models.get_texts()) == 18
    boxes = [[t.get_window_extent(renderer) for t in [*legend.get_texts(), legend.get_title()]]
             for legend in (models, key)]  # fmt: skip
    assert not any(a.overlaps(b) for a in boxes[0] for b in boxes[1])
    _, few = drawn(["nonexpansive", "resnet"], "families_two")  # one legend column
    assert min(widths) >= 0.95 * min(few), (widths, few)


def test_families_figure_reads_the_smallest_radius_whatever_the_configs_order(
    classification_paths: list[Path], root: Path, tmp_path: Path
) -> None:
    """The standard radii listed largest first: the same bars and an increasing curve."""
    reordered = []
    for path in classification_paths:
        copy = tmp_path / path.relative_to(root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy)
        with h5py.File(copy, "r+") as fh:
            for name in [k for k in fh if k.startswith("standard_")]:
                values = fh[name][()]
                if values.ndim == 1 and len(values) == len(fh["standard_eps"]):
                    fh[name][...] = values[::-1]
        reordered.append(copy)
    before = families_figure(classification_paths, root / "figures" / "families_sorted")
    after = families_figure(reordered, tmp_path / "families")
    assert after.axes[0].get_ylabel() == before.axes[0].get_ylabel()
    assert "36/255" in after.axes[0].get_ylabel()
    heights = [[p.get_height() for p in fig.axes[0].patches] for fig in (before, after)]
    assert heights[0] == heights[1]
    for line in after.axes[1].get_lines():
        assert (np.diff(line.get_xdata()) > 0).all()


def test_the_training_figures_pick_the_lowest_noise_level_and_seed_as_numbers() -> None:
    paths = [
        Path(f"models/denoising/sigma{s}/euler/seed{k}/train_log.csv")
        for s in ("0.15", "0.05", "0.1")
        for k in (10, 2)
    ]
    assert _one_log_per_variant(paths) == {
        "euler": Path("models/denoising/sigma0.05/euler/seed2/train_log.csv")
    }


def test_seeds_evaluated_on_other_radii_are_an_error_naming_the_file_not_a_mixed_curve(
    tmp_path: Path,
) -> None:
    """Interpolated onto the first file's grid and held flat past its end, a seed of an older
    config plotted 0.225 where the true mean was 0.15."""
    first, second = (classification_eval(tmp_path, "nonexpansive", s) for s in (0, 1))
    with h5py.File(second, "r+") as fh:
        fh["eps"][...] = 0.5 * fh["eps"][()]
    with pytest.raises(ValueError, match=f"{second} and {first} hold different eps radii"):
        robustness_figure([first, second], tmp_path / "robustness")
    with h5py.File(second, "r+") as fh:
        fh["eps"][...] = 2 * fh["eps"][()]
        fh["standard_eps"][...] = fh["standard_eps"][()][::-1]
    with pytest.raises(ValueError, match="hold different standard_eps radii"):
        families_figure([first, second], tmp_path / "families")


def test_a_result_file_without_a_curve_is_an_error_naming_it(tmp_path: Path) -> None:
    path = classification_eval(tmp_path, "resnet", 0)
    with h5py.File(path, "r+") as fh:
        del fh["certified"]
    with pytest.raises(ValueError, match=f"{path}: has no certified"):
        robustness_figure([path], tmp_path / "robustness")


def diverging_pnp(root: Path, at: int) -> Path:
    """A DnCNN PnP run whose first image diverges at its ``at``-th step (0-based column): its
    step norm there is ``+inf`` (what pnp records for a non-finite iterate), NaN after."""
    path = pnp_result(root, "dncnn", 0)
    with h5py.File(path, "r+") as fh:
        fh.attrs["diverged_count"] = 1
        step, psnr = fh["history/step_norm"][()], fh["history/psnr_1"][()]
        step[0, at], step[0, at + 1 :], psnr[0, at + 1 :] = np.inf, np.nan, np.nan
        fh["history/step_norm"][...], fh["history/psnr_1"][...] = step, psnr
    return path


def test_a_diverged_image_leaves_the_mean_step_and_the_curve_stays_drawn(tmp_path: Path) -> None:
    """An infinite step held to every later iteration made the mean and the band's upper edge
    infinite: the method's curve vanished at the first divergence. The diverged image leaves
    the mean from its divergence on, the others (held when they stopped) keep it finite, and a
    marker at the top of the axes shows where it diverged."""
    at = 5
    path = diverging_pnp(tmp_path, at)
    fig = pnp_convergence_figure([path], tmp_path / "diverged")
    step_ax = fig.axes[1]
    mean, *markers = [line for line in step_ax.lines if line.get_gid() == "dncnn"]
    y = np.asarray(mean.get_ydata(), dtype=float)
    assert np.isfinite(y).all(), y
    with h5py.File(path, "r") as fh:
        step = fh["history/step_norm"][()]
    assert y[at - 1] == pytest.approx(np.mean(step[:, at - 1]))  # all three images
    others = pd.DataFrame(step[1:]).ffill(axis=1).to_numpy()  # held when they stopped
    np.testing.assert_allclose(y[at:], others[:, at:].mean(0))  # without the diverged one
    for band in step_ax.collections:
        assert np.isfinite(band.get_paths()[0].vertices).all()
    assert [list(m.get_xdata()) for m in markers] == [[at]]  # its step x_{at+1} - x_at
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "dncnn (diverged 1/3)" in labels
    assert any("diverged" in t for t in labels if not t.startswith("dncnn"))  # the marker's key


def test_an_image_stopped_by_the_blow_up_bound_leaves_the_mean_step_where_it_diverged(
    tmp_path: Path,
) -> None:
    """An iterate past ``pnp.blowup`` times the start's norm is rejected with a finite (huge)
    step: only the result's per-image ``diverged`` says so. It is marked at its last step and
    leaves the mean there, as a non-finite one does."""
    at = 5
    path = pnp_result(tmp_path, "dncnn", 0)
    with h5py.File(path, "r+") as fh:
        fh.attrs["diverged_count"] = 1
        step, psnr = fh["history/step_norm"][()], fh["history/psnr_1"][()]
        step[0, at], step[0, at + 1 :], psnr[0, at + 1 :] = 1e9, np.nan, np.nan
        fh["history/step_norm"][...], fh["history/psnr_1"][...] = step, psnr
        fh["diverged"] = np.array([True, False, False])
    fig = pnp_convergence_figure([path], tmp_path / "blowup")
    mean, *markers = [line for line in fig.axes[1].lines if line.get_gid() == "dncnn"]
    others = pd.DataFrame(step[1:]).ffill(axis=1).to_numpy()
    np.testing.assert_allclose(np.asarray(mean.get_ydata(), float)[at:], others[:, at:].mean(0))
    assert [list(m.get_xdata()) for m in markers] == [[at]]


def test_the_step_panel_plots_each_step_where_its_label_puts_it(
    pnp_paths: list[Path], tmp_path: Path
) -> None:
    """``history/step_norm[:, j]`` is ``||x_{j+1} - x_j||`` (pnp's iteration j + 1 from
    ``x_j``): under the label ``||x_{k+1} - x_k||`` it belongs at k = j; ``history/psnr_1[:, j]``
    is the PSNR of ``x_{j+1}``, at k = j + 1."""
    fig = pnp_convergence_figure(pnp_paths, tmp_path / "indexing")
    psnr_ax, step_ax = fig.axes
    assert step_ax.get_ylabel() == r"$\Vert x_{k+1} - x_k \Vert$"
    step = [line for line in step_ax.lines if line.get_gid() == "averaged"][0]
    psnr = [line for line in psnr_ax.lines if line.get_gid() == "averaged"][0]
    with h5py.File(pnp_paths[0], "r") as fh:
        first_step, first_psnr = fh["history/step_norm"][:, 0], fh["history/psnr_1"][:, 0]
    assert step.get_xdata()[0] == 0 and step.get_ydata()[0] == pytest.approx(first_step.mean())
    assert psnr.get_xdata()[0] == 1 and psnr.get_ydata()[0] == pytest.approx(first_psnr.mean())


def test_the_families_figure_labels_an_off_grid_radius_as_the_tables_do(tmp_path: Path) -> None:
    """A standard radius of 0.1 is 25.5/255: written ``26/255`` the label named a radius that
    was never evaluated; the tables write ``0.1`` (``radius_label``)."""
    paths = [classification_eval(tmp_path, v, 0) for v in ("nonexpansive", "resnet")]
    for path in paths:
        with h5py.File(path, "r+") as fh:
            fh["standard_eps"][...] = [0.1, 0.2, 0.3]
    fig = families_figure(paths, tmp_path / "families")
    assert fig.axes[0].get_ylabel() == f"accuracy at ε = {radius_label(0.1)} (%)"
    assert radius_label(0.1) == "0.1"


def test_the_training_figures_say_which_noise_level_and_seed_they_show(tmp_path: Path) -> None:
    """One log per variant is drawn (the lowest noise level and seed): the legend names it."""
    logs = [
        training_log(tmp_path, f"denoising/sigma{sigma}", "euler", 0, seed=seed)
        for sigma in ("0.15", "0.05")
        for seed in (1, 0)
    ]
    build = outputs.get("figure", "training_denoising").build
    fig = build(logs, tmp_path / "denoising", {"kind": "training_denoising"})
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "euler (σ = 0.05, seed 0)" in labels
    classification = [training_log(tmp_path, "classification", "resnet", 0, seed=s) for s in (2, 1)]
    build = outputs.get("figure", "training_classification").build
    fig = build(classification, tmp_path / "classification", {"kind": "training_classification"})
    assert "resnet (seed 1)" in [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def _caption(name: str, config: dict) -> str:
    """The figure caption ``name`` as the report renders it, on one line."""
    return " ".join(
        _render((CAPTIONS / f"figures/{name}.rst").read_text(), config, "figure", name).split()
    )


@pytest.mark.parametrize("task", ["classification", "denoising"])
def test_a_task_wide_training_budget_is_what_the_training_captions_say(task: str) -> None:
    """With ``train.budget_minutes`` set for a task, the training figures' captions still said
    '40000 steps by default', a count no run trained for."""
    config = load_config(CONFIGS["paper"], SCHEMA)
    config[task]["train"]["budget_minutes"] = 120
    shown = _caption(f"training_{task}", config)
    assert "(a budget of 120 min (steps derived per run) by default;" in shown
    assert f"{config[task]['train']['steps']} steps" not in shown


def test_the_pnp_convergence_caption_says_the_legend_counts_diverged_images(
    tmp_path: Path,
) -> None:
    """The legend's 'diverged k/n' counts test images over all of a method's runs; the caption
    said it counted diverged runs."""
    paths = [pnp_result(tmp_path / f"seed{seed}", "dncnn", seed) for seed in (0, 1)]
    with h5py.File(paths[0], "r+") as fh:
        fh.attrs["diverged_count"] = 2
        images = len(fh["psnr_final"])
    fig = pnp_convergence_figure(paths, tmp_path / "diverged")
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert f"dncnn (diverged 2/{2 * images})" in labels
    shown = _caption("pnp_convergence", load_config(CONFIGS["smoke"], SCHEMA))
    assert "the legend counts a method's diverged test images" in shown
    assert "diverged runs" not in shown
