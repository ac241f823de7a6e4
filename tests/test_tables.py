"""Tables from small fake result files written in the pipeline's schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from fake_results import STANDARD_EPS, write_classification, write_denoising, write_pnp
from test_outputs import CAPTIONS, CONFIGS, SCHEMA, _render

from stablenets.pipeline import outputs
from stablenets.pipeline.config import load_config
from stablenets.pipeline.labels import radius_label
from stablenets.pipeline.reports import make_table, write_summary
from stablenets.pipeline.specs import Jobs
from stablenets.pipeline.tables import (
    COLUMNS,
    RADIUS_SEP,
    classification_table,
    denoising_table,
    display_frame,
    families_table,
    pnp_table,
    table_notes,
    write_table,
)

EPS = np.linspace(0, 1, 9)
# (variant, seed) -> clean accuracy, certified at the standard radii, Lipschitz bound
CLASSIFIERS = {
    ("nonexpansive", 0): (0.60, [0.40, 0.25, 0.10], 1.0),
    ("nonexpansive", 1): (0.64, [0.44, 0.27, 0.12], 1.2),
    ("resnet", 0): (0.80, [0.0, 0.0, 0.0], 250.0),
    ("resnet", 1): (0.82, [0.0, 0.0, 0.0], 300.0),
}
# (variant, seed) -> mean PSNR, std PSNR (over images)
DENOISERS = {
    ("euler_residual", 0): (28.0, 1.0),
    ("euler_residual", 1): (29.0, 2.0),
    ("dncnn", 0): (30.0, 1.5),
    ("tv", -1): (26.0, 1.2),
}


def classification_file(root: Path, variant: str, seed: int) -> Path:
    clean, certified, lip = CLASSIFIERS[variant, seed]
    certified = np.asarray(certified)
    pgd = np.minimum(clean, certified + 0.2)
    empirical = pgd - 0.05 * (pgd > certified)
    attrs = {
        "model": f"{variant}_classifier",
        "clean_accuracy": clean,
        "lipschitz_bound": lip,
        "n_params": 255_000 if variant == "nonexpansive" else 497_000,
        "total_substeps": 15 + seed if variant == "nonexpansive" else 0,  # as the job writes
        "train_time_s": 100.0 + 10 * seed,
        "best_step": 400,
        "auc_certified": 0.1 + 0.01 * seed,
        "auc_pgd": 0.3,
        "auc_empirical": 0.25,
        "audited_certified": 12,
        "n_test": 100,
        "strong_method": "autoattack",
        "train_loss": "cross-entropy" if variant == "resnet" else "margin (offset 0.399, T 0.25)",
        "base_width": 8 if variant == "resnet" else 16,
        "empirical_lipschitz": 0.5 * lip,
        "epoch_time_s": 3.0 + seed,
        "peak_memory_mb": 500.0,
    }
    curve = clean * np.exp(-3 * EPS)
    datasets = {
        "eps": EPS,
        "certified": curve * 0.5,
        "pgd": curve,
        "empirical": curve * 0.9,
        "standard_certified": certified,
        "standard_pgd": pgd,
        "standard_empirical": empirical,
    }
    return write_classification(root, variant, seed, attrs, datasets)


def denoising_file(root: Path, variant: str, seed: int, sigma: float = 0.15) -> Path:
    mean, std = DENOISERS[variant, seed]
    tv = variant == "tv"
    attrs = {
        "averagedness": 0.5 if variant == "euler_residual" else None,
        "mean_psnr": mean,
        "std_psnr": std,
        "mean_psnr_1": mean - 1,
        "std_psnr_1": std,
        "noisy_mean_psnr": 17.0,
        "noisy_mean_psnr_1": 16.5,
        "tv_weight": 0.08 if tv else None,
    }
    psnr = mean + std * np.array([-1.0, 0.0, 1.0])
    crops = np.full((2, 3, 4, 4), 0.5, dtype=np.float32)
    datasets = {
        "psnr": psnr,
        "psnr_1": psnr - 1,
        "noisy_psnr": np.full(3, 17.0),
        "image_index": np.arange(3),
        "crops/clean": crops,
        "crops/noisy": crops,
        "crops/denoised": crops,
        "crops/psnr": psnr[:2],
    }
    return write_denoising(root, variant, seed, sigma, attrs, datasets)


def pnp_file(root: Path, variant: str, seed: int, diverged: int, monotone: int) -> Path:
    tv = variant == "tv"
    attrs = {
        "observed_mean_psnr": 22.0,
        "mean_psnr": 25.0 + seed,
        "std_psnr": 1.0,
        "mean_iterations": 250.0 if tv else 100.0 + 20 * seed,
        "converged_fraction": 0.5 if tv else 1.0 - 0.5 * seed,
        "diverged_count": None if tv else diverged,  # TV records no divergence
        "nonincreasing": None if tv else monotone,  # TV keeps no step history
        "averagedness": 0.6 if variant == "averaged" else None,
        "tv_weight": 0.004 if tv else None,
        "strength": None if tv else 0.1,
    }
    images = np.zeros((1, 3, 4, 4), dtype=np.float32)
    datasets = {
        "psnr_final": np.array([24.0, 26.0]) + seed,
        "psnr_observed": np.array([22.0, 22.0]),
        "iterations": np.array([100, 100]),
        "images/clean": images,
        "images/observed": images,
        "images/recon": images,
    }
    return write_pnp(root, variant, seed, attrs, datasets)


@pytest.fixture()
def classification_paths(tmp_path: Path) -> list[Path]:
    return [classification_file(tmp_path, v, s) for v, s in CLASSIFIERS]


@pytest.fixture()
def denoising_paths(tmp_path: Path) -> list[Path]:
    return [denoising_file(tmp_path, v, s) for v, s in DENOISERS]


@pytest.fixture()
def pnp_paths(tmp_path: Path) -> list[Path]:
    return [
        pnp_file(tmp_path, "averaged", 0, diverged=0, monotone=1),
        pnp_file(tmp_path, "averaged", 1, diverged=0, monotone=1),
        pnp_file(tmp_path, "dncnn", 0, diverged=2, monotone=0),
        pnp_file(tmp_path, "tv", -1, diverged=0, monotone=1),
    ]


def markdown_rows(text: str) -> list[list[str]]:
    """Cells of a pipe table, separator line excluded."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    return [row for row in cells if not set("".join(row)) <= set("-:")]


