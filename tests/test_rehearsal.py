"""The rehearsal scale (issue 21): training that stops after the first steps of the paper's own
schedule, the overlay at the paper's sizes, the cost projection on fake jobs, and a tiny
`make rehearsal` through Snakemake to cost.csv."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_bench import CAPTURE_S, fake_cuda_graphs
from workflow_helpers import BIN, ROOT, copy_workflow, local_env

from stablenets import data
from stablenets.bench.cost import (
    RULES,
    SUBSTEP_BOUND,
    UNRECORDED_RUN,
    BenchRow,
    Job,
    Measured,
    Paper,
    _steady_time,
    _unlike_the_paper,
    cost_rows,
    dag_jobs,
    measure,
    project,
    projected_by_rule,
    write_cost,
)
from stablenets.bench.rows import substep_theta
from stablenets.data.shapes import DATASET_NAMES
from stablenets.nn.models import build_model, read_checkpoint, save_model
from stablenets.pipeline import jobs as pipeline_jobs
from stablenets.pipeline.config import overlay, validate_config
from stablenets.pipeline.runtime import write_results
from stablenets.train import loop
from stablenets.train.augment import AugmentConfig
from stablenets.train.budget import budget_steps
from stablenets.train.cuda_graphs import StepGraphs
from stablenets.train.tasks import ClassificationTask

SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
PAPER = validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()), SCHEMA)


def rehearsal_config() -> dict:
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    over = yaml.safe_load((ROOT / "config" / "rehearsal.yaml").read_text())
    return validate_config(overlay(base, over), SCHEMA)


# --------------------------------------------------------------------------------------------
# stop_after


# --------------------------------------------------------------------------------------------
# the overlay


def test_the_rehearsal_overlay_is_valid_and_keeps_the_paper_sizes_models_and_schedules():
    cfg = rehearsal_config()
    synthetic, photos = cfg["data"]["cifar10"]["synthetic"], cfg["data"]["bsds500"]["photos"]
    assert (synthetic["n_train"], synthetic["n_val"], synthetic["n_test"]) == (
        47_500,
        2_500,
        10_000,
    )
    assert synthetic["image_size"] == 32 and photos["size"] == PAPER["data"]["bsds500"]["size"]
    assert (photos["n_train"], photos["n_val"], photos["n_test"]) == (200, 100, 200)
    for task in ("classification", "denoising"):
        train, paper_train = cfg[task]["train"], PAPER[task]["train"]
        assert 0 < train.pop("stop_after") < train["steps"]
        assert train == paper_train  # the paper's schedule, batch size and lr
        for name, variant in cfg[task]["variants"].items():
            train = variant.get("train", {})
            assert 0 < train.pop("stop_after", 1) < paper_train["steps"]  # (the ResNet's own)
            assert {**variant, "train": train} == {"train": {}, **PAPER[task]["variants"][name]}
    rules = {job.rule for job in dag_jobs(cfg)}
    assert rules == set(RULES)  # every kind of job of the paper DAG
    assert _unlike_the_paper(cfg, PAPER) == []  # what cost.md checks


# --------------------------------------------------------------------------------------------
# the projection, on fake measurements


def paper(bench: dict | None = None) -> Paper:
    return Paper(PAPER, bench or {})


def fake_eval(evaluate: dict, parts: dict, wall: float, variant: str = "nonexpansive") -> Measured:
    spec = {"evaluate": {**PAPER["classification"]["evaluate"], **evaluate}}
    job = Job("evaluate_classifier", variant, seed=0)
    attack = sum(s for s, _ in parts.values())
    return Measured(job, wall, 0.0, "test point", 500, attack, spec, parts, {"clean_accuracy": 0.5})


def test_training_projects_fixed_seconds_plus_steps_validations_and_checkpoints_at_their_rates():
    """The paper run validates every 371 steps and checkpoints every 500 (both at the last step
    too): 108 validations and 80 writes in 40,000 steps, where the rehearsal did 3 and 2."""
    job = Job("train_classifier", "nonexpansive", seed=0)
    parts = {"step": (20.0, 2000), "validation": (3.0, 3), "checkpoint": (1.0, 2)}
    measured = Measured(job, 100.0, 0.0, "step", 2000, 24.0, {}, parts)  # 76 s fixed
    units, seconds, basis, complete = project(job, measured, paper())
    assert (units, basis, complete) == (40_000, f"{job.label()}; {SUBSTEP_BOUND}", True)
    assert seconds == pytest.approx(76.0 + 0.01 * 40_000 + 1.0 * 108 + 0.5 * 80)


def test_the_first_step_of_each_process_is_retimed_at_the_others_rate_so_start_up_stays_fixed():
    # 50 steps of 10 ms, the first of each of two processes 2 s (CUDA context, cuDNN): 4.48 s
    extra = {"train_time_s": 4.0 + 48 * 0.01, "startup_s": 4.0, "startup_steps": 2}
    assert _steady_time(extra, 50) == pytest.approx(50 * 0.01)  # what 50 steady steps take
    assert _steady_time({"train_time_s": 2.49}, 50) == 2.49  # unrecorded: as is
    assert _steady_time({**extra, "startup_steps": 50}, 50) == extra["train_time_s"]


def test_the_first_graph_capture_is_start_up_not_a_projected_step(tmp_path, monkeypatch):
    """``StepGraphs`` captures a key on its second sighting (step 2; the power iteration on its
    second call too), after the first step's start-up: the loop counts the captures' seconds as
    start-up, which the projection keeps fixed, not as steps' time scaled to 40,000. The real
    loop and ``StepGraphs`` on the CPU, CUDA stubbed, each capture taking 1,000 s of the clock."""
    ahead = fake_cuda_graphs(monkeypatch)
    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", base_width=4, stages=2, blocks_per_stage=1,
                        input_size=8)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    task = ClassificationTask(x, y, x[:8], y[:8], AugmentConfig(), eval_batch=8)
    cfg = loop.TrainConfig(steps=6, batch_size=4, lr_max=0.05, val_every=6, cuda_graphs=True)
    made: list[StepGraphs] = []

    def step_graphs(model, task, cfg, device, log) -> StepGraphs:
        forward_loss = functools.partial(loop._forward_loss, model, task, cfg, device)
        made.append(StepGraphs(model, forward_loss, cfg.cuda_graph_cache, log))
        return made[-1]

    monkeypatch.setattr(loop, "step_graphs", step_graphs)
    _, state = loop.train(model, task, cfg, tmp_path, "h", lambda _: None)
    assert made[0].captures >= 1 and ahead[0] >= 2 * CAPTURE_S  # the step's and the norms'
    steady = _steady_time({"train_time_s": state.elapsed, **state.time_split()}, 6)
    assert steady < 60, steady  # 6 small steps' seconds, not 2,000 x 6 / 5
    assert state.startup_s >= ahead[0] and state.startup_steps == 1  # step 1 and the captures
    assert made[0].capture_s >= ahead[0]


def test_evaluation_with_the_paper_attacks_projects_fixed_plus_attack_time_times_n_over_n():
    """(wall - fixed) * 10,000 / 500 for every pass but the audit: its seconds per point audited
    times the paper's slots (4 radii x 100 certified points, whatever the test-set size), here
    400 though the rehearsal audited only the 100 points it had certified."""
    parts = {
        "pgd": (30.0, 1000),
        "strong": (100.0, 200),
        "audit": (20.0, 100),
        "bisect": (50.0, 500),
    }
    measured = fake_eval({"n_test": 500}, parts, wall=260.0)
    units, seconds, _, _ = project(measured.job, measured, paper())
    assert units == 10_000 and seconds == pytest.approx(60.0 + (30 + 100 + 50) * 20 + 0.2 * 400)


def test_a_bisection_the_rehearsal_left_out_is_estimated_at_the_strong_attacks_rate():
    """Run: strong attack at one radius, no bisection; paper: 4 standard radii (3 of them off
    the 40-radius grid: 42 PGD radii against 40) and ceil(log2 40) = 6 bisection attacks per
    test point."""
    run = {"n_test": 500, "standard_eps": [0.1411764706], "strong": {
        **PAPER["classification"]["evaluate"]["strong"], "on_grid": False}}  # fmt: skip
    parts = {"pgd": (30.0, 1000), "strong": (100.0, 200), "audit": (20.0, 100), "bisect": (0.0, 0)}
    measured = fake_eval(run, parts, wall=160.0)
    _, seconds, basis, _ = project(measured.job, measured, paper())
    pgd, strong, audit = 30 * 20 * 42 / 40, 100 * 20 * 4, 20 / 100 * 400
    bisect = 100 / 200 * 10_000 * 6  # s per point x test points x attacks per point
    assert seconds == pytest.approx(10.0 + pgd + strong + audit + bisect)
    assert "bisection estimated at the strong pass's rate" in basis


def fake_train(job: Job, wall: float, steps: int, step_s: float) -> Measured:
    """A measured training job of ``steps`` steps in ``step_s`` seconds (no validation)."""
    return Measured(job, wall, 0, "step", steps, step_s, {}, {"step": (step_s, steps)})


def test_an_unmeasured_variant_is_projected_by_the_benchmarked_step_time_ratio_and_its_stages():
    train = fake_train(Job("train_classifier", "nonexpansive", seed=0), 30.0, 100, 1.0)
    bench = {("classifier", 16, "cuda_graphs replayed"): BenchRow(7.5, 15),
             ("cpl", 16, ""): BenchRow(15.0, 15)}  # fmt: skip
    _, seconds, basis, _ = project(Job("train_classifier", "cpl_XS", seed=0), train, paper(bench))
    assert seconds == pytest.approx(29.0 + 2 * 0.01 * 40_000)  # no graphed CPL row: eager, 2x
    assert "x 2 (benchmarked step ('cpl', 16) / ('classifier', 16), cpl_XS: eager row" in basis
    denoiser = fake_train(Job("train_denoiser", "averaged", "0.15", 0), 30.0, 10, 1.0)
    _, seconds, basis, _ = project(Job("train_denoiser", "heun", "0.15", 0), denoiser, paper())
    # 2 stages, theta 1 for the averaged one's 0.5: half the sub-steps at the same norms
    assert seconds == pytest.approx(29.0 + 2 * 0.5 * 0.1 * 40_000)
    assert "stages and theta only" in basis


def test_a_layer_family_is_projected_at_its_benchmark_rows_sub_steps_not_the_measured_ones():
    """The paper classifier's rate covers the 35 sub-steps it ran on average, its benchmark row
    15: a CPL classifier (fixed cost) is its row's time over the classifier row's times the
    measured rate brought to 15 sub-steps, in training and evaluation alike; the paper
    classifier itself keeps its measured rate (a lower bound)."""
    bench = {("classifier", 16, "cuda_graphs replayed"): BenchRow(7.5, 15),
             ("cpl", 16, ""): BenchRow(15.0, 15)}  # fmt: skip
    job = Job("train_classifier", "nonexpansive", seed=0)
    measured = Measured(job, 30.0, 0, "step", 100, 1.0, {}, {"step": (1.0, 100)}, substeps=35)
    cpl = Job("train_classifier", "cpl_XS", seed=0)
    _, seconds, basis, _ = project(cpl, measured, paper(bench))
    assert seconds == pytest.approx(29.0 + 2 * 15 / 35 * 0.01 * 40_000)
    assert "at the row's 15 sub-steps, not the 35 measured" in basis
    assert "margin loss for the task's loss: same step time assumed" in basis  # rows: cross-entropy
    _, own, _, _ = project(job, measured, paper(bench))
    assert own == pytest.approx(29.0 + 0.01 * 40_000)
    parts = {"pgd": (30.0, 1000), "strong": (100.0, 200), "audit": (20.0, 100), "bisect": (5, 50)}
    evaluation = fake_eval({"n_test": 500}, parts, wall=160.0)
    evaluation.substeps = 35
    _, at_own, _, _ = project(evaluation.job, evaluation, paper(bench))
    _, at_cpl, _, _ = project(
        Job("evaluate_classifier", "cpl_XS", seed=0), evaluation, paper(bench)
    )
    assert at_cpl - 5.0 == pytest.approx(2 * 15 / 35 * (at_own - 5.0))  # 5 s fixed


def test_a_strong_pass_that_attacked_no_point_takes_another_evaluations_rate_or_is_incomplete():
    """The rehearsal's strong pass found nothing to attack (0 points): not 0 s at paper scale,
    but every test point at the paper's 4 radii (and 6 bisection attacks each) at the rate of
    another evaluation's strong pass; with none, the projection says it is incomplete, its fits
    unknown, and the totals name it."""
    run = {"n_test": 500, "standard_eps": [0.1411764706], "strong": {
        **PAPER["classification"]["evaluate"]["strong"], "on_grid": False}}  # fmt: skip
    parts = {"pgd": (30.0, 1000), "strong": (0.0, 0), "audit": (20.0, 100), "bisect": (0.0, 0)}
    measured = fake_eval(run, parts, wall=60.0)
    other = fake_eval(run, {**parts, "strong": (50.0, 100)}, wall=99.0, variant="resnet")
    _, seconds, basis, complete = project(measured.job, measured, paper(), [measured, other])
    clean = 10_000  # every test point: an upper bound whatever the rehearsal model's accuracy
    expected = 10.0 + 30 * 20 * 42 / 40 + 0.2 * 400 + 0.5 * clean * (4 + 6)
    assert complete and seconds == pytest.approx(expected)
    assert "strong pass: no point attacked here" in basis
    assert "strong pass's rate of evaluate_classifier/resnet/seed0" in basis
    _, alone, basis, _ = project(measured.job, measured, paper())  # the audit's rate, 0.2 s
    assert alone == pytest.approx(expected + clean * (4 + 6) * (0.2 - 0.5))
    assert "strong pass: no point attacked here" in basis and "the audit pass's rate" in basis
    parts["audit"] = (0.0, 0)  # nor by the audit (its rate, an upper bound, would stand in)
    unattacked = [  # the run's evaluations, neither with a point attacked by the strong pass
        fake_eval(run, parts, 60.0, m.job.variant) if m.job.rule == "evaluate_classifier" else m
        for m in fake_run(eval_wall=40.0)
    ]
    rows = pd.DataFrame(cost_rows(unattacked, paper()))
    mine = rows[(rows["row"] == "paper") & (rows["rule"] == "evaluate_classifier")]
    assert mine["fits"].isna().all() and mine["basis"].str.contains("pass strong attacked no").all()
    gpu = rows[rows["row"] == "total"].iloc[0]
    assert pd.isna(gpu["fits"]) and "projected incomplete" in gpu["basis"]
    assert "evaluate_classifier/cpl_XS" in gpu["basis"]


def test_a_pass_that_attacked_no_point_is_bounded_by_every_paper_test_point_not_the_accuracy():
    """The rehearsal's partially trained model (0.11 accurate after 100 steps on the CPU) may
    leave the strong pass nothing to attack, and the paper model is far more accurate: the
    upper bound counts every test point at the paper's radii (4 strong, 6 bisection attacks),
    the same whatever the rehearsal model's clean accuracy."""
    run = {"n_test": 500, "standard_eps": [0.1411764706], "strong": {
        **PAPER["classification"]["evaluate"]["strong"], "on_grid": False}}  # fmt: skip
    parts = {"pgd": (30.0, 1000), "strong": (0.0, 0), "audit": (20.0, 100), "bisect": (0.0, 0)}
    projected = []
    for clean in (0.11, 0.75):
        measured = fake_eval(run, parts, wall=60.0)
        measured.stats["clean_accuracy"] = clean
        projected.append(project(measured.job, measured, paper()))
    bound = 0.2 * 10_000 * (4 + 6)  # the audit's rate x every test point x radii and attacks
    expected = 10.0 + 30 * 20 * 42 / 40 + 0.2 * 400 + bound
    assert [p.seconds for p in projected] == pytest.approx([expected, expected])
    assert "every one of the paper's test points x radii at the audit pass's rate (an upper " \
        "bound" in projected[0].basis  # fmt: skip


