"""Saved progress (``stablenets.pipeline.resume``) and the deblurring and denoising evaluation
jobs that resume from it: killed, rerun, the same numbers."""

from __future__ import annotations

import copy
import errno
import json
import os
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
from conftest import fail_torch_load_once
from snakemake.utils import update_config

from stablenets import data
from stablenets.interrupt import Interrupted, StopFlag
from stablenets.nn.models import build_model, save_model
from stablenets.pipeline.config import validate_config
from stablenets.pipeline.resume import SavedProgress, in_groups
from stablenets.pipeline.specs import Jobs

ROOT = Path(__file__).resolve().parents[1]

# ----- SavedProgress and in_groups --------------------------------------------------------------


def test_every_assignment_is_saved_and_read_back_by_a_rerun_of_the_same_job(tmp_path):
    path, lines = tmp_path / "work" / "progress.pt", []
    saved = SavedProgress(path, "job-a", lines.append)
    assert len(saved) == 0 and not path.exists()
    saved["state"] = {"radius_index": 3, "points": torch.arange(4)}
    scores = saved.section("validation")
    scores[0.001] = 29.5  # weights as keys
    groups = saved.section("groups")
    groups[20] = {"psnr_final": torch.tensor([30.0, 31.0])}  # first images as keys
    again = SavedProgress(path, "job-a", lines.append)
    assert again["state"]["radius_index"] == 3
    assert torch.equal(again["state"]["points"], torch.arange(4))
    assert dict(again.section("validation")) == {0.001: 29.5}
    assert torch.equal(again.section("groups")[20]["psnr_final"], torch.tensor([30.0, 31.0]))
    assert lines == []
    del again.section("validation")[0.001]
    assert dict(SavedProgress(path, "job-a", lines.append).section("validation")) == {}


def test_progress_of_other_settings_is_ignored_naming_the_settings_that_changed(tmp_path):
    """The line gave two hashes alone: a user who changed one setting could not tell which one
    threw a finished sweep away, nor that the file would be overwritten."""
    path, lines = tmp_path / "progress.pt", []
    settings = {"seed": 0, "evaluate": {"eps": {"num": 10, "stop": 1.0}, "n_test": 100}}
    SavedProgress(path, "h1", lines.append, settings=settings)["state"] = 1
    again = SavedProgress(path, "h1", lines.append, settings=settings)
    assert dict(again) == {"state": 1} and lines == []  # the settings are no entry
    other = {"seed": 0, "evaluate": {"eps": {"num": 12, "stop": 1.0}, "n_test": None}}
    assert len(SavedProgress(path, "h2", lines.append, settings=other)) == 0
    assert lines == [
        f"ignoring {path} (settings changed: evaluate.eps.num, evaluate.n_test; this run is h2): "
        "starting afresh, the file is replaced at the first save"
    ]