def test_radius_label() -> None:
    assert [radius_label(e) for e in STANDARD_EPS] == ["36/255", "72/255", "108/255"]
    assert radius_label(0.3) == "0.3"


def test_classification_mean_std_and_seeds(classification_paths: list[Path]) -> None:
    df = classification_table(classification_paths).set_index("variant")
    assert list(df.index) == ["nonexpansive", "resnet"]
    assert (df["seeds"] == 2).all()
    ne = df.loc["nonexpansive"]
    assert ne["clean_accuracy"] == pytest.approx(0.62)
    assert ne["clean_accuracy_std"] == pytest.approx(np.std([0.60, 0.64], ddof=1))
    assert ne["certified@36/255"] == pytest.approx(0.42)
    assert ne["certified@108/255_std"] == pytest.approx(np.std([0.10, 0.12], ddof=1))
    # a bound holds for every seed's model: the largest upper bound, no mean, no spread
    assert ne["lipschitz_bound"] == pytest.approx(1.2) and "lipschitz_bound_std" not in df
    # a model whose blocks take no sub-steps: n/a, not "0.0"
    assert math.isnan(df.loc["resnet", "total_substeps"])
    assert (
        display_frame(df.reset_index()).set_index("variant").loc["resnet", "total sub-steps"]
        == "n/a"
    )
    assert df.loc["resnet", "n_params"] == 497_000
    assert ne["model"] == "nonexpansive_classifier"
    assert ne["train_loss"] == "margin (offset 0.399, T 0.25)"
    assert df.loc["resnet", "train_loss"] == "cross-entropy"
    for metric in ("certified", "empirical", "pgd"):
        assert f"{metric}@72/255" in df.columns
    for column in ("auc_certified", "auc_pgd", "auc_empirical", "total_substeps", "train_time_s"):
        assert column in df.columns and column + "_std" in df.columns