def test_a_denoisers_rate_carried_to_another_theta_scales_by_theta_basis_over_theta_job():
    """``n = ceil(T L ||A||^2 / (2 r theta))``: at the same norms the averaged denoiser (theta
    0.5) takes twice the sub-steps of Euler (theta 1), whose benchmark row it shares; the
    rehearsal trains only the averaged one. Euler's training and evaluation are projected at
    half its rate per step or image, and back."""
    bench = {("denoiser", "", ""): BenchRow(100.0, 13)}
    averaged, euler = (Job("train_denoiser", v, "0.15", 0) for v in ("averaged", "euler"))
    _, seconds, basis, _ = project(euler, fake_train(averaged, 30.0, 10, 1.0), paper(bench))
    assert seconds == pytest.approx(29.0 + 0.5 * 0.1 * 40_000)
    assert "theta 1 for 0.5: x 0.5 sub-steps" in basis
    _, seconds, _, _ = project(averaged, fake_train(euler, 30.0, 10, 1.0), paper(bench))
    assert seconds == pytest.approx(29.0 + 2 * 0.1 * 40_000)
    evaluation = Measured(Job("evaluate_denoiser", "averaged", "0.15", 0), 30.0, 0, "test image",
                          10, 20.0, {})  # fmt: skip
    _, seconds, _, _ = project(Job("evaluate_denoiser", "euler", "0.15", 0), evaluation,
                               paper(bench))  # fmt: skip
    assert seconds == pytest.approx(10.0 + 0.5 * 2.0 * 200)  # 200 test images


