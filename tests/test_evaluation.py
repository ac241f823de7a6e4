"""The classifier evaluation job (``python -m stablenets evaluate-classifier``): it says what it
is doing, and a job killed half-way resumes to the numbers of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from snakemake.utils import update_config

from stablenets import data
from stablenets.evaluation import radius_sweep
from stablenets.pipeline import cli
from stablenets.pipeline import jobs as pipeline_jobs
from stablenets.pipeline.config import validate_config
from stablenets.pipeline.specs import Jobs

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "cpl_XS"
# A stronger-than-smoke evaluation that takes a few seconds: the strong attack over the grid.
EVALUATE = {
    "n_test": 120,
    "eps": {"num": 8, "stop": 4.0},  # the synthetic classes lie far apart
    "standard_eps": [1.0, 4.0],
    "save_every_s": 1.0e-3,
    "strong": {"on_grid": True, "grid_search": "bisect"},
}


def smoke_jobs() -> Jobs:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    update_config(config, yaml.safe_load((ROOT / "config/smoke.yaml").read_text()))
    update_config(config, {"classification": {"train": {"steps": 60}, "evaluate": EVALUATE}})
    return Jobs(validate_config(config, ROOT / "workflow/schemas/config.schema.yaml"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, Path, Path]:
    """A briefly trained smoke classifier, its test data and its evaluation spec."""
    out = tmp_path_factory.mktemp("evaluation")
    jobs = smoke_jobs()
    dataset = out / "cifar10.h5"
    data.make_synthetic_classification(dataset, 600, 60, 120, 10, 32, 0.05, 0)
    spec = json.loads(jobs.train_spec("classification", VARIANT, 0))
    model = out / "model.pt"
    pipeline_jobs.train_model(
        spec, dataset, model, out / "log.csv", out / "work", log=lambda s: None
    )
    return json.loads(jobs.eval_spec("classification", VARIANT, 0)), model, dataset


def command(trained, out: Path) -> list[str]:
    spec, model, dataset = trained
    return [
        sys.executable, "-m", "stablenets", "evaluate-classifier", "--spec", json.dumps(spec),
        "--model", str(model), "--data", str(dataset), "--out", str(out / "eval.h5"),
        "--workdir", str(out / "work"),
    ]  # fmt: skip


def run(trained, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(trained, out), capture_output=True, text=True, timeout=600)


def numbers(path: Path) -> dict[str, np.ndarray]:
    """Every dataset and attribute of a result file except the machine-measured ones."""
    with h5py.File(path) as fh:
        found = {k: fh[k][()] for k in fh}
        found.update({f"attr {k}": v for k, v in fh.attrs.items() if not k.startswith("seconds")})
    return found


@pytest.fixture(scope="module")
def uninterrupted(trained, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("uninterrupted")
    done = run(trained, out)
    assert done.returncode == 0, done.stderr
    return out, done


def wait_for_progress(proc: subprocess.Popen, path: Path, radius_index: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if torch.load(path, weights_only=True)["state"]["radius_index"] >= radius_index:
                return
        except (FileNotFoundError, RuntimeError, EOFError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError("the evaluation saved no progress before it ended")


def test_the_evaluation_log_has_a_line_per_radius_with_points_left_robust_elapsed_and_eta(
    uninterrupted,
):
    _, done = uninterrupted
    lines = [line for line in done.stdout.splitlines() if line.startswith("eps ")]
    assert len(lines) == EVALUATE["eps"]["num"] + 1, done.stdout  # the grid and 1.0
    for line in lines:
        for needle in ("points neither broken nor certified", "robust", "elapsed", "ETA"):
            assert needle in line, line
    # the last line: every number named, by radius (it printed raw numpy arrays, no PGD)
    last = next(line for line in reversed(done.stdout.splitlines()) if "standard radii" in line)
    assert re.fullmatch(
        rf"{VARIANT}: clean [\d.]+, Lipschitz bound \S+ \(empirical lower bound \S+\); robust "
        r"accuracy at the standard radii: certified 255/255 [\d.]+, 1020/255 [\d.]+; PGD "
        r"255/255 [\d.]+, 1020/255 [\d.]+; strongest attack 255/255 [\d.]+, 1020/255 [\d.]+",
        last,
    ), last
    with h5py.File(uninterrupted[0] / "eval.h5") as fh:
        assert fh.attrs["seconds_per_point_strong"] > 0
        assert (fh["standard_empirical"][()] < fh.attrs["clean_accuracy"]).any()  # attacks bite


def test_an_evaluation_killed_half_way_resumes_to_the_numbers_of_an_uninterrupted_run(
    trained, uninterrupted, tmp_path
):
    proc = subprocess.Popen(command(trained, tmp_path), stdout=subprocess.PIPE, text=True)
    wait_for_progress(proc, tmp_path / "work" / "progress.pt", 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "eval.h5").exists()
    resumed = run(trained, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    expected, got = numbers(uninterrupted[0] / "eval.h5"), numbers(tmp_path / "eval.h5")
    assert expected.keys() == got.keys()
    for key in expected:
        if key not in ("attr git_commit",):
            assert np.array_equal(expected[key], got[key]), (key, expected[key], got[key])


def test_sigterm_saves_the_evaluation_progress_and_exits_75(trained, tmp_path):
    proc = subprocess.Popen(
        command(trained, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_progress(proc, tmp_path / "work" / "progress.pt", 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert "progress" in err and "rerun to resume" in err and "Traceback" not in err


def test_a_stop_signal_during_the_evaluations_start_up_stops_it_with_its_line(
    trained, tmp_path, monkeypatch
):
    """SIGTERM while the model loaded or the clean pass ran (minutes at paper size on a CPU)
    killed the job silently (exit 143); it now stops at the sweep's first poll, saved."""
    from stablenets.evaluation import robustness
    from stablenets.interrupt import Interrupted

    clean_margins = robustness.clean_margins

    def signalled(*args, **kwargs):  # noqa: ANN202
        signal.raise_signal(signal.SIGTERM)
        return clean_margins(*args, **kwargs)

    def killed(signum, frame):  # noqa: ANN001, ANN202 (the default action, as an error here)
        raise AssertionError("the signal reached the default handler: the job was killed")

    monkeypatch.setattr(robustness, "clean_margins", signalled)
    previous = signal.signal(signal.SIGTERM, killed)
    spec, model, dataset = trained
    try:
        with pytest.raises(Interrupted, match="rerun to resume"):
            pipeline_jobs.evaluate_classifier(
                spec, model, dataset, tmp_path / "eval.h5", tmp_path / "work", log=lambda s: None
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (tmp_path / "work" / "progress.pt").exists() and not (tmp_path / "eval.h5").exists()


@pytest.mark.slow
def test_evalbench_compares_the_sweep_with_every_radius_on_a_smoke_model(smoke_run, tmp_path):
    """``python -m stablenets.bench.evaluation`` from the configs and a variant of ``make smoke``."""
    out = tmp_path / "compare.csv"
    override = {"n_test": 20, "eps": {"num": 5}, "strong": {"on_grid": True}}
    done = subprocess.run(
        [sys.executable, "-m", "stablenets.bench.evaluation", "--config", "config.yaml",
         "config/smoke.yaml", "--variant", "resnet", "--override", json.dumps(override),
         "--out", str(out)],
        cwd=smoke_run, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 + 4 - 1  # the grid and the standard radii (1.0 in both)
    for row in rows:  # at least as strong, up to one point of 20
        assert float(row["sweep"]) <= float(row["per_radius"]) + 1 / 20 + 1e-12, row
        assert float(row["certified"]) <= float(row["sweep"]) + 1e-12, row
    assert float(rows[0]["speedup"]) > 0 and "speedup" in done.stdout


@pytest.mark.slow
def test_evalbench_compares_the_sweep_in_float32_and_bfloat16_on_a_smoke_model(smoke_run, tmp_path):
    """``python -m stablenets.bench.evaluation --precision bfloat16``: both curves, both times."""
    out = tmp_path / "precision.csv"
    override = {"n_test": 20, "eps": {"num": 5}}
    done = subprocess.run(
        [sys.executable, "-m", "stablenets.bench.evaluation", "--config", "config.yaml",
         "config/smoke.yaml", "--variant", "nonexpansive", "--override", json.dumps(override),
         "--precision", "bfloat16", "--out", str(out)],
        cwd=smoke_run, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 + 4 - 1 and {"float32", "bfloat16", "float32_s", "bfloat16_s"} <= set(
        rows[0]
    )
    for row in rows:
        assert float(row["certified"]) <= float(row["bfloat16"]) <= float(row["float32"]) + 0.05
    assert "max_excess_pp" in done.stdout


@pytest.mark.slow
def test_pass_times_of_a_smoke_model_are_written_row_by_row_with_the_device(smoke_run, tmp_path):
    """``python -m stablenets.bench.evaluation --pass-times``, as the device script runs it."""
    out = tmp_path / "pass-times.csv"
    done = subprocess.run(
        [sys.executable, "-m", "stablenets.bench.evaluation", "--config", "config.yaml",
         "config/smoke.yaml", "--variant", "nonexpansive", "--pass-times", "2,4", "--out", str(out)],
        cwd=smoke_run, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["batch"], r["precision"], r["weights"]) for r in rows] == [
        ("2", "float32", "pinned"), ("4", "float32", "pinned"), ("2", "bfloat16", "pinned"),
        ("4", "bfloat16", "pinned"), ("2", "float32", "hashed"), ("4", "float32", "hashed"),
    ]  # fmt: skip
    assert all(r["device"] == "cpu" and float(r["forward_backward_s_per_image"]) > 0 for r in rows)
    assert done.stdout.count("device cpu  batch ") == len(rows)


def test_a_bfloat16_evaluation_is_within_one_point_of_float32_and_its_file_says_so(
    trained, uninterrupted, tmp_path
):
    spec, model, dataset = trained
    low = {**spec, "evaluate": {**spec["evaluate"], "precision": "bfloat16"}}
    done = run((low, model, dataset), tmp_path)
    assert done.returncode == 0, done.stderr
    expected, got = numbers(uninterrupted[0] / "eval.h5"), numbers(tmp_path / "eval.h5")
    assert got["attr attack_precision"] == "bfloat16"
    assert expected["attr attack_precision"] == "float32"
    assert np.array_equal(got["certified"], expected["certified"])
    # every counted example fools the float32 model; a cheaper search is at most a point weaker
    assert (got["empirical"] <= expected["empirical"] + 1 / EVALUATE["n_test"] + 1e-12).all()
    assert str(got["attr strong_method"]).endswith(", bfloat16 search")


def test_a_finished_evaluation_rerun_with_other_intervals_resumes_at_its_end(
    trained, uninterrupted, tmp_path
):
    """A finished job saved its sweep's last state and its Lipschitz bound: a rerun that
    Snakemake starts because a run-only setting changed (here ``log_every_s``, ``threads``)
    attacks and searches nothing and writes the same numbers. (An unreadable progress file is
    ignored: ``test_resume.test_progress_of_another_job_or_unreadable_...``.)"""
    shutil.copytree(uninterrupted[0] / "work", tmp_path / "work")
    spec, model, dataset = trained
    changed = {**spec, "threads": 2, "evaluate": {**spec["evaluate"], "log_every_s": 0.5}}
    done = run((changed, model, dataset), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout and " attack on points " not in done.stdout, done.stdout
    assert "Lipschitz search" in uninterrupted[1].stdout
    assert "Lipschitz search" not in done.stdout, done.stdout
    expected, got = numbers(uninterrupted[0] / "eval.h5"), numbers(tmp_path / "eval.h5")
    changed_attrs = {"attr git_commit", "attr config", "attr config_hash"}  # the spec's record
    differ = [
        k for k in expected if k not in changed_attrs and not np.array_equal(expected[k], got[k])
    ]
    assert not differ, [(k, expected[k], got[k]) for k in differ]


def test_a_resumed_sweep_whose_clean_predictions_differ_from_this_runs_writes_its_own_clean_accuracy(
    trained, uninterrupted, tmp_path
):
    """A rerun on another thread count (run-only) resumes the saved sweep, whose clean
    predictions may differ from this run's on points within rounding of the boundary (e5 of the
    review), simulated by a correct point marked misclassified in the saved state: the clean
    accuracy written and logged is the state's, which its curves count, and one line says on how
    many points the two differ."""
    shutil.copytree(uninterrupted[0] / "work", tmp_path / "work")
    path = tmp_path / "work" / "progress.pt"
    saved = torch.load(path, weights_only=True)
    state = saved["state"]
    i = int(torch.nonzero(state["correct"])[0])
    state["correct"][i] = False
    for key in ("certified_radius", "break_radius", "pgd_break_radius"):
        state[key][i] = 0.0  # as SweepState.start leaves a misclassified point
    torch.save(saved, path)
    spec, model, dataset = trained
    done = run(({**spec, "threads": 2}, model, dataset), tmp_path)
    assert done.returncode == 0, done.stderr
    n = EVALUATE["n_test"]
    assert f"clean predictions differ from this run's on 1 of {n} points" in done.stdout
    clean = float(state["correct"].double().mean())
    assert done.stdout.count(f"clean {clean:.4f}") == 2, done.stdout  # both lines that say it
    with h5py.File(tmp_path / "eval.h5") as fh, h5py.File(uninterrupted[0] / "eval.h5") as ref:
        assert fh.attrs["clean_accuracy"] == clean
        assert clean == pytest.approx(ref.attrs["clean_accuracy"] - 1 / n, abs=1e-12)
        assert fh["empirical"][0] <= clean


def test_saved_progress_resumes_whatever_the_saving_and_logging_intervals_and_graphs():
    spec = json.loads(smoke_jobs().eval_spec("classification", VARIANT, 0))
    run_only = dict(save_every_s=600, log_every_s=1, cuda_graphs=True, cuda_graph_max_batch=64)
    slower = {**spec, "evaluate": {**spec["evaluate"], **run_only}}
    other = {**spec, "evaluate": {**spec["evaluate"], "n_test": 7}}
    assert pipeline_jobs._progress_hash(slower) == pipeline_jobs._progress_hash(spec)
    assert pipeline_jobs._progress_hash(other) != pipeline_jobs._progress_hash(spec)


def test_out_of_memory_keeps_the_progress_and_says_which_batch_size_to_lower(
    trained, uninterrupted, tmp_path, monkeypatch, capsys
):
    """Progress is kept even when the last save was long ago (``save_every_s`` here far
    above the run's length): the rerun resumes from the batch that ran out of memory."""
    spec, model, dataset = trained
    rare_saves = {**spec, "evaluate": {**spec["evaluate"], "save_every_s": 1.0e6}}
    real, calls = radius_sweep._attack_batch, []

    def attack_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real(*args, **kwargs)

    monkeypatch.setattr(radius_sweep, "_attack_batch", attack_batch)
    argv = command(trained, tmp_path)[3:]
    argv[argv.index("--spec") + 1] = json.dumps(rare_saves)
    assert cli.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [
        "stablenets evaluate-classifier: error: out of memory (CUDA, tried to allocate 2.00 GiB): "
        f"lower classification.evaluate.batch_size (now {spec['evaluate']['batch_size']}); what "
        "the job saved is kept, and a rerun resumes from it unless it changes "
        "classification.evaluate.batch_size, which starts it again"
    ]
    saved = torch.load(tmp_path / "work" / "progress.pt", weights_only=True)["state"]
    assert sum(saved["points"].values()) > 0
    monkeypatch.undo()
    resumed = run(trained, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    expected, got = numbers(uninterrupted[0] / "eval.h5"), numbers(tmp_path / "eval.h5")
    assert all(np.array_equal(expected[k], got[k]) for k in expected if k != "attr git_commit")