def test_a_bound_over_seeds_is_the_one_every_seeds_model_satisfies_and_the_notes_say_so(
    classification_paths: list[Path],
) -> None:
    """Seeds with bounds 1.0 and 1.2 showed "1.1 ± 0.14", rounded up "so that it holds", and the
    summary quoted "certified Lipschitz bound 1.1": the model of seed 1 does not satisfy it."""
    df = classification_table(classification_paths)
    shown = display_frame(df).set_index("variant")
    assert shown.loc["nonexpansive", "Lipschitz bound"] == "1.2"
    assert "Lipschitz bound: the one that holds for every seed's model" in table_notes(df)


def test_a_mean_over_fewer_seeds_than_the_row_says_how_many(
    classification_paths: list[Path], tmp_path: Path
) -> None:
    """A value missing (NaN) in one seed's result file: the mean is of the others, and the
    table says so in that cell and in the notes, not only in the row's seeds count."""
    import h5py

    with h5py.File(classification_paths[1], "r+") as f:  # nonexpansive, seed 1
        f.attrs["total_substeps"] = math.nan
    df = classification_table(classification_paths).set_index("variant")
    assert df.loc["nonexpansive", "seeds"] == 2
    assert df.loc["nonexpansive", "total_substeps"] == pytest.approx(15.0)
    assert df.loc["nonexpansive", "total_substeps_n_seeds"] == 1
    assert math.isnan(df.loc["resnet", "total_substeps_n_seeds"])
    assert not [c for c in df.columns if c.endswith("_n_seeds") and c != "total_substeps_n_seeds"]
    shown = display_frame(df.reset_index()).set_index("variant")
    assert shown.loc["nonexpansive", "total sub-steps"] == "15.0 (1 of 2 seeds)"
    assert shown.loc["resnet", "total sub-steps"] == "n/a"  # none in any seed: no count
    assert not [c for c in shown.columns if "n_seeds" in c]
    write_table(df.reset_index(), tmp_path / "t", "caption")
    assert "(k of n seeds)" in (tmp_path / "t.md").read_text()


def test_single_seed_has_no_spread(classification_paths: list[Path]) -> None:
    df = classification_table(classification_paths[:1])
    assert df.loc[0, "seeds"] == 1 and math.isnan(df.loc[0, "clean_accuracy_std"])
    shown = display_frame(df)
    assert shown.loc[0, "clean acc. (%)"] == "60.0"


def test_denoising_table(denoising_paths: list[Path]) -> None:
    df = denoising_table(denoising_paths).set_index("variant")
    assert sorted(df.index) == ["dncnn", "euler_residual", "tv"]
    assert (df["sigma"] == 0.15).all()
    er = df.loc["euler_residual"]
    assert er["seeds"] == 2 and df.loc["tv", "seeds"] == 1
    assert er["psnr"] == pytest.approx(28.5)
    assert er["psnr_std"] == pytest.approx(math.sqrt((1.0**2 + 2.0**2) / 2))  # over images
    assert er["psnr_seed_std"] == pytest.approx(np.std([28.0, 29.0], ddof=1))
    assert er["psnr_1"] == pytest.approx(27.5)
    assert df.loc["tv", "tv_weight"] == pytest.approx(0.08)
    assert math.isnan(er["tv_weight"]) and math.isnan(df.loc["tv", "lipschitz_bound"])
    assert er["averagedness"] == pytest.approx(0.5) and math.isnan(df.loc["dncnn", "averagedness"])