def test_a_fixed_cost_denoiser_block_is_projected_as_an_euler_block_at_its_rows_sub_steps():
    """The CPL, SLL and AOL denoisers share the averaged denoiser's model and benchmark row; the
    rehearsal trains only the averaged one (theta 0.5, 20 sub-steps measured, 13 in the row,
    an Euler model at theta 1). Their basis said "Euler block's time assumed" and took the
    averaged rate unchanged (its sub-step growth included): the row's sub-steps, once."""
    bench = {("denoiser", "", ""): BenchRow(100.0, 13)}
    averaged = fake_train(Job("train_denoiser", "averaged", "0.15", 0), 30.0, 10, 1.0)
    averaged.substeps = 20
    for family in ("cpl", "sll", "aol"):
        job = Job("train_denoiser", family, "0.15", 0)
        _, seconds, basis, _ = project(job, averaged, paper(bench))
        assert seconds == pytest.approx(29.0 + 13 / 20 * 0.1 * 40_000), family
        assert f"block {family}: Euler block's time assumed" in basis and "theta" not in basis
        assert "at the row's 13 sub-steps, not the 20 measured" in basis
    cpl = Job("train_denoiser", "cpl", "0.15", 0)  # no benchmark row: theta 1 for 0.5
    _, seconds, basis, _ = project(cpl, averaged, paper())
    assert seconds == pytest.approx(29.0 + 0.5 * 0.1 * 40_000) and "theta 1 for 0.5" in basis
    euler = Job("train_denoiser", "euler", "0.15", 0)  # sub-steps as the basis's: its growth
    assert project(euler, averaged, paper(bench))[1] == pytest.approx(29.0 + 0.5 * 0.1 * 40_000)


def test_a_budget_minutes_projection_adds_validations_and_checkpoints_at_the_steps_it_buys():
    """``train/budget.py``: a budget covers the steps alone (validation and checkpoints come on
    top) and the job derives its steps from its step time: 120 minutes at 10 ms per step are
    720,000 steps, each ``val_every`` validated and each ``checkpoint_every`` written; the
    paper units are those steps."""
    config = json.loads(json.dumps(PAPER))
    config["classification"]["variants"]["nonexpansive"]["train"] = {"budget_minutes": 120}
    train = config["classification"]["train"]
    job = Job("train_classifier", "nonexpansive", seed=0)
    parts = {"step": (10.0, 1000), "validation": (6.0, 3), "checkpoint": (1.0, 2)}
    measured = Measured(job, 37.0, 0, "step", 1000, 17.0, {}, parts)  # 20 s fixed
    units, seconds, basis, _ = project(job, measured, Paper(config, {}))
    steps = budget_steps(120, 0.01)
    validations = math.ceil(steps / train["val_every"])
    checkpoints = math.ceil(steps / train["checkpoint_every"])
    assert units == steps and validations > 1000
    assert seconds == pytest.approx(20.0 + 7200.0 + 2.0 * validations + 0.5 * checkpoints)
    assert f"budget_minutes, {steps} steps at the projected rate" in basis


