"""Training: kill and resume gives the uninterrupted result; signals checkpoint; divergence and
foreign checkpoints are handled loudly; augmentation is batched and seeded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from stablenets import data
from stablenets.augment import AugmentConfig, augment
from stablenets.models import read_checkpoint

SPEC = {
    "task": "classification",
    "variant": "tiny",
    "model": "nonexpansive_classifier",
    "kwargs": {"base_width": 4, "stages": 2, "blocks_per_stage": 1},
    "train": {
        "steps": 40,
        "batch_size": 16,
        "lr_max": 0.05,
        "val_every": 20,
        "checkpoint_every": 5,
        "log_every": 5,
    },
    "augment": {"crop_padding": 2, "flip": True, "erase_p": 0.5},
    "eval_batch": 100,
    "seed": 0,
    "device": "cpu",
    "threads": 1,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cifar.h5"
    data.make_synthetic_classification(path, 200, 50, 50, 10, 32, 0.05, 0)
    return path


def command(spec: dict, dataset: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "stablenets", "train", "--spec", json.dumps(spec),
        "--data", str(dataset), "--model", str(out / "model.pt"), "--log", str(out / "log.csv"),
        "--workdir", str(out / "work"),
    ]  # fmt: skip


def run(spec: dict, dataset: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(spec, dataset, out), capture_output=True, text=True, timeout=600)


def state(out: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(out / "model.pt")["state_dict"]


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, step: int) -> None:
    """Wait until the resume checkpoint has passed ``step`` (the process is still running)."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            try:
                if read_checkpoint(path)["run"]["step"] >= step:
                    return
            except Exception:  # noqa: BLE001 - the file is being replaced; try again
                pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared before the process ended")


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    done = run(SPEC, dataset, out)
    assert done.returncode == 0, done.stderr
    return out


def test_sigkill_then_rerun_resumes_and_matches_the_uninterrupted_run(
    dataset, uninterrupted, tmp_path
):
    proc = subprocess.Popen(command(SPEC, dataset, tmp_path), stdout=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, tmp_path / "work" / "checkpoint.pt", 25)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "model.pt").exists()
    resumed = run(SPEC, dataset, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = state(uninterrupted), state(tmp_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        pd.read_csv(out / "log.csv").drop(columns="images_per_s")
        for out in (tmp_path, uninterrupted)
    ]
    pd.testing.assert_frame_equal(*logs)  # the same log, wall-clock speed aside


def test_sigusr1_writes_a_checkpoint_and_exits_75(dataset, tmp_path):
    spec = {**SPEC, "train": {**SPEC["train"], "checkpoint_every": 1000}}
    proc = subprocess.Popen(
        command(spec, dataset, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:  # the first validation line: the loop (and its handler) is running
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert "rerun to resume" in err
    assert read_checkpoint(tmp_path / "work" / "checkpoint.pt")["run"]["step"] > 0


def test_checkpoint_from_another_config_is_ignored_with_a_log_line(
    dataset, uninterrupted, tmp_path
):
    proc = subprocess.Popen(command(SPEC, dataset, tmp_path), stdout=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, tmp_path / "work" / "checkpoint.pt", 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    other = {**SPEC, "train": {**SPEC["train"], "steps": 20}}
    done = run(other, dataset, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ignoring checkpoint" in done.stdout and "resumed" not in done.stdout


def test_divergence_stops_with_the_step_and_last_checkpoint(dataset, tmp_path):
    spec = {
        **SPEC,
        "model": "resnet_classifier",
        "train": {**SPEC["train"], "lr_max": 1.0e6, "warmup": 0.1},
    }
    done = run(spec, dataset, tmp_path)
    assert done.returncode == 1
    assert "training diverged at step" in done.stderr and "last good checkpoint" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "model.pt").exists()


def test_augmentation_is_seeded_batched_and_shape_preserving():
    x = torch.rand(32, 3, 32, 32)
    cfg = AugmentConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(1))
    b = augment(x, cfg, torch.Generator().manual_seed(1))
    c = augment(x, cfg, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    only_erase = augment(x, AugmentConfig(crop_padding=0, flip=False), torch.Generator())
    erased = (only_erase == 0).flatten(1).float().mean(1)
    assert 0.3 < (erased > 0.02).float().mean() < 0.95  # about half the images have a hole
    shifted = augment(x, AugmentConfig(flip=False, erase_p=0.0), torch.Generator().manual_seed(0))
    assert not torch.equal(shifted, x)  # cropping moved at least one image