def test_pnp_table(pnp_paths: list[Path]) -> None:
    df = pnp_table(pnp_paths).set_index("variant")
    assert list(df["method"]) == ["pnp", "pnp", "tv"]
    av, dn = df.loc["averaged"], df.loc["dncnn"]
    assert av["seeds"] == 2 and av["denoiser_sigma"] == pytest.approx(0.05)
    assert math.isnan(df.loc["tv", "denoiser_sigma"])
    assert av["psnr_1"] == pytest.approx(25.5) and av["psnr_1_seed_std"] > 0
    assert av["iterations"] == pytest.approx(110.0)
    assert av["converged_fraction"] == pytest.approx(0.75)
    assert dn["diverged_count"] == 2 and dn["nonincreasing"] == 0
    assert av["nonincreasing"] == 1 and av["averagedness"] == pytest.approx(0.6)
    assert df.loc["tv", "tv_weight"] == pytest.approx(0.004) and math.isnan(av["tv_weight"])
    assert math.isnan(df.loc["tv", "diverged_count"])  # not checked for TV: not a count of 0
    tv = display_frame(df.reset_index()).set_index("variant").loc["tv"]
    assert tv["mean iterations"] == "250.0" and tv["converged (%)"] == "50.0"
    assert tv["non-increasing steps"] == "n/a"
    shown = display_frame(pnp_table(pnp_paths)).set_index("variant")
    assert shown.loc["tv", "TV weight"] == "0.004" and shown.loc["averaged", "TV weight"] == "n/a"
    assert shown.loc["tv", "denoiser strength β"] == "n/a"
    assert shown.loc["averaged", "denoiser strength β"].startswith("0.1")


def test_flag_false_if_any_seed_fails(tmp_path: Path) -> None:
    paths = [
        pnp_file(tmp_path, "averaged", 0, diverged=1, monotone=1),
        pnp_file(tmp_path, "averaged", 1, diverged=2, monotone=0),
    ]
    row = pnp_table(paths).iloc[0]
    assert row["nonincreasing"] == 0 and row["diverged_count"] == 3
    assert display_frame(pnp_table(paths)).loc[0, "non-increasing steps"] == "no"


def test_write_table_files(classification_paths: list[Path], tmp_path: Path) -> None:
    df = classification_table(classification_paths)
    stem = tmp_path / "tables" / "classification"
    write_table(df, stem, "Robust accuracy on CIFAR_10")
    written = sorted(p.name for p in stem.parent.iterdir())
    assert written == ["classification.csv", "classification.md", "classification.tex"]

    csv = pd.read_csv(stem.with_suffix(".csv"))
    assert list(csv.columns) == list(df.columns)
    assert csv["clean_accuracy"].tolist() == pytest.approx(df["clean_accuracy"].tolist())
    assert csv["clean_accuracy_std"].dtype.kind == "f"

    md = stem.with_suffix(".md").read_text()
    assert md.startswith("Robust accuracy on CIFAR_10")
    header, *rows = markdown_rows(md)
    assert len(rows) == 2 and len(header) == len(rows[0])
    assert "clean acc. (%)" in header and "certified ε=36/255 (%)" in header
    assert "training time (s)" in header and "seeds" in header
    cell = rows[0][header.index("clean acc. (%)")]
    assert cell == f"62.0 ± {100 * np.std([0.60, 0.64], ddof=1):.1f}"

    tex = stem.with_suffix(".tex").read_text()
    assert r"\begin{tabular}" in tex and r"\end{tabular}" in tex
    assert r"CIFAR\_10" in tex and r"$\pm$" in tex and r"\%" in tex
    assert r"\label{tab:classification}" in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0]
    assert body.count(r"\\") == 2  # one LaTeX row per variant