def test_a_rate_borrowed_from_another_model_is_brought_to_the_sub_steps_the_borrower_ran():
    """The paper classifier ran 51 sub-steps (its row: 15) and its strong pass attacked nothing:
    the ResNet's rate, carried over by the rows' step times, is at 15 sub-steps; the classifier's
    own rates are at 51, so the borrowed one is scaled to 51 too (not left 3.4x low)."""
    bench = {("classifier", 16, "cuda_graphs replayed"): BenchRow(7.5, 15),
             ("resnet", 16, "cuda_graphs replayed"): BenchRow(5.0, 0)}  # fmt: skip
    run = {"n_test": 500, "standard_eps": [0.1411764706], "strong": {
        **PAPER["classification"]["evaluate"]["strong"], "on_grid": False}}  # fmt: skip
    parts = {"pgd": (30.0, 1000), "strong": (0.0, 0), "audit": (20.0, 100), "bisect": (0.0, 0)}
    mine = fake_eval(run, parts, wall=60.0)
    resnet = fake_eval(run, {**parts, "strong": (50.0, 100)}, wall=99.0, variant="resnet")
    at = {}
    for substeps in (None, 51):
        mine.substeps = substeps
        at[substeps] = project(mine.job, mine, paper(bench), [mine, resnet])[1]
    borrowed = 0.5 * 7.5 / 5.0 * 10_000 * (4 + 6)  # rate x f x test points x attacks
    assert at[51] - at[None] == pytest.approx(borrowed * (51 / 15 - 1))


def test_a_job_projected_incomplete_is_listed_by_rule_with_its_fits_unknown(tmp_path):
    """``bench.training --cost`` reads ``fits`` back: empty (unknown) is not a fit."""
    path = tmp_path / "cost.csv"
    pd.DataFrame([
        {"row": "paper", "rule": "evaluate_classifier", "variant": v, "sigma": "",
         "projected_h": 0.5, "runtime_min": 240, "fits": fits}
        for v, fits in (("cpl_XS", True), ("sll_XS", None))
    ]).to_csv(path, index=False)  # fmt: skip
    (by_rule,) = projected_by_rule(path, {"evaluate_classifier"})
    assert by_rule["over"] == ["sll_XS (fits unknown)"] and by_rule["jobs"] == 2


@pytest.mark.parametrize(
    ("job", "units", "seconds"),
    [
        (Job("pnp_deblur", "averaged", "0.15", 0), {"image_iterations_run": 600}, "deblur_s_run"),
        (Job("evaluate_tv_denoising", sigma="0.15"), {"image_solves_run": 600}, "denoising_s_run"),
    ],
)
def test_a_solver_job_projects_its_fixed_seconds_plus_its_solves_rate(
    job, units, seconds, tmp_path
):
    """PnP: start-up, the model and its Lipschitz bound; TV denoising: start-up and loading
    (wall less the solves' seconds) stay fixed; only the solves scale to the paper's units."""
    root, tsv = tmp_path / "results", tmp_path / "bench.tsv"
    tsv.write_text("s\th:m:s\tmax_rss\n50.0\t0:00:50\t900.0\n")
    write_results(job.results(root), {"config": json.dumps({}), **units, seconds: 6.0}, {})
    measured = measure(job, tsv, root)
    assert (measured.units, measured.variable_s, measured.fixed_s) == (600, 6.0, 44.0)
    paper_units, projected, basis, _ = project(job, measured, paper())
    assert projected == pytest.approx(44.0 + 6.0 / 600 * paper_units)
    assert "upper estimate" not in basis


def fake_run(eval_wall: float) -> list[Measured]:
    """One measured job per rule, the rehearsal's variants."""
    out = [
        Measured(Job("prepare_data", dataset=d), 5.0, 0, "dataset", 1, 5.0, {})
        for d in DATASET_NAMES
    ]
    for v in ("nonexpansive", "resnet"):
        out.append(fake_train(Job("train_classifier", v, seed=0), 30.0, 2000, 15.0))
        parts = {"pgd": (5.0, 500), "strong": (20.0, 100), "audit": (5.0, 50), "bisect": (0.0, 0)}
        run = {"n_test": 500, "standard_eps": [0.1411764706], "strong": {
            **PAPER["classification"]["evaluate"]["strong"], "on_grid": False}}  # fmt: skip
        out.append(fake_eval(run, parts, eval_wall, v))
    for v in ("averaged", "dncnn"):
        out += [
            fake_train(Job("train_denoiser", v, "0.15", 0), 40.0, 200, 20.0),
            Measured(Job("evaluate_denoiser", v, "0.15", 0), 20.0, 0, "test image", 200, 20.0, {}),
            Measured(Job("pnp_deblur", v, "0.15", 0), 20.0, 0, "image-iteration", 600, 20.0, {}),
        ]
    out.append(
        Measured(Job("evaluate_tv_denoising", sigma="0.15"), 9.0, 0, "image solve", 700, 9, {})
    )
    return out + [Measured(Job("tv_deblur"), 5.0, 0, "image-iteration", 600, 5.0, {})]


def test_every_job_of_the_paper_dag_gets_a_finite_projection_and_the_totals_name_late_jobs():
    rows = pd.DataFrame(cost_rows(fake_run(eval_wall=40.0), paper()))
    dag = rows[rows["row"] == "paper"]
    assert len(dag) == len(dag_jobs(PAPER)) and dag["projected_h"].map(math.isfinite).all()
    assert set(dag["rule"]) == set(RULES) and dag["basis"].str.len().gt(0).all()
    gpu, every = rows[rows["row"] == "total"].itertuples()
    assert gpu.projected_h == pytest.approx(dag.loc[dag["gpu"] > 0, "projected_h"].sum())
    assert every.projected_h == pytest.approx(dag["projected_h"].sum())
    assert gpu.fits and gpu.basis.startswith("over their runtime: none; ")  # (sub-steps next)
    slow = pd.DataFrame(cost_rows(fake_run(eval_wall=40.0 + 4 * 3600), paper()))  # 4 h fixed
    late = slow[(slow["row"] == "paper") & ~slow["fits"].astype(bool)]
    assert set(late["rule"]) == {"evaluate_classifier"}
    assert "evaluate_classifier/nonexpansive" in slow[slow["row"] == "total"]["basis"].iloc[0]