def test_progress_of_another_job_or_unreadable_or_half_written_is_ignored_with_a_log_line(
    tmp_path,
):
    path, lines = tmp_path / "progress.pt", []
    SavedProgress(path, "job-a", lines.append)["state"] = 1
    assert len(SavedProgress(path, "job-b", lines.append)) == 0
    assert lines == [
        f"ignoring {path} (written for job-a; this run is job-b): starting afresh, the file is "
        "replaced at the first save"
    ]
    path.write_bytes(b"not a torch file")
    lines.clear()
    assert len(SavedProgress(path, "job-a", lines.append)) == 0
    assert lines[0].startswith(f"ignoring unreadable {path}")
    torch.save([1, 2], path)  # a file, but not of this layout
    lines.clear()
    assert len(SavedProgress(path, "job-a", lines.append)) == 0 and "written for list" in lines[0]
    stale = tmp_path / ".progress.pt.abc.tmp"  # what a writer killed mid-write leaves
    stale.write_bytes(b"partial")
    lines.clear()
    SavedProgress(path, "job-a", lines.append)
    assert not stale.exists() and "removed .progress.pt.abc.tmp" in lines[0]


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.EIO, "Input/output error"), OSError(errno.EACCES, "Permission denied"),
     MemoryError()],
    ids=["EIO", "EACCES", "MemoryError"],
)  # fmt: skip
def test_progress_the_machine_fails_to_read_stops_the_job_and_is_kept_but_a_truncated_file_not(
    tmp_path, monkeypatch, failure
):
    """A read of a job's progress file that fails on the machine's side (a network file
    system's I/O error, permissions, memory) raises (an ``OSError`` in one line naming the
    file) and leaves the file for the next rerun, which resumes from it; a truncated file
    (whatever torch raises for it) is ignored with a log line, as before."""
    path, lines = tmp_path / "progress.pt", []
    SavedProgress(path, "job-a", lines.append)["state"] = {"done": torch.arange(100)}
    saved = path.read_bytes()
    fail_torch_load_once(monkeypatch, failure)
    with pytest.raises(type(failure)) as err:
        SavedProgress(path, "job-a", lines.append)
    if isinstance(failure, OSError):
        assert err.value.errno == failure.errno and str(path) in str(err.value)
        assert len(str(err.value).splitlines()) == 1, str(err.value)
    assert path.read_bytes() == saved and lines == []
    again = SavedProgress(path, "job-a", lines.append)
    assert torch.equal(again["state"]["done"], torch.arange(100)) and lines == []
    for cut in (0, len(saved) // 2, len(saved) - 1):
        path.write_bytes(saved[:cut])
        assert len(SavedProgress(path, "job-a", lines.append)) == 0
        assert lines.pop().startswith(f"ignoring unreadable {path}: "), cut


def test_a_stop_signal_ends_the_job_at_its_next_stop_point_with_everything_saved(tmp_path):
    path = tmp_path / "progress.pt"
    with StopFlag() as stop:
        saved = SavedProgress(path, "job", print, stop)
        saved.section("groups")[0] = torch.ones(2)
        saved.stop_point()  # no signal yet: goes on
        os.kill(os.getpid(), signal.SIGTERM)
        saved.section("groups")[2] = torch.zeros(2)  # a save does not stop the job
        with pytest.raises(Interrupted, match=f"progress {path} written; rerun to resume"):
            saved.stop_point()
    assert sorted(SavedProgress(path, "job", print).section("groups")) == [0, 2]


@pytest.mark.parametrize("signalled", [1, 2])
def test_a_signal_during_a_group_stops_before_the_next_and_during_the_last_lets_it_finish(
    tmp_path, signalled
):
    path, calls = tmp_path / "progress.pt", []

    def solve(group: slice) -> dict[str, torch.Tensor]:
        calls.append(group.start)
        if len(calls) == signalled:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"index": torch.arange(group.start, group.stop)}

    with StopFlag() as stop:
        progress = SavedProgress(path, "job", print, stop)
        if signalled == 1:
            with pytest.raises(Interrupted):
                in_groups(progress, 4, 2, solve, "test", print)
        else:
            assert np.array_equal(in_groups(progress, 4, 2, solve, "test", print)["index"],
                                  np.arange(4))  # fmt: skip
    assert calls == [0, 2][:signalled]
    assert sorted(SavedProgress(path, "job", print).section("groups")) == calls