@pytest.mark.parametrize(
    ("scale", "expected"),
    [
        ("smoke", ["synthetic stand-in for CIFAR-10", "photos stand-in for BSDS500"]),
        ("paper", ["CIFAR-10", "BSDS500"]),
    ],
)
def test_a_tables_caption_names_the_data_and_the_scale_it_was_computed_on(scale, expected):
    """A Markdown or LaTeX table pasted elsewhere says whether it came from the real datasets
    or their stand-ins, at which scale."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "config.yaml"] + ([root / "config" / "smoke.yaml"] if scale == "smoke" else [])
    jobs = Jobs(load_config(files, root / "workflow" / "schemas" / "config.schema.yaml"))
    specs = [json.loads(jobs.report_spec("table", name)) for name in ("classification", "pnp")]
    assert [spec["data"] for spec in specs] == expected
    assert {spec["scale"] for spec in specs} == {scale}


def test_the_report_jobs_write_each_tables_declared_caption_title_and_headlines(
    classification_paths: list[Path], denoising_paths: list[Path], pnp_paths: list[Path], tmp_path
) -> None:
    out = tmp_path / "results" / "smoke"
    inputs = {"classification": classification_paths, "denoising": denoising_paths}
    inputs["pnp"] = pnp_paths
    for name, paths in inputs.items():
        spec = {"kind": name, "scale": "smoke", "data": "d"}
        make_table(spec, paths, out / "tables" / f"{name}.csv", log=lambda line: None)
        caption = f"{outputs.get('table', name).caption}; d, smoke scale"
        assert (out / "tables" / f"{name}.md").read_text().startswith(f"{caption}\n\n|")
    root = Path(__file__).resolve().parents[1]
    config = load_config(
        [root / "config.yaml", root / "config" / "smoke.yaml"],
        root / "workflow" / "schemas" / "config.schema.yaml",
    )
    tables = [out / "tables" / f"{name}.md" for name in inputs]
    write_summary({"scale": "smoke", "config": config}, tables, out / "summary.md", lambda _: None)
    text = (out / "summary.md").read_text()
    assert (
        "- nonexpansive: clean 62.0%, certified 42.0% and empirical 57.0% at ε = 36/255, "
        "certified Lipschitz bound 1.2\n" in text
    )
    assert "- denoiser dncnn (σ = 0.15): 30.00 dB peak max(x) (noisy 17.00 dB)\n" in text
    assert (
        "- PnP dncnn: 25.00 dB peak 1 (observed 22.00 dB) at denoiser strength 0.1, 2 diverged, "
        "steps not monotone\n" in text
    )
    assert (
        "- TV deblurring (baseline): 24.00 dB peak 1 (observed 22.00 dB) at weight 0.004, "
        "50.0 % converged\n" in text
    )
    # an unconverged run's PSNR is its capped iterate's: the headline says how many converged
    assert ", 75.0 % converged, 0 diverged, non-increasing steps\n" in text
    sections = [line for line in text.splitlines() if line.startswith("## ")][2:-1]
    assert sections == [f"## {outputs.get('table', name).title}" for name in inputs]


def test_latex_escapes_underscores(denoising_paths: list[Path], tmp_path: Path) -> None:
    stem = tmp_path / "denoising"
    write_table(denoising_table(denoising_paths), stem, "Denoising PSNR")
    tex = stem.with_suffix(".tex").read_text()
    assert r"euler\_residual" in tex
    assert "PSNR (dB)" in tex and r"$\sigma$" in tex
    body = tex.split(r"\begin{tabular}")[1]
    assert all(body[i - 1] == "\\" for i, ch in enumerate(body) if ch == "_")
    md = stem.with_suffix(".md").read_text()
    header, *rows = markdown_rows(md)
    assert "PSNR (dB)" in header and "PSNR seed std (dB)" in header and len(rows) == 3
    tv = next(r for r in rows if "tv" in r)
    assert tv[header.index("Lipschitz bound")] == "n/a"


def test_empty_input_rejected() -> None:
    with pytest.raises(ValueError, match="no result files"):
        classification_table([])


def test_families_table_groups_by_family_with_bounds_and_costs(tmp_path: Path) -> None:
    paths = [classification_file(tmp_path, v, s) for v, s in CLASSIFIERS]
    df = families_table(paths)
    assert list(df["family"]) == ["nonexpansive", "resnet"]
    row = df.set_index("variant").loc["nonexpansive"]
    assert row["seeds"] == 2 and row["base_width"] == 16
    assert row["clean_accuracy"] == pytest.approx(0.62)
    assert row["certified@36/255"] == pytest.approx(0.42)
    assert row["empirical_lipschitz"] == pytest.approx(0.5)  # the smallest lower bound
    assert row["lipschitz_bound"] == pytest.approx(1.2)  # the largest upper bound
    assert row["epoch_time_s"] == pytest.approx(3.5) and row["peak_memory_mb"] == 500.0
    assert list(df["train_loss"]) == ["margin (offset 0.399, T 0.25)", "cross-entropy"]
    assert not any(c.startswith("pgd") or c.startswith("auc") for c in df.columns)
    shown = display_frame(df)
    assert "time per epoch (s)" in shown.columns and "peak memory (MiB)" in shown.columns
    assert shown.set_index("variant").loc["nonexpansive", "clean acc. (%)"] == "62.0 ± 2.8"


def test_nearby_standard_radii_keep_their_own_columns_and_a_shared_label_is_refused(
    tmp_path: Path,
) -> None:
    """Labelled to 3 digits, 0.5 and 0.5004 shared one column and one value was lost."""
    path = classification_file(tmp_path, "nonexpansive", 0)
    with h5py.File(path, "r+") as fh:
        del fh["standard_eps"]
        fh["standard_eps"] = np.array([0.5, 0.5004, 0.6])
    row = classification_table([path]).loc[0]
    assert row["certified@0.5"] == pytest.approx(0.40)
    assert row["certified@0.5004"] == pytest.approx(0.25)
    with h5py.File(path, "r+") as fh:
        fh["standard_eps"][...] = np.array([0.5, 0.5 + 1e-9, 0.6])
    with pytest.raises(ValueError, match=f"{path}: two standard radii share a label"):
        classification_table([path])


@pytest.mark.parametrize(
    ("table", "make", "remove"),
    [
        (classification_table, classification_file, "clean_accuracy"),
        (classification_table, classification_file, "standard_certified"),
        (classification_table, classification_file, "lipschitz_bound"),
        (classification_table, classification_file, "auc_certified"),
        (denoising_table, denoising_file, "mean_psnr"),
        (denoising_table, denoising_file, "empirical_lipschitz"),
        (pnp_table, lambda root, v, s: pnp_file(root, v, s, 0, 1), "mean_psnr"),
        (pnp_table, lambda root, v, s: pnp_file(root, v, s, 0, 1), "strength"),
    ],
)
def test_a_result_file_without_a_metric_its_table_shows_is_an_error_naming_it(
    tmp_path: Path, table, make, remove: str
) -> None:
    """Read as NaN, the metric's column was dropped or showed 'n/a: not applicable'."""
    path = make(tmp_path, "dncnn" if table is not classification_table else "resnet", 0)
    with h5py.File(path, "r+") as fh:
        del (fh.attrs if remove in fh.attrs else fh)[remove]
    with pytest.raises(ValueError, match=f"{path}: has no {remove}; not a complete result"):
        table([path])