def test_a_job_whose_rerun_only_read_back_its_saved_work_is_no_basis_for_a_projection():
    run = fake_run(eval_wall=40.0)
    resumed = Measured(Job("evaluate_denoiser", "averaged", "0.15", 0), 3.0, 0, "test image", 0,
                       3.0, {})  # fmt: skip
    at = next(i for i, m in enumerate(run) if m.job == resumed.job)
    run[at] = resumed  # its rate would be 3 s / 0 images
    rows = pd.DataFrame(cost_rows(run, paper()))
    mine = rows[(rows["row"] == "paper") & (rows["rule"] == "evaluate_denoiser")]
    assert mine["projected_h"].map(math.isfinite).all()
    assert mine["basis"].str.contains("evaluate_denoiser/sigma0.15/dncnn/").all(), mine["basis"]
    measured = rows[(rows["row"] == "rehearsal") & (rows["rule"] == "evaluate_denoiser")]
    assert measured["seconds_per_unit"].isna().sum() == 1
    run = [m for m in run if m.job.rule != "evaluate_denoiser" or m is resumed]
    with pytest.raises(ValueError, match="no measured evaluate_denoiser job to project"):
        cost_rows(run, paper())


# --------------------------------------------------------------------------------------------
# a tiny `make rehearsal`

TINY = {
    "device": "cpu",
    "threads": 1,
    "data": {
        "cifar10": {"synthetic": {"n_train": 256, "n_val": 64, "n_test": 64}},
        "bsds500": {"photos": {"size": [32, 40], "n_train": 16, "n_val": 4, "n_test": 4}},
    },
    "classification": {
        "train": {"batch_size": 32, "stop_after": 6, "log_every": 2, "checkpoint_every": 3},
        "select": ["nonexpansive"],
        "variants": {"nonexpansive": {"kwargs": {"base_width": 4, "blocks_per_stage": 1}}},
        "evaluate": {
            "n_test": 16,
            "batch_size": 16,
            "eps": {"num": 4},
            "audit_certified": 4,
            "lipschitz_search": {"steps": 5},
            "strong": {"version": "custom", "attacks": ["apgd-ce"], "iterations": 5},
        },
    },
    "denoising": {
        "train": {"batch_size": 4, "stop_after": 4, "log_every": 2, "checkpoint_every": 2},
        "select": ["averaged"],
        "variants": {"averaged": {"kwargs": {"width": 8, "depth": 2, "power_size": None}}},
        "evaluate": {"crop_size": [16, 16], "lipschitz_search": {"steps": 5}},
        "tv": {"iters": 10},
    },
    "pnp": {
        "denoisers": ["averaged"],
        "max_iter": 10,
        "val_images": 2,
        "strengths": [1.0, 0.3],
        "tv": {"iters": 10},
    },  # fmt: skip
    "resources": {
        kind: {"runtime": 10, "mem_mb": 2000, "gpu": 0} for kind in ("train", "evaluate")
    },
}


@pytest.mark.slow
def test_a_tiny_make_rehearsal_runs_every_job_kind_and_writes_cost_csv(tmp_path):
    """The rehearsal overlay shrunk (tiny data and models, one model per rule, a cheap strong
    attack): `make rehearsal` runs every rule and projects every job of the paper DAG, the ones
    of unmeasured variants from the measured job of their rule."""
    work = copy_workflow(tmp_path / "rehearsal")
    shutil.copytree(ROOT / "benchmarks" / "results", work / "benchmarks" / "results")
    overlay_file = work / "config" / "rehearsal.yaml"  # the rehearsal overlay, further shrunk
    overlay_file.write_text(yaml.safe_dump(overlay(yaml.safe_load(overlay_file.read_text()), TINY)))
    make = subprocess.run(
        ["make", "rehearsal", f"VENV={BIN.parent}", "STAMP="],
        cwd=work,
        env={k: v for k, v in local_env().items() if not k.startswith("MAKE")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert make.returncode == 0, (make.stdout + make.stderr)[-4000:]
    cost = pd.read_csv(work / "results/rehearsal/cost.csv")
    measured = cost[cost["row"] == "rehearsal"]
    assert set(measured["rule"]) == set(RULES)
    assert (measured["wall_s"] > 0).all() and measured["projected_h"].map(math.isfinite).all()
    trained = measured[measured["rule"].str.startswith("train_")]
    assert list(trained["units"]) == [6, 4]  # steps run of the 40,000-step schedule
    assert (trained["substeps_first"] >= 1).all() and (trained["peak_memory_mb"] > 0).all()
    attacked = measured[measured["rule"] == "evaluate_classifier"]
    assert (attacked["fixed_s"] > 0).all() and (attacked["seconds_per_unit"] >= 0).all()
    # training and the classifier evaluation recorded their run's own seconds (jobs: *_run)
    assert not measured["basis"].str.contains(UNRECORDED_RUN, regex=False).any()
    deblurred = measured[measured["rule"].isin(["pnp_deblur", "tv_deblur"])]  # start-up: fixed
    assert len(deblurred) == 2 and (deblurred["fixed_s"] > 0).all(), deblurred
    dag = cost[cost["row"] == "paper"]
    assert len(dag) == len(dag_jobs(PAPER)) and dag["projected_h"].map(math.isfinite).all()
    assert dag[dag["variant"] == "resnet"]["basis"].str.startswith("train_classifier/nonexp").any()
    assert dag["fits"].isin([True, False]).all() and (cost["row"] == "total").sum() == 2
    note = (work / "results/rehearsal/cost.md").read_text()
    assert "hours on cpu** for" in note and "## The paper's learning rate, tried" in note
    computed = measured[measured["rule"] != "prepare_data"]  # each says what it ran on
    assert (computed["device"] == "cpu").all() and measured["device"].isna().sum() == 2
    assert "other than the paper's (classification/nonexpansive, denoising/averaged)" in note
    assert (work / "results/rehearsal/summary.md").exists()


def test_make_rehearsal_clears_a_stale_lock_first_reruns_incomplete_jobs_and_runs_one_gpu_job():
    profile = yaml.safe_load((ROOT / "workflow/profiles/rehearsal/config.yaml").read_text())
    assert profile["rerun-incomplete"] is True and profile["resources"] == {"gpu": 1}
    assert profile["keep-going"] is True  # a diverged training stops only what needs its model
    assert profile["configfile"] == ["config.yaml", "config/rehearsal.yaml"]
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^rehearsal:.*\n((?:\t.*\n)+)", makefile, re.M)[1]
    assert recipe.index("-m stablenets.pipeline.locks") < recipe.index(
        "/snakemake all_with_cost"
    ), recipe


def test_an_overlay_given_as_the_paper_configuration_is_named_by_its_key(tmp_path):
    """``cost.paper_config`` must be a whole configuration; the rehearsal overlay alone is not,
    and the cost job says which key points at it, in one line."""
    paper = str(ROOT / "config" / "rehearsal.yaml")
    run = overlay(rehearsal_config(), {"cost": {"paper_config": paper}})
    spec = {"config": run, "results": tmp_path, "benchmarks": tmp_path, "schema": SCHEMA}
    with pytest.raises(ValueError) as err:
        write_cost(spec, [], tmp_path / "cost.csv")
    message = str(err.value)
    assert message.startswith(f"cost.paper_config: {paper} is not a valid whole configuration: ")
    assert "'resources' is a required property" in message and "\n" not in message
    assert not (tmp_path / "cost.csv").exists()
    # and a workflow asked for the cost report says so when it starts, not after the
    # rehearsal's last job; one not asked for it is not stopped by it
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"cost": {"paper_config": paper}}))
    for targets, stopped in ((["--", "all_with_cost"], True), (["--quiet", "rules"], False)):
        dry = subprocess.run(
            [str(BIN / "snakemake"), "-n", "--configfile", "config.yaml", str(wrong), *targets],
            cwd=ROOT, capture_output=True, text=True, env=local_env(), timeout=600,
        )  # fmt: skip
        said = dry.stdout + dry.stderr
        assert (dry.returncode != 0) == stopped, said[-2000:]
        assert (f"config: cost.paper_config: {paper} is not a valid" in said) == stopped
        assert "Traceback" not in said, said[-2000:]


