"""The Snakemake pipeline end to end: the smoke DAG once (session fixture), then checks on its
outputs; the data rules on archives in the real formats; parse-time config errors; lint."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_data import make_bsds_archive, make_cifar_archive, md5_of
from workflow_helpers import BIN, FIGURES, ROOT, SMOKE_PROFILE, TABLES, copy_workflow, snakemake

from stablenets.pipeline.runtime import read_results


@pytest.mark.slow
def test_under_xdist_the_smoke_readers_share_one_worker_so_the_pipeline_runs_once(
    request, smoke_run
):
    """``make test`` runs two workers with ``--dist loadgroup``; the readers of ``smoke_run``
    carry one ``xdist_group`` (conftest.py), which xdist appends to their node ids. Without it
    each worker ran the smoke pipeline (pytest 9.2 dropped the suffix: pytest-xdist#1386)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        pytest.skip("not under pytest-xdist: one process runs the pipeline once anyway")
    assert request.node.nodeid.endswith("@smoke"), request.node.nodeid


def test_smoke_produces_every_table_and_figure(smoke_run):
    results = smoke_run / "results" / "smoke"
    for table in TABLES:
        for ext in ("csv", "md", "tex"):
            assert (results / "tables" / f"{table}.{ext}").stat().st_size > 0
    for figure in FIGURES:
        for ext in ("pdf", "png"):
            assert (results / "figures" / f"{figure}.{ext}").stat().st_size > 1000
    summary = (results / "summary.md").read_text()
    assert "## Headline numbers" in summary and "Plug-and-Play deblurring" in summary


@pytest.mark.slow
def test_smoke_rerun_has_nothing_to_do_and_moving_the_download_cache_reruns_only_the_summary(
    smoke_run, tmp_path
):
    again = snakemake(smoke_run, *SMOKE_PROFILE, "-n")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Nothing to be done" in again.stdout + again.stderr
    # where archives are cached changes no data: no data, training or evaluation job reruns,
    # only the summary, which records the whole config
    moved = tmp_path / "moved.yaml"
    moved.write_text(yaml.safe_dump({"data": {"cache_dir": str(tmp_path / "elsewhere")}}))
    configs = ("--configfile", "config.yaml", "config/smoke.yaml", str(moved))
    again = snakemake(smoke_run, *SMOKE_PROFILE, *configs, "-n")
    assert again.returncode == 0, again.stderr[-2000:]
    stats = again.stdout.split("Job stats:", 1)[1].split("Reasons:", 1)[0]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", stats, re.M))
    assert jobs == {"summary": "1", "all": "1", "total": "2"}, again.stdout[-3000:]


@pytest.mark.slow
def test_smoke_classifiers_beat_chance_and_satisfy_the_invariant(smoke_run):
    table = pd.read_csv(smoke_run / "results/smoke/tables/classification.csv")
    families = {"cpl_XS", "sll_XS", "aol_XS", "orthogonal_XS"}
    assert set(table["variant"]) == {"nonexpansive", "resnet", *families}
    assert (table["clean_accuracy"] > 0.2).all(), table["clean_accuracy"]
    compared = pd.read_csv(smoke_run / "results/smoke/tables/families.csv")
    assert set(compared["variant"]) == set(table["variant"])
    assert (compared["empirical_lipschitz"] <= compared["lipschitz_bound"]).all()
    for path in (smoke_run / "results/smoke/eval/classification").rglob("*.h5"):
        with h5py.File(path) as fh:
            cert, emp = fh["certified"][()], fh["empirical"][()]
            assert (cert <= emp + 1e-12).all() and (emp <= fh.attrs["clean_accuracy"]).all()
            std_cert, std_emp = fh["standard_certified"][()], fh["standard_empirical"][()]
            assert (std_cert <= std_emp + 1e-12).all(), path
            # the strongest attack at the standard radii is AutoAttack (APGD-CE at smoke cost)
            assert fh.attrs["strong_method"] == "autoattack apgd-ce (10 iterations)", path
            # what it was trained with: the families the margin loss, the others cross-entropy
            margin = path.parent.name.split("_")[0] in {"cpl", "sll", "aol", "orthogonal"}
            assert fh.attrs["train_loss"].startswith("margin (offset ") == margin, path
            # per point: certified radius (lower bound) <= break radius (upper bound)
            cert_r, break_r = fh["certified_radius"][()], fh["break_radius"][()]
            assert (cert_r <= break_r).all() and (break_r <= fh["pgd_break_radius"][()]).all()
            assert fh.attrs["audited_certified"] == fh["standard_audited"][()].sum(), path
            for key in ("config_hash", "seed", "versions", "git_commit"):
                assert key in fh.attrs


@pytest.mark.slow
def test_smoke_denoisers_improve_psnr_and_respect_their_bounds(smoke_run):
    for path in (smoke_run / "results/smoke/eval/denoising").rglob("*.h5"):
        with h5py.File(path) as fh:
            a = fh.attrs
            assert a["mean_psnr"] > a["noisy_mean_psnr"], path
            if a["variant"] != "tv":
                assert a["empirical_lipschitz"] <= a["lipschitz_bound"], path
            if a["variant"] in {"euler", "heun", "averaged"}:
                assert a["lipschitz_bound"] <= 1.0 + 1e-6, path
            if a["variant"] == "tv":  # the best weight on 4 of the 8 validation images (smoke)
                scores = json.loads(a["tv_validation_scores"])
                weights = json.loads(a["config"])["tv"]["weights"]
                assert a["tv_validation_images"] == 4 and len(scores) == len(weights), path
                assert a["tv_weight"] == weights[int(np.argmax(scores))], path


@pytest.mark.slow
def test_a_denoiser_evaluation_logs_its_image_groups_and_lipschitz_search_with_etas(smoke_run):
    log = (smoke_run / "logs/smoke/evaluate_denoiser/sigma0.05/averaged/seed0.log").read_text()
    groups = re.findall(
        r"^denoiser: images (\d+)-(\d+) of (\d+) done, elapsed \d+ s, ETA \d+ s$", log, re.M
    )
    assert len(groups) >= 2 and groups[-1][1] == groups[-1][2], log  # smoke: groups of 4
    search = re.findall(
        r"^Lipschitz search step (\d+)/(\d+): largest ratio \S+, elapsed \d+ s, ETA \d+ s$",
        log,
        re.M,
    )
    assert len(search) >= 2 and search[-1][0] == search[-1][1], log


@pytest.mark.slow
def test_smoke_pnp_with_the_averaged_denoiser_converges_monotonically(smoke_run):
    path = smoke_run / "results/smoke/pnp/sigma0.05/averaged/seed0.h5"
    with h5py.File(path) as fh:
        assert fh.attrs["nonincreasing"] == 1
        assert fh.attrs["averagedness"] < 1
        assert fh.attrs["mean_psnr"] > fh.attrs["observed_mean_psnr"]
    # its denoiser strength is the best of the candidates that converged on the 4 validation
    # images (of all if none did)
    pnp, sets = read_results(path)
    assert sets["diverged"].dtype == bool and sets["diverged"].sum() == pnp["diverged_count"]
    keys = ("strength_validation_scores", "strengths", "strength_validation_converged")
    scores, strengths, converged = (json.loads(pnp[k]) for k in keys)
    assert pnp["validation_images"] == 4 and len(scores) == len(strengths) == len(converged) == 2
    allowed = [i for i, c in enumerate(converged) if c == 1.0] or [0, 1]
    assert pnp["strength"] == strengths[max(allowed, key=scores.__getitem__)]
    tv = read_results(smoke_run / "results/smoke/pnp/tv.h5")
    # TV keeps no step history: no monotonicity is claimed; it records the iterations it ran
    assert math.isnan(tv[0]["nonincreasing"])
    ran = tv[1]["iterations"]
    assert 1 <= ran[0] <= 100 and (ran == tv[0]["mean_iterations"]).all()
    # its weight is the best of the configured candidates on 4 validation images (smoke.yaml)
    scores, weights = (json.loads(tv[0][k]) for k in ("tv_validation_scores", "tv_weights"))
    assert tv[0]["tv_validation_images"] == 4 and len(scores) == len(weights) == 6
    assert tv[0]["tv_weight"] == weights[int(np.argmax(scores))]
    table = (smoke_run / "results/smoke/tables/pnp.md").read_text()
    assert "PSNR peak 1 (dB)" in table and "| tv " in table and "denoiser strength β" in table


def archive_overlay(work: Path, cache: Path, cifar: Path, bsds: Path, cifar_md5: str) -> Path:
    """A config overlay that downloads the two (test-built) archives from file:// URLs."""
    data = {
        "scale": "archives",
        "data": {
            "cache_dir": str(cache),
            "cifar10": {"source": "download", "urls": [cifar.as_uri()], "md5": cifar_md5},
            "bsds500": {
                "source": "download",
                "urls": [bsds.as_uri()],
                "md5": md5_of(bsds),
                "size": [10, 14],
            },
        },
    }
    path = work / "config" / "archives.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_data_rules_download_verify_and_convert_real_format_archives(tmp_path):
    """Then a mirror added to the URLs reruns nothing: the data would be the same, and every
    evaluation's saved progress is tied to the data file."""
    work = copy_workflow(tmp_path / "wf")
    cifar, _, _ = make_cifar_archive(tmp_path / "srv")
    bsds, _ = make_bsds_archive(tmp_path / "srv")
    extra = archive_overlay(work, tmp_path / "cache", cifar, bsds, md5_of(cifar))
    targets = ["results/archives/data/cifar10.h5", "results/archives/data/bsds500.h5"]
    run = snakemake(work, *targets, "--cores", "2", "--configfile", "config.yaml", str(extra))
    assert run.returncode == 0, run.stderr[-3000:]
    with h5py.File(work / targets[0]) as fh:
        assert fh["train/images"].shape[1:] == (3, 32, 32)
        assert fh["train/images"].shape[0] + fh["val/images"].shape[0] == 30
        assert md5_of(cifar) in str(dict(fh.attrs))
    with h5py.File(work / targets[1]) as fh:
        assert fh["test/images"].shape[1:] == (3, 10, 14)
    settings = yaml.safe_load(extra.read_text())
    settings["data"]["bsds500"]["urls"].append("https://mirror.example.org/BSR_bsds500.tgz")
    extra.write_text(yaml.safe_dump(settings))
    again = snakemake(
        work, *targets, "-n", "--cores", "2", "--configfile", "config.yaml", str(extra)
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]


def test_paper_scale_dry_run_lists_every_job(tmp_path):
    """Also of a noise level whose path label has an exponent (``5e-05``: ``sigma_label``)."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["denoising"]["noise_levels"].append(5.0e-5)
    overlay = tmp_path / "tiny_sigma.yaml"
    overlay.write_text(
        yaml.safe_dump({"denoising": {"noise_levels": cfg["denoising"]["noise_levels"]}})
    )
    run = snakemake(
        ROOT, "-n", "--quiet", "rules", "--configfile", "config.yaml", str(overlay), timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout + run.stderr
    n_cls = len(cfg["classification"]["variants"]) * len(cfg["seeds"])
    n_den = (
        len(cfg["denoising"]["variants"])
        * len(cfg["seeds"])
        * len(cfg["denoising"]["noise_levels"])
    )
    expected = {
        "prepare_data": 2,
        "train_classifier": n_cls,
        "evaluate_classifier": n_cls,
        "train_denoiser": n_den,
        "evaluate_denoiser": n_den,
        "pnp_deblur": len(cfg["pnp"]["denoisers"]) * len(cfg["seeds"]),
        "tv_deblur": 1,
        "table": len(TABLES),
        "figure": len(FIGURES),
        "summary": 1,
    }
    for rule, count in expected.items():
        assert re.search(rf"^{rule}\s+{count}$", text, re.M), (rule, count, text[-2000:])


def test_a_target_of_a_variant_the_config_lacks_is_snakemakes_no_rule_line_not_a_traceback():
    """Its spec's ``KeyError`` surfaced as a traceback from a params function."""
    for target in ("eval/classification/foo/seed0.h5", "pnp/sigma0.15/resnet/seed0.h5"):
        run = snakemake(ROOT, "-n", "--configfile", "config.yaml", "--", f"results/paper/{target}")
        assert run.returncode != 0 and "Traceback" not in run.stderr + run.stdout
        assert f"No rule to produce results/paper/{target}" in run.stderr + run.stdout


def test_workflow_is_lint_clean():
    fmt = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "workflow/Snakefile", "workflow/rules"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = snakemake(ROOT, "--lint", timeout=300)
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]