def test_a_standard_curve_of_another_length_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = classification_file(tmp_path, "resnet", 0)
    with h5py.File(path, "r+") as fh:
        del fh["standard_pgd"]
        fh["standard_pgd"] = np.zeros(2)
    with pytest.raises(ValueError, match=f"{path}: standard_pgd has 2 values for 3"):
        classification_table([path])


def test_the_summary_headline_reads_the_smallest_standard_radius_whatever_the_config_says(
    tmp_path: Path,
) -> None:
    """It read 36/255 by name, and a config without that radius failed the summary job."""
    path = classification_file(tmp_path, "nonexpansive", 0)
    with h5py.File(path, "r+") as fh:
        fh["standard_eps"][...] = np.array([0.6, 0.5, 0.7])
    row = classification_table([path]).loc[0]
    line = outputs.get("table", "classification").headline(row.to_dict())
    assert "certified 25.0% and empirical" in line and "at ε = 0.5," in line


def test_one_seed_tables_say_nothing_of_a_spread_over_seeds(
    classification_paths: list[Path], pnp_paths: list[Path]
) -> None:
    one = table_notes(classification_table(classification_paths[:1]))
    assert "over seeds" not in one and "n/a: not applicable to that model." in one
    several = table_notes(classification_table(classification_paths))
    assert "All ±: standard deviation over seeds." in several
    assert "or the seed std of a single seed" in several
    shown = display_frame(pnp_table(pnp_paths))
    assert "diverged images (all seeds)" in shown.columns