def test_an_evaluation_is_measured_from_the_seconds_and_points_per_pass_it_records(tmp_path):
    """Seconds and attacked points per pass come from the result file's attributes."""
    job = Job("evaluate_classifier", "resnet", seed=0)
    root = tmp_path / "results"
    tsv = tmp_path / "bench.tsv"
    tsv.write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t900.0\n")
    spec = {"evaluate": PAPER["classification"]["evaluate"]}
    rates = {"pgd": 0.01, "strong": 0.5, "audit": float("nan"), "bisect": 0.25}
    points = {"pgd": 200, "strong": 10, "audit": 0, "bisect": 4}
    write_results(
        job.results(root),
        {"config": json.dumps(spec), "n_test": 100, "clean_accuracy": 0.5, "total_substeps": 35}
        | {f"seconds_per_point_{p}": r for p, r in rates.items()}
        | {f"attacked_points_{p}": n for p, n in points.items()},
        {},
    )
    measured = measure(job, tsv, root)
    assert (measured.wall_s, measured.max_rss_mb, measured.units) == (12.5, 900.0, 100)
    assert measured.variable_s == 8.0 and measured.fixed_s == 4.5
    assert measured.parts["strong"] == (5.0, 10) and measured.stats["s_per_point_pgd"] == 0.01
    assert measured.parts["audit"] == (0.0, 0) and measured.substeps == 35


def test_the_tv_baselines_are_measured_and_projected_with_their_choice_of_weight(tmp_path):
    """A TV job also solves its validation images once per candidate weight: a rehearsal that
    chose on fewer validation images than the paper scales by the solves, not the test images."""
    root, tsv = tmp_path / "results", tmp_path / "bench.tsv"
    tsv.write_text("s\th:m:s\tmax_rss\n22.0\t0:00:22\t900.0\n")
    job = Job("evaluate_tv_denoising", sigma="0.15")
    spec = {"tv": {**PAPER["denoising"]["tv"], "val_images": 4}}
    weights = len(PAPER["denoising"]["tv"]["weights"])
    attrs = {"config": json.dumps(spec), "tv_validation_images": 4}
    write_results(job.results(root), attrs | {"image_solves_run": 200 + 4 * weights}, {})
    measured = measure(job, tsv, root)
    assert (measured.unit, measured.units) == ("image solve", 200 + 4 * weights)
    units, seconds, _, _ = project(job, measured, paper())  # the paper: the whole split, 100
    assert units == 200 + 100 * weights
    assert seconds == pytest.approx(22.0 / (200 + 4 * weights) * units)
    p = PAPER["pnp"]  # deblurring: 200 test images and val_images per candidate, 300 its
    deblur = Measured(Job("tv_deblur"), 5.0, 0, "image-iteration", 600, 5.0, {})
    units, _, _, _ = project(deblur.job, deblur, paper())
    assert units == (200 + p["val_images"] * len(p["tv"]["weights"])) * p["tv"]["iters"]
    deblur = Measured(Job("pnp_deblur", "averaged", "0.15", 0), 5.0, 0, "image-iteration", 600,
                      5.0, {})  # fmt: skip
    units, _, _, _ = project(deblur.job, deblur, paper())
    assert units == (200 + p["val_images"] * len(p["strengths"])) * p["max_iter"]


# The clocks of a job resumed once: its totals count the killed run's 1,000 steps (14 s) and this
# run's 1,000: 10 s of steps once its first (start-up, 2 s) is re-timed at the others' 10 ms,
# 1 s of validations and 0.5 s of checkpoint writes; its benchmark's 20 s wall time is this
# run's alone: 8.5 s fixed.
TOTALS = {"train_time_s": 26.0, "startup_s": 4.0, "startup_steps": 2, "validation_s": 3.0,
          "validations": 3, "checkpoint_s": 1.0, "checkpoints": 2}  # fmt: skip
THIS_RUN = {"steps_run": 1000, "train_time_s_run": 2.0 + 999 * 0.01, "startup_s_run": 2.0,
            "startup_steps_run": 1, "validation_s_run": 1.0, "validations_run": 1,
            "checkpoint_s_run": 0.5, "checkpoints_run": 1}  # fmt: skip


def measured_training(tmp_path: Path, extra: dict) -> Measured:
    """``measure`` of a trained classifier of 2,000 steps (20 s wall) with these clocks."""
    job = Job("train_classifier", "nonexpansive", seed=0)
    root, tsv = tmp_path / "results", tmp_path / "bench.tsv"
    root.mkdir(parents=True)
    tsv.write_text("s\th:m:s\tmax_rss\n20.0\t0:00:20\t900.0\n")
    model = build_model("nonexpansive_classifier", base_width=4, stages=2, blocks_per_stage=1,
                        input_size=8)  # fmt: skip
    path = job.results(root)
    path.parent.mkdir(parents=True)
    save_model(model, path, config=json.dumps({}), peak_memory_mb=1.0, **extra)
    pd.DataFrame([
        {"step": 0, "kind": "train", "substeps": 15, "lr": 0.01},
        {"step": 2000, "kind": "val", "substeps": 0, "lr": 0.01},
    ]).to_csv(path.with_name("train_log.csv"), index=False)  # fmt: skip
    return measure(job, tsv, root)


def test_a_resumed_training_job_keeps_the_fixed_seconds_of_its_last_run_not_wall_less_all_runs(
    tmp_path,
):
    """Wall less every run's 29 s of steps, validations and writes was 0 (clamped): the job
    projected without its start-up and loading. Its rates stay every run's (2,000 steps)."""
    measured = measured_training(tmp_path, TOTALS | THIS_RUN)
    assert measured.fixed_s == pytest.approx(20.0 - (10.0 + 1.0 + 0.5))
    assert measured.parts["step"] == (pytest.approx(22.0 * 2000 / 1998), 2000)
    assert measured.parts["validation"] == (3.0, 3) and measured.caveat == ""
    old = measured_training(tmp_path / "old", TOTALS)  # a model saved before the *_run clocks
    assert old.fixed_s == 0.0 and old.caveat == UNRECORDED_RUN
    _, _, basis, _ = project(old.job, old, paper())
    assert UNRECORDED_RUN in basis