def test_in_groups_solves_only_the_groups_a_killed_run_did_not_save(tmp_path):
    path, calls = tmp_path / "progress.pt", []

    def solve(group: slice) -> dict[str, torch.Tensor]:
        calls.append(group.start)
        if group.start == 6 and len(calls) == 3:  # the first run dies in its third group
            raise KeyboardInterrupt
        squares = torch.arange(group.start, group.stop, dtype=torch.float64) ** 2
        history = torch.ones(len(squares), 1 + group.start // 3)  # each group's own length
        return {"squares": squares, "history": history}

    with pytest.raises(KeyboardInterrupt):
        in_groups(SavedProgress(path, "job", print), 10, 3, solve, "test", print)
    lines: list[str] = []
    results = in_groups(SavedProgress(path, "job", print), 10, 3, solve, "test", lines.append)
    assert calls == [0, 3, 6, 6, 9]
    assert np.array_equal(results["squares"], np.arange(10.0) ** 2)
    history = results["history"]  # joined, padded with NaN to the longest group's
    assert history.shape == (10, 4) and np.isnan(history[:3, 1:]).all()
    assert (history[9] == 1).all() and np.array_equal(np.isnan(history[6]), [0, 0, 0, 1])
    assert lines[0] == f"test: resuming from {path}, 2 of 4 image groups saved"
    assert [line.split(",")[0] for line in lines[1:]] == [
        "test: images 7-9 of 10 done",
        "test: images 10-10 of 10 done",
    ]
    assert all("elapsed" in line and "ETA" in line for line in lines[1:])
    lines.clear()  # the same progress read by a run with groups of 4: nothing of it is reused
    again = in_groups(SavedProgress(path, "job", print), 10, 4, solve, "test", lines.append)
    assert calls[5:] == [0, 4, 8] and np.array_equal(again["squares"], results["squares"])
    assert lines[0] == f"test: ignoring the groups of 3 images saved in {path}: this run's " \
        "groups have 4"  # fmt: skip


# ----- the PnP, TV and denoiser evaluation jobs, killed and rerun -------------------------------------------------

# Each group takes about a second on one thread, so that the kill lands between groups.
PNP = {"n_images": 6, "group_size": 2, "n_show": 3, "max_iter": 60, "tol": 1.0e-12,
       "val_images": 2, "strengths": [1.0, 0.3], "tv": {"iters": 150, "tol": 1.0e-12}}  # fmt: skip


def smoke_jobs(overrides: dict) -> Jobs:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    update_config(config, yaml.safe_load((ROOT / "config/smoke.yaml").read_text()))
    update_config(config, {"threads": 1, **overrides})
    return Jobs(validate_config(config, ROOT / "workflow/schemas/config.schema.yaml"))


# (setting changed, whether it changes the PnP job's spec, whether the TV baseline's)
DEBLUR_SETTINGS = [
    ({"pnp": {"eta": 0.5}}, True, False),
    ({"pnp": {"max_iter": 10}}, True, False),
    ({"pnp": {"tv": {"weights": [0.001]}}}, False, True),
    ({"pnp": {"tv": {"iters": 10}}}, False, True),
    ({"pnp": {"noise": 0.02}}, True, True),
    ({"pnp": {"n_images": 5}}, True, True),
    ({"pnp": {"denoisers": ["averaged"]}}, False, False),  # another list: no job's numbers
]


@pytest.mark.parametrize(("change", "pnp_changes", "tv_changes"), DEBLUR_SETTINGS)
def test_a_deblurring_setting_reruns_only_the_jobs_it_concerns(change, pnp_changes, tv_changes):
    """A PnP or TV baseline spec holds what its job reads: a PnP setting reruns the PnP jobs
    alone, a TV one the baseline alone, the problem's both, and every ``pnp`` key is read by
    one of them or names which jobs run."""
    before, after = smoke_jobs({}), smoke_jobs(change)
    pnp, tv = (lambda j: j.pnp_spec("averaged", 0, "0.15")), (lambda j: j.pnp_spec("tv", 0))
    assert (pnp(before) != pnp(after), tv(before) != tv(after)) == (pnp_changes, tv_changes)
    read = {*json.loads(pnp(before))["pnp"], *json.loads(tv(before))["pnp"]}
    assert read | {"denoisers", "noise_level"} == set(before.config["pnp"])


def test_a_group_size_change_keeps_the_scores_and_search_saved_beside_the_groups():
    """The group size (what an out-of-memory line tells a user to lower) was in the saved
    progress's key: lowering it threw away PnP's strength and TV's weight validation scores
    and the denoiser's Lipschitz search, hours at paper size, where only the groups (saved by
    their size, ``in_groups``) need solving again."""
    from stablenets.pipeline.jobs import _progress_hash

    def specs(jobs: Jobs) -> list[str]:
        return [jobs.pnp_spec("averaged", 0, "0.15"), jobs.pnp_spec("tv", 0), jobs.tv_spec("0.15"),
                jobs.eval_spec("denoising", "averaged", 0, "0.15")]  # fmt: skip

    smaller = {"pnp": {"group_size": 1}, "denoising": {"evaluate": {"group_size": 1},
                                                       "tv": {"group_size": 1}}}  # fmt: skip
    pairs = list(zip(specs(smoke_jobs({})), specs(smoke_jobs(smaller)), strict=True))
    assert all(before != after for before, after in pairs)  # Snakemake reruns each job
    for before, after in pairs:
        assert _progress_hash(json.loads(before)) == _progress_hash(json.loads(after))


DATA_SETTINGS = [  # (change, whether it changes the smoke data jobs' specs)
    ({"data": {"cifar10": {"val_fraction": 0.1, "split_seed": 3, "md5": None}}}, False),
    ({"data": {"bsds500": {"size": [300, 400], "archive": "other.tgz"}}}, False),
    ({"data": {"cifar10": {"synthetic": {"noise": 0.1}}}}, True),
    ({"data": {"bsds500": {"photos": {"seed": 1}}}}, True),
]


@pytest.mark.parametrize(("change", "changes"), DATA_SETTINGS)
def test_a_data_setting_of_the_other_source_reruns_no_data_job(change, changes):
    """A stand-in's data job reads its own section alone: the real archive's settings (split,
    checksum, crop) change neither its spec nor, through its file, any job after it; and the
    other way round."""
    before, after = smoke_jobs({}), smoke_jobs(change)
    specs = [(j.data_spec("cifar10"), j.data_spec("bsds500")) for j in (before, after)]
    assert (specs[0] != specs[1]) == changes
    paper = copy.deepcopy(before.config)
    for name in ("cifar10", "bsds500"):
        paper["data"][name]["source"] = "download"
        downloaded = json.loads(Jobs(paper).data_spec(name))
        assert {"synthetic", "photos", "urls"}.isdisjoint(downloaded), downloaded


@pytest.fixture(scope="module")
def deblurring(tmp_path_factory) -> dict:
    """BSDS-like photos, an (untrained) averaged smoke denoiser and the jobs' specs."""
    out = tmp_path_factory.mktemp("deblurring")
    # the denoiser's groups take milliseconds: its kill waits for its Lipschitz search's first
    # save (a kill within its groups: test_a_denoiser_evaluation_resumes_after_its_last_...)
    evaluate = {"group_size": 2, "lipschitz_search": {"steps": 25}}
    jobs = smoke_jobs({"pnp": PNP, "denoising": {"tv": {"val_images": 3, "group_size": 2},
                                                 "evaluate": evaluate}})  # fmt: skip
    photos = out / "bsds500.h5"
    data.make_smoke_photos(photos, (48, 64), 4, 4, 6, 0)
    torch.manual_seed(0)
    variant = jobs.config["denoising"]["variants"]["averaged"]
    model = out / "model.pt"
    save_model(build_model(variant["model"], **variant["kwargs"]), model)
    return {
        "pnp": (json.loads(jobs.pnp_spec("averaged", 0, "0.05")), ["--model", str(model)]),
        "tv-deblur": (json.loads(jobs.pnp_spec("tv", 0)), []),
        "evaluate-tv": (json.loads(jobs.tv_spec("0.05")), []),
        "evaluate-denoiser": (
            json.loads(jobs.eval_spec("denoising", "averaged", 0, "0.05")),
            ["--model", str(model)],
        ),
        "data": photos,
    }


def command(deblurring: dict, job: str, out: Path) -> list[str]:
    spec, model = deblurring[job]
    return [
        sys.executable, "-m", "stablenets", job, "--spec", json.dumps(spec), *model,
        "--data", str(deblurring["data"]), "--out", str(out / "result.h5"),
        "--workdir", str(out / "work"),
    ]  # fmt: skip


def weights(deblurring: dict, job: str) -> list[float]:
    spec = deblurring[job][0]
    if job == "pnp":
        return spec["pnp"]["strengths"]
    return (spec["tv"] if job == "evaluate-tv" else spec["pnp"]["tv"])["weights"]


def run(deblurring: dict, job: str, out: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command(deblurring, job, out), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done


def numbers(path: Path) -> dict[str, np.ndarray]:
    """Every dataset and attribute of a result file but the machine's (time, commit)."""
    with h5py.File(path) as fh:
        found = {}
        fh.visititems(lambda k, v: found.update({k: v[()]}) if isinstance(v, h5py.Dataset) else 0)
        found.update({f"attr {k}": v for k, v in fh.attrs.items()})
    return {k: v for k, v in found.items() if k != "attr git_commit"}


@pytest.fixture(scope="module")
def uninterrupted(deblurring, tmp_path_factory):
    """The result file of an uninterrupted run of a job, run once per job."""
    done: dict[str, Path] = {}

    def result(job: str) -> Path:
        if job not in done:
            out = tmp_path_factory.mktemp(job)
            assert "found before" not in run(deblurring, job, out).stdout
            done[job] = out / "result.h5"
        return done[job]

    return result


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal arrays, NaN equal to NaN where the values are numbers."""
    try:
        return np.array_equal(a, b, equal_nan=True)
    except TypeError:  # strings
        return np.array_equal(a, b)


def progress_file(section: str) -> str:
    """Where a job saves ``section``: its choice on validation images apart from the rest."""
    return "validation.pt" if section == "validation" else "progress.pt"


def saved_entries(path: Path, section: str) -> int:
    try:
        return len(torch.load(path, weights_only=True)[section])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError, OSError):
        return 0


def kill_when_saved(proc: subprocess.Popen, path: Path, section: str, count: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if saved_entries(path, section) >= count:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    raise AssertionError(f"the job ended before it saved {count} entries of {section}")


@pytest.mark.parametrize(
    ("job", "section", "count"),
    [("pnp", "validation", 1), ("pnp", "groups", 1), ("tv-deblur", "validation", 2),
     ("tv-deblur", "groups", 1),
     ("evaluate-tv", "validation", 2), ("evaluate-tv", "groups", 1),
     ("evaluate-denoiser", "lipschitz_search", 1)],
)  # fmt: skip
def test_a_deblurring_or_denoising_job_killed_half_way_resumes_to_the_numbers_of_an_uninterrupted_run(
    deblurring, uninterrupted, job, section, count, tmp_path
):
    proc = subprocess.Popen(command(deblurring, job, tmp_path), stdout=subprocess.DEVNULL)
    kill_when_saved(proc, tmp_path / "work" / progress_file(section), section, count)
    assert not (tmp_path / "result.h5").exists()
    resumed = run(deblurring, job, tmp_path)
    if job == "tv-deblur":  # tol 1e-12: every image runs to the cap, and the log says so
        assert "(6 of 6 images stopped at pnp.tv.iters, not at tol)" in resumed.stdout
    if section == "groups":
        assert "image groups saved" in resumed.stdout, resumed.stdout
    elif section == "lipschitz_search":  # killed in its search, after every group
        assert "Lipschitz search: resuming at step" in resumed.stdout, resumed.stdout
        assert "of 3 image groups saved" in resumed.stdout, resumed.stdout
    else:
        assert f"of {len(weights(deblurring, job))} scores found before" in resumed.stdout
    expected, got = numbers(uninterrupted(job)), numbers(tmp_path / "result.h5")
    # what this run computed (its cost): less than the whole job's
    counts = {"image_iterations_run", "image_solves_run", "tv_validation_image_iterations_run",
              "validation_image_iterations_run", "test_images_run"}  # fmt: skip
    run_only = {f"attr {k}" for k in counts} & set(expected)
    assert run_only and all(got[k] < expected[k] for k in run_only), run_only
    assert_same_but(expected, got, run_only)


RUN_TIMES = {"attr denoising_s_run", "attr deblur_s_run"}  # clocks: never equal twice


def assert_same_but(expected: dict, got: dict, run_only: set[str]) -> None:
    assert expected.keys() == got.keys()
    differ = [
        k for k in expected if k not in run_only | RUN_TIMES and not same(expected[k], got[k])
    ]
    assert not differ, [(k, expected[k], got[k]) for k in differ]


def test_a_denoiser_evaluation_resumes_after_its_last_saved_group_then_searches_its_bound(
    deblurring, uninterrupted, tmp_path
):
    """Its groups take milliseconds, so the SIGKILL above lands after them, in its Lipschitz
    search: here the progress file an uninterrupted run left is cut back to one of its three
    groups, no search and no bound, as a kill in its second group leaves it."""
    done = uninterrupted("evaluate-denoiser")
    expected = numbers(done)
    shutil.copytree(done.parent / "work", tmp_path / "work")
    path = tmp_path / "work" / "progress.pt"
    saved = torch.load(path, weights_only=True)
    assert sorted(saved["groups"]) == [0, 2, 4] and "empirical_lipschitz" in saved
    assert "lipschitz_search" not in saved  # its state leaves once the bound is saved
    del saved["empirical_lipschitz"]
    saved["groups"] = {0: saved["groups"][0]}
    torch.save(saved, path)
    resumed = run(deblurring, "evaluate-denoiser", tmp_path).stdout
    assert "denoiser: resuming from" in resumed and "1 of 3 image groups saved" in resumed
    assert "Lipschitz search step" in resumed and "search: resuming" not in resumed, resumed
    got = numbers(tmp_path / "result.h5")
    assert (expected["attr test_images_run"], got["attr test_images_run"]) == (6, 4)
    assert_same_but(expected, got, {"attr test_images_run"})


def test_other_lipschitz_search_settings_redo_the_search_alone_and_keep_the_image_groups(
    deblurring, uninterrupted, tmp_path
):
    """Out of memory in its search, the job's line advises fewer search images: the rerun with
    them keeps every saved image group (hours at paper size) and searches again."""
    done = uninterrupted("evaluate-denoiser")
    shutil.copytree(done.parent / "work", tmp_path / "work")
    spec, model = deblurring["evaluate-denoiser"]
    search = {**spec["evaluate"]["lipschitz_search"], "images": 1}
    fewer = {**spec, "evaluate": {**spec["evaluate"], "lipschitz_search": search}}
    rerun = run({**deblurring, "evaluate-denoiser": (fewer, model)}, "evaluate-denoiser", tmp_path)
    assert "3 of 3 image groups saved" in rerun.stdout, rerun.stdout
    assert "the Lipschitz search's settings changed: searching again" in rerun.stdout
    assert "Lipschitz search step" in rerun.stdout and "search: resuming" not in rerun.stdout
    expected, got = numbers(done), numbers(tmp_path / "result.h5")
    assert got["attr test_images_run"] == 0
    changed = {k for k in expected if k not in RUN_TIMES and not same(expected[k], got[k])}
    provenance = {"attr config", "attr config_hash"}  # the spec it ran with
    assert changed == {"attr test_images_run", "attr empirical_lipschitz", *provenance}, changed


TEST_ONLY = [  # (job, a change of its test images' settings or of its candidates)
    ("evaluate-tv", lambda s: {**s, "evaluate": {**s["evaluate"], "n_test": 4, "crops": 1}}),
    ("evaluate-tv", lambda s: {**s, "tv": {**s["tv"], "weights": [*s["tv"]["weights"], 0.5]}}),
    ("evaluate-tv", lambda s: {**s, "tv": {**s["tv"], "weights": s["tv"]["weights"][:2]}}),
    ("pnp", lambda s: {**s, "pnp": {**s["pnp"], "n_images": 4, "n_show": 1, "seed": 9}}),
    ("tv-deblur", lambda s: {**s, "pnp": {**s["pnp"], "n_images": 4}}),
]


@pytest.mark.parametrize(("job", "change"), TEST_ONLY)
def test_a_change_of_the_test_images_settings_keeps_the_validation_scores_found(
    deblurring, uninterrupted, job, change, tmp_path
):
    """The scores of a TV weight's or PnP strength's choice were saved under a key of the whole
    spec: another ``n_test``, ``crops`` or candidate weight (what the job's own log line tells
    a user to widen) solved every candidate again, hours at paper size."""
    done = uninterrupted(job)
    shutil.copytree(done.parent / "work", tmp_path / "work")
    spec, model = deblurring[job]
    changed = change(spec)
    rerun = run({**deblurring, job: (changed, model)}, job, tmp_path).stdout
    now = weights({job: (changed, model)}, job)
    found = len(set(now) & set(weights(deblurring, job)))
    assert f"{found} of {len(now)} scores found before" in rerun
    if job == "evaluate-tv":  # this run's solves (its cost): the new candidates' and the tests'
        with h5py.File(tmp_path / "result.h5") as fh:
            solved, tests = int(fh.attrs["image_solves_run"]), len(fh["psnr"])
        assert solved == (len(now) - found) * changed["tv"]["val_images"] + tests
    # what the scores depend on starts them again
    key = "val_images"
    section = "tv" if job == "evaluate-tv" else "pnp"
    other = {**changed, section: {**changed[section], key: changed[section][key] - 1}}
    again = run({**deblurring, job: (other, model)}, job, tmp_path).stdout
    assert "scores found before" not in again, again


def test_the_deblurring_jobs_log_a_line_per_group_and_pnp_checks_every_image(deblurring, tmp_path):
    done = run(deblurring, "pnp", tmp_path)
    groups = [line for line in done.stdout.splitlines() if line.startswith("PnP: images")]
    assert [line.split(",")[0] for line in groups] == [
        f"PnP: images {i}-{i + 1} of 6 done" for i in (1, 3, 5)
    ]
    with h5py.File(tmp_path / "result.h5") as fh:
        assert fh["history/step_norm"].shape[0] == 6 and fh["images/recon"].shape[0] == 3
        assert fh.attrs["nonincreasing"] and (fh["iterations"][()] == PNP["max_iter"]).all()


def sigterm_when_saved(deblurring: dict, job: str, section: str, out: Path) -> tuple[Path, str]:
    """Runs ``job``, sends it SIGTERM once its progress file holds an entry of ``section``, and
    checks it exits 75 without a traceback; its progress file and stderr."""
    proc = subprocess.Popen(
        command(deblurring, job, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    path = out / "work" / progress_file(section)
    deadline = time.time() + 300
    while saved_entries(path, section) < 1 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75 and "Traceback" not in err, err
    return path, err


def test_sigterm_stops_a_deblurring_job_before_its_next_unit_with_exit_75(deblurring, tmp_path):
    path, err = sigterm_when_saved(deblurring, "tv-deblur", "validation", tmp_path)
    assert f"progress {path} written; rerun to resume" in err
    assert 2 <= saved_entries(path, "validation") < len(weights(deblurring, "tv-deblur"))


def test_sigterm_in_a_denoisers_lipschitz_search_saves_its_state_and_names_the_progress_file(
    deblurring, tmp_path
):
    path, err = sigterm_when_saved(deblurring, "evaluate-denoiser", "lipschitz_search", tmp_path)
    stopped = "the Lipschitz search stopped after step [0-9]+ of 26, its state saved in "
    assert re.search(stopped + re.escape(f"{path}; rerun to resume"), err), err
    saved = torch.load(path, weights_only=True)
    assert "empirical_lipschitz" not in saved and saved["lipschitz_search"]["state"]["step"] > 0