@pytest.mark.slow
def test_an_independent_attack_never_flips_a_certified_point(smoke_run):
    """A stronger PGD (more steps, restarts) than the evaluation's, at every standard radius, on
    the smoke classifiers that certify points (AOL and CPL; the paper's two certify none at
    smoke scale)."""
    from stablenets import load_model
    from stablenets.data.format import read_split
    from stablenets.evaluation.robustness import certified_radius, margins, pgd_l2

    results = smoke_run / "results/smoke"
    x, y = read_split(results / "data/cifar10.h5", "test")
    x, y = x[:50], y[:50]
    certified = 0
    for variant in ("aol_XS", "cpl_XS"):
        model = load_model(results / f"models/classification/{variant}/seed0/model.pt")
        margin, correct = margins(model, x, y, 50)
        radius = certified_radius(margin, correct, model.lipschitz_bound())
        for eps in (36 / 255, 72 / 255, 108 / 255):
            adv = pgd_l2(model, x, y, eps, steps=40, rel_step=0.1, restarts=2, seed=11)
            with torch.no_grad():
                flipped = model(adv).argmax(1) != y
            assert not (flipped & (radius > eps)).any(), (variant, eps)
            certified += int((radius > eps).sum())
    assert certified > 0  # the check above is not vacuous


@pytest.mark.slow
def test_report_contains_every_figure_and_table_with_its_caption(smoke_run, tmp_path):
    report = tmp_path / "report.html"  # not in the shared results tree: it has no sidecar
    built = snakemake(smoke_run, *SMOKE_PROFILE, "--report", str(report))
    assert built.returncode == 0, built.stderr[-3000:]
    html = report.read_text()
    for name in [f"{t}.csv" for t in TABLES] + [f"{f}.png" for f in FIGURES] + ["summary.md"]:
        assert f'"{name}"' in html, name
    # captions are rendered from the config (no Jinja left over), one per table and figure
    assert "{{" not in html and "{%" not in html
    for phrase in (
        "Classification robustness",
        "Gaussian denoising",
        "Plug-and-Play deblurring",
        "Robust accuracy against the L2 radius",
        "Training diagnostics of the classifiers",
        "Training diagnostics of the denoisers",
        "Denoising examples",
        "PnP convergence",
        "PnP reconstructions",
    ):
        assert phrase in html, phrase