def _pnp(root: Path, variant: str, seed: int) -> Path:
    return pnp_file(root, variant, seed, diverged=0, monotone=1)


@pytest.mark.parametrize(
    ("table", "make", "variant", "key"),
    [
        (classification_table, classification_file, "resnet", "clean_accuracy"),
        (classification_table, classification_file, "resnet", "lipschitz_bound"),
        (classification_table, classification_file, "resnet", "standard_empirical"),
        (families_table, classification_file, "resnet", "empirical_lipschitz"),
        (denoising_table, denoising_file, "dncnn", "mean_psnr"),
        (denoising_table, denoising_file, "dncnn", "lipschitz_bound"),
        (denoising_table, denoising_file, "tv", "tv_weight"),
        (pnp_table, _pnp, "dncnn", "mean_psnr"),
        (pnp_table, _pnp, "dncnn", "strength"),
        (pnp_table, _pnp, "tv", "tv_weight"),
    ],
)
def test_a_nan_metric_its_model_has_is_an_error_naming_the_file_and_the_key(
    tmp_path: Path, table, make, variant: str, key: str
) -> None:
    """Read as NaN, a failed job's PSNR, accuracy or bound showed as 'n/a: not applicable to that
    model', and a column NaN in every row was dropped from the table."""
    path = make(tmp_path, variant, 0 if variant != "tv" else -1)
    with h5py.File(path, "r+") as fh:
        if key in fh.attrs:
            fh.attrs[key] = math.nan
        else:
            fh[key][0] = math.nan
    with pytest.raises(ValueError, match=f"^{path}: {key} is .*nan.*, not a finite number$"):
        table([path])


def test_seeds_that_chose_different_settings_list_them_never_their_mean(tmp_path: Path) -> None:
    """PnP's strength and TV's weight are chosen per run among the config's candidates: the
    table averaged them (β = 0.55 ± 0.64 from 1 and 0.1, never run) and the summary quoted it."""
    paths = [_pnp(tmp_path, "averaged", seed) for seed in (0, 1, 2)]
    tv = [_pnp(tmp_path / f"tv{seed}", "tv", seed) for seed in (0, 1)]
    for path, value, key in [
        (paths[0], 1.0, "strength"),
        (paths[1], 0.1, "strength"),
        (paths[2], 0.1, "strength"),
        (tv[1], 0.001, "tv_weight"),
    ]:
        with h5py.File(path, "r+") as fh:
            fh.attrs[key] = value
    df = pnp_table(paths + tv).set_index("variant")
    assert df.loc["averaged", "strength"] == "1 (seed 0), 0.1 (seeds 1, 2)"
    assert df.loc["tv", "tv_weight"] == "0.004 (seed 0), 0.001 (seed 1)"
    assert pnp_table(paths[1:]).loc[0, "strength"] == pytest.approx(0.1)  # agreeing: a number
    stem = tmp_path / "tables" / "pnp"
    write_table(pnp_table(paths + tv), stem, "PnP")
    headline = outputs.get("table", "pnp").headline
    assert headline is not None
    lines = [headline(row) for row in pd.read_csv(stem.with_suffix(".csv")).to_dict("records")]
    assert "at denoiser strength 1 (seed 0), 0.1 (seeds 1, 2)," in lines[0]
    assert lines[1].endswith("at weight 0.004 (seed 0), 0.001 (seed 1), 50.0 % converged")