def test_a_resumed_run_of_one_start_up_step_keeps_its_start_up_fixed(tmp_path):
    """A run resumed one step before the end times that step with its start-up (3 s): it is
    counted at every run's steady rate (22 s over 1,998 steady steps), the rest of it fixed.
    Timed by its own clock, the whole start-up counted as a step the paper's 40,000 repeat."""
    one_step = {"steps_run": 1, "train_time_s_run": 3.0, "startup_s_run": 3.0,
                "startup_steps_run": 1, "validation_s_run": 1.0, "validations_run": 1,
                "checkpoint_s_run": 0.5, "checkpoints_run": 1}  # fmt: skip
    measured = measured_training(tmp_path, TOTALS | one_step)
    assert measured.fixed_s == pytest.approx(20.0 - (22.0 / 1998 + 1.0 + 0.5))


def tiny_training(tmp_path: Path, steps: int, every: int) -> tuple[Path, dict]:
    """A synthetic 16x16 CIFAR-like file and the spec of a tiny classifier's training job that
    validates, saves and logs every ``every`` steps."""
    dataset = tmp_path / "cifar.h5"
    data.make_synthetic_classification(dataset, 64, 16, 16, 10, 16, 0.05, 0)
    spec = {
        "task": "classification", "variant": "tiny", "model": "nonexpansive_classifier",
        "kwargs": {"base_width": 4, "stages": 2, "blocks_per_stage": 1, "input_size": 16},
        "train": {"steps": steps, "batch_size": 16, "lr_max": 0.05, "val_every": every,
                  "checkpoint_every": every, "log_every": every},
        "augment": {"crop_padding": 2, "flip": True, "erase_p": 0.5},
        "eval_batch": 16, "seed": 0, "device": "cpu", "threads": 1,
    }  # fmt: skip
    return dataset, spec


def test_a_resumed_training_records_its_own_runs_steps_and_seconds_beside_every_runs(tmp_path):
    """A job stopped after 5 of 10 steps (``stop_after``), then run on to the end: the second
    run's ``*_run`` clocks are its 5 steps, its own start-up step and validation, the totals
    both runs'; a run that started afresh has its totals as its own."""
    dataset, spec = tiny_training(tmp_path, steps=10, every=5)
    work, extras = tmp_path / "work", []
    for stop_after in (5, None):
        spec["train"]["stop_after"] = stop_after
        out = tmp_path / f"stop{stop_after}"
        pipeline_jobs.train_model(spec, dataset, out / "m.pt", out / "l.csv", work, str)
        extras.append(read_checkpoint(out / "m.pt")["extra"])
    first, second = extras
    assert first["steps_run"] == 5 and first["train_time_s_run"] == first["train_time_s"]
    assert (second["steps_run"], second["startup_steps_run"], second["startup_steps"]) == (5, 1, 2)
    assert second["validations_run"] == 1 and second["validations"] == 2
    assert second["train_time_s_run"] == pytest.approx(
        second["train_time_s"] - first["train_time_s"]
    )


def test_a_rerun_that_trains_no_step_keeps_the_peak_memory_and_device_of_the_runs_that_did(
    tmp_path, monkeypatch
):
    """A finished training rerun for a run-only setting (``log_every``) resumes its checkpoint
    at the end and trains no step: it wrote its own process's peak memory (of a run that never
    trained: tiny on a GPU) and its own device. Now the largest of the runs that trained."""
    dataset, spec = tiny_training(tmp_path, steps=4, every=2)
    work = tmp_path / "work"
    pipeline_jobs.train_model(spec, dataset, tmp_path / "a.pt", tmp_path / "a.csv", work, str)
    trained = read_checkpoint(tmp_path / "a.pt")["extra"]
    assert trained["peak_memory_mb"] > 0 and trained["device"] == "cpu"
    monkeypatch.setattr(pipeline_jobs, "peak_memory_mb", lambda device: 1e9)  # the rerun's own
    spec["train"]["log_every"] = 1
    pipeline_jobs.train_model(spec, dataset, tmp_path / "b.pt", tmp_path / "b.csv", work, str)
    rerun = read_checkpoint(tmp_path / "b.pt")["extra"]
    assert rerun["steps_run"] == 0
    assert (rerun["peak_memory_mb"], rerun["device"]) == (trained["peak_memory_mb"], "cpu")


def test_a_resumed_evaluation_keeps_its_last_runs_fixed_seconds_and_scales_its_clean_pass(
    tmp_path,
):
    """The sweep's seconds per pass count every run's (8 s), the benchmark's 12.5 s this run's:
    2 s of attacks and 0.5 s of its clean pass over its 100 points leave 10 s fixed, and the
    clean pass is a part at 5 ms a point, 50 s over the paper's 10,000 (it was fixed)."""
    job = Job("evaluate_classifier", "resnet", seed=0)
    root, tsv = tmp_path / "results", tmp_path / "bench.tsv"
    tsv.write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t900.0\n")
    spec = {"evaluate": PAPER["classification"]["evaluate"]}
    rates = {"pgd": 0.01, "strong": 0.5, "audit": float("nan"), "bisect": 0.25}
    points = {"pgd": 200, "strong": 10, "audit": 0, "bisect": 4}
    attrs = (
        {"config": json.dumps(spec), "n_test": 100, "clean_accuracy": 0.5}
        | {f"seconds_per_point_{p}": r for p, r in rates.items()}
        | {f"attacked_points_{p}": n for p, n in points.items()}
    )
    run = {"seconds_attacks_run": 2.0, "seconds_clean_run": 0.5}
    write_results(job.results(root), attrs | run, {})
    measured = measure(job, tsv, root)
    assert measured.fixed_s == 10.0 and measured.parts["clean"] == (0.5, 100)
    _, seconds, basis, _ = project(job, measured, paper())
    attacks = dataclasses.replace(measured, parts={**measured.parts, "clean": (0.0, 0)})
    _, without, _, _ = project(job, attacks, paper())
    assert seconds - without == pytest.approx(0.5 / 100 * 10_000) and UNRECORDED_RUN not in basis
    write_results(job.results(root), attrs, {})  # a result recorded before this run's seconds
    old = measure(job, tsv, root)
    assert old.fixed_s == 12.5 - 8.0 and "clean" not in old.parts
    assert "its clean pass among them (not scaled to N)" in project(job, old, paper()).basis