def test_every_column_label_is_ascii_in_latex(tmp_path: Path) -> None:
    """β (the PnP strength's label) went into the .tex file unescaped: a LaTeX table without
    unicode support fails to compile."""
    names = [*COLUMNS, f"certified{RADIUS_SEP}36/255"]
    df = pd.DataFrame({name: [1.0] for name in names})
    stem = tmp_path / "all"
    write_table(df, stem, "every column")
    tex = stem.with_suffix(".tex").read_text()
    header = tex.split(r"\toprule")[1].split(r"\midrule")[0]
    assert all(COLUMNS[name].label.split()[0] in header for name in ("strength", "averagedness"))
    assert tex.isascii(), sorted({ch for ch in tex if not ch.isascii()})


def test_bounds_are_rounded_the_way_they_hold(tmp_path: Path) -> None:
    """To 3 significant digits an averagedness of 0.9996 read '1' (no averagedness at all), and
    to 4 a Lipschitz bound of 1.00004 read '1', hiding that it exceeds 1."""
    path = denoising_file(tmp_path, "euler_residual", 0)
    with h5py.File(path, "r+") as fh:
        fh.attrs["averagedness"] = 0.9996
        fh.attrs["lipschitz_bound"] = 1.00004
        fh.attrs["empirical_lipschitz"] = 0.99996
    shown = display_frame(denoising_table([path])).loc[0]
    assert shown["averagedness α"] == "0.9996"
    assert shown["Lipschitz bound"] == "1.001"
    assert shown["empirical Lipschitz (lower bound)"] == "0.9999"
    path = classification_file(tmp_path, "nonexpansive", 0)
    with h5py.File(path, "r+") as fh:
        fh.attrs["lipschitz_bound"] = 1.00004
    row = classification_table([path]).loc[0].to_dict()
    headline = outputs.get("table", "classification").headline
    assert headline is not None and headline(row).endswith("certified Lipschitz bound 1.001")


TABLE_CAPTIONS = ("tables/classification.rst", "tables/denoising.rst")


def test_a_task_wide_training_budget_is_what_the_summary_and_the_captions_say(
    tmp_path: Path,
) -> None:
    """With ``train.budget_minutes`` set for a task, the summary and the table captions still
    said '40000 steps', a count no run trained for."""
    config = load_config(CONFIGS["paper"], SCHEMA)
    for task in ("classification", "denoising"):
        config[task]["train"]["budget_minutes"] = 120
    budget = "a budget of 120 min (steps derived per run)"
    out = tmp_path / "summary.md"
    write_summary({"scale": "paper", "config": config}, [], out, lambda _: None)
    run = out.read_text().split("## Headline numbers")[0]
    assert run.count(budget) == 2 and " steps" not in run
    for caption in TABLE_CAPTIONS:
        kind, name = caption.removesuffix(".rst").split("/")
        shown = " ".join(_render((CAPTIONS / caption).read_text(), config, kind[:-1], name).split())
        assert f"Training by default: {budget}, batch" in shown
        assert f"{config['classification']['train']['steps']} steps" not in shown


def test_a_fraction_below_one_never_shows_as_100_percent() -> None:
    """With one decimal, 1 unconverged image of 2,000 (10 seeds of 200) showed "100.0"."""
    df = pd.DataFrame(
        {
            "variant": ["x", "y"],
            "converged_fraction": [0.9995, 1.0],
            "clean_accuracy": [0.99996, 0.5],
        }
    )
    shown = display_frame(df).set_index("variant")
    assert shown.loc["x"].tolist() == ["99.9", "99.9"]
    assert shown.loc["y"].tolist() == ["100.0", "50.0"]