def test_the_jobs_of_a_model_with_adaptive_sub_steps_say_their_fits_rests_on_a_lower_bound():
    """Their projections keep the rehearsal's sub-steps (``SUBSTEP_NOTE``): every row of such a
    variant (the paper classifier, the non-expansive denoisers: training, evaluation, PnP) says
    so in ``basis``, ``fits`` staying a bool its readers compare (``projected_by_rule``,
    ``_total``); the ResNet, the layer families and DnCNN do not; the totals count them."""
    rows = pd.DataFrame(cost_rows(fake_run(eval_wall=40.0), paper()))
    jobs = rows[rows["row"].isin(["rehearsal", "paper"])]

    def adaptive(r: pd.Series) -> bool:
        task = "classification" if r["rule"].endswith("_classifier") else "denoising"
        v = PAPER[task]["variants"].get(r["variant"])
        return v is not None and substep_theta(v) is not None

    bounded = jobs.apply(adaptive, axis=1)
    said = jobs["basis"].str.contains(SUBSTEP_BOUND, regex=False)
    assert bounded.any() and (~bounded).any() and (said == bounded).all()
    assert set(jobs.loc[said, "rule"]) == {
        "train_classifier",
        "evaluate_classifier",
        "train_denoiser",
        "evaluate_denoiser",
        "pnp_deblur",
    }
    assert jobs["fits"].isin([True, False]).all()
    gpu = rows[rows["row"] == "total"].iloc[0]
    count = (said & (rows["row"] == "paper") & (rows["gpu"] > 0)).sum()
    assert f"; {count} projected at the rehearsal's sub-steps (a lower bound)" in gpu["basis"]


def device_script(work: Path, out: Path, limit: str, **env: str) -> subprocess.CompletedProcess:
    """benchmarks/run_device_rehearsal.sh run in ``work`` for ``limit`` seconds in its local mode
    (KIT=none, this venv's ``python3``), writing into ``out``; ``env`` adds to its environment."""
    env = {"OUT": str(out), "DEVICE_PYTHON": str(BIN / "python3"), "KIT": "none", **env}
    return subprocess.run(
        ["bash", "benchmarks/run_device_rehearsal.sh", limit],
        cwd=work,
        env={**local_env(), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_device_rehearsal_script_sets_up_python_and_snakemake_and_logs_into_out(tmp_path):
    """benchmarks/run_device_rehearsal.sh in its local mode (KIT=none: this venv's packages) with
    no time left for `make rehearsal`: the stand-in venv runs Snakemake and the pipeline's
    imports from the interpreter's own packages (this venv's, as the device's python3 is a venv:
    a link to it would start the base interpreter without them), device.log is in $OUT, and it
    stops before make (rc 124 as when cut)."""
    script = ROOT / "benchmarks" / "run_device_rehearsal.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    work = copy_workflow(tmp_path / "work")
    (work / "src").symlink_to(ROOT / "src")
    (work / "benchmarks").mkdir()
    shutil.copy2(script, work / "benchmarks")
    out = tmp_path / "out"
    run = device_script(work, out, "1", RESERVE_S="0")  # a 1 s call: no time for make
    assert run.returncode == 124, run.stdout + run.stderr
    log = (out / "device.log").read_text()
    assert "kit none" in log and "torch" in log
    assert "9.27.1\nimports ok" in log  # the stand-in's snakemake, then python on PATH
    assert "no time left for make rehearsal" in log
    assert not (out / "make.log").exists() and not (work / "results").exists()


def test_the_device_rehearsal_script_writes_the_partial_cost_straight_into_out(tmp_path):
    """A run cut before any job finished (benchmarks/rehearsal/ there, no cost.csv): the partial
    cost goes to $OUT as it is written, not to results/ to be copied later (a call cut in
    between would lose it); here no make (its reserve leaves it under 10 s), and no job to
    project from: the measured jobs alone, none."""
    work = copy_workflow(tmp_path / "work")
    (work / "src").symlink_to(ROOT / "src")
    (work / "benchmarks" / "rehearsal").mkdir(parents=True)
    shutil.copy2(ROOT / "benchmarks" / "run_device_rehearsal.sh", work / "benchmarks")
    shutil.copytree(ROOT / "benchmarks" / "results", work / "benchmarks" / "results")
    out = tmp_path / "out"
    run = device_script(work, out, "80", RESERVE_S="75")
    log = (out / "device.log").read_text()
    assert run.returncode == 124 and "no time left for make rehearsal" in log, log
    assert "partial cost: rc 0" in log and "0 of " in log, log
    assert (out / "cost-partial.csv").is_file() and not (work / "results").exists()


def test_the_device_script_needs_no_pytest_for_the_rehearsal_and_skips_only_the_graph_tests(
    tmp_path,
):
    """The kit brings no pytest, which the device's python3 may lack: the rehearsal's imports do
    not include it, and the optional graph tests are skipped with a line. Here a pytest that
    fails to import, and time for the graph tests but not for make (its reserve)."""
    work = copy_workflow(tmp_path / "work")
    (work / "src").symlink_to(ROOT / "src")
    (work / "benchmarks").mkdir()
    shutil.copy2(ROOT / "benchmarks" / "run_device_rehearsal.sh", work / "benchmarks")
    nopytest = tmp_path / "nopytest"
    nopytest.mkdir()
    (nopytest / "pytest.py").write_text('raise ImportError("no pytest on this device")\n')
    out = tmp_path / "out"
    # time for the graph tests (175 s less set-up), not for make (its reserve)
    run = device_script(work, out, "200", RESERVE_S="195", PYTHONPATH=str(nopytest))
    log = (out / "device.log").read_text()
    assert run.returncode == 124, log
    assert "imports ok" in log and "the kit does not import" not in log
    assert "no time left for make rehearsal" in log and "no pytest: graph tests skipped" in log


def test_reap_kills_the_cut_runs_python3_jobs_of_this_checkout_and_no_other(tmp_path):
    """The rules run ``python -m stablenets ...``, the stand-in ``python`` execs the device's
    python3: a job's command line is ``.../python3 -m stablenets ...``. The script's ``reap``
    (run as it defines it) kills such a job running in the checkout, not one elsewhere."""
    script = (ROOT / "benchmarks" / "run_device_rehearsal.sh").read_text()
    reap = re.search(r"^reap\(\) \{.*?^\}$", script, re.M | re.S)
    assert reap is not None
    fake = tmp_path / "fake" / "stablenets"  # a job that outlives the run
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("import time\ntime.sleep(120)\n")
    here, there = (tmp_path / "checkout").resolve(), (tmp_path / "other").resolve()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    jobs = []
    for cwd in (here, there):
        cwd.mkdir()
        command = [str(BIN / "python3"), "-m", "stablenets", "train", "--spec", "x"]
        jobs.append(subprocess.Popen(command, cwd=cwd, env=env))
    try:
        bash = f'ROOT={here}\nlog() {{ echo "$*"; }}\n{reap[0]}\nreap\n'
        done = subprocess.run(["bash", "-c", bash], capture_output=True, text=True, timeout=60)
        assert jobs[0].wait(timeout=10) == -9, done.stdout + done.stderr
        assert jobs[1].poll() is None and "killed 1 job(s)" in done.stdout
    finally:
        for job in jobs:
            job.kill()
            job.wait()
