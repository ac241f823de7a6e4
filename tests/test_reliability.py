"""Reliability: no lost work, no silent nonsense, clear errors on bad input.

One section per row group of README's "Guarantees" table. Every test does the bad thing for real:
a SIGKILL to a running training process (also in the middle of a checkpoint write), a real NaN
and a real exploding norm, malformed configurations, truncated, foreign and malicious files,
hostile archives, concurrent jobs writing into one results tree and one download cache.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import http.server
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_data import add_bytes, add_special, leftovers, make_cifar_archive, md5_of
from test_pipeline import archive_overlay
from workflow_helpers import (
    BIN,
    ROOT,
    SMOKE_PROFILE,
    SNAKEMAKE,
    copy_workflow,
    local_env,
    snakemake,
    training_processes,
)

from stablenets import atomic, data
from stablenets.nn.models import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    build_model,
    load_model,
    read_checkpoint,
    save_model,
)
from stablenets.pipeline import cli, locks, runtime
from stablenets.pipeline import jobs as pipeline_jobs
from stablenets.pipeline.config import (
    ConfigError,
    check_spec,
    load_config,
    load_schema,
    overlay,
    snakemake_files,
    validate_config,
)
from stablenets.pipeline.runtime import (
    config_hash,
    provenance,
    read_results,
    sidecar_path,
    write_results,
)
from stablenets.pipeline.specs import Jobs
from stablenets.train.memory import is_out_of_memory

SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
PROVENANCE_KEYS = ("config_hash", "seed", "versions", "git_commit")

SPEC = {
    "task": "classification",
    "variant": "tiny",
    "model": "nonexpansive_classifier",
    "kwargs": {"base_width": 4, "stages": 2, "blocks_per_stage": 1, "input_size": 16},
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
    data.make_synthetic_classification(path, 200, 50, 50, 10, 16, 0.05, 0)
    return path


def train_args(spec: dict, dataset: Path, out: Path) -> list[str]:
    return [
        "train", "--spec", json.dumps(spec), "--data", str(dataset),
        "--model", str(out / "model.pt"), "--log", str(out / "log.csv"),
        "--workdir", str(out / "work"),
    ]  # fmt: skip


def command(spec: dict, dataset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "stablenets", *train_args(spec, dataset, out)]


def run(spec: dict, dataset: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(spec, dataset, out), capture_output=True, text=True, timeout=600)


def state(out: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(out / "model.pt")["state_dict"]


def assert_same_training(a: Path, b: Path, log_b: str = "log.csv") -> None:
    """Bit-identical weights and the same log (wall-clock speed aside)."""
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    logs = [pd.read_csv(a / "log.csv"), pd.read_csv(b / log_b)]
    pd.testing.assert_frame_equal(*(log.drop(columns="images_per_s") for log in logs))


# A process that imports stablenets once and forks one training process per request (a fork is
# a real process: SIGKILL ends it like any other). Its ``torch.save`` writes the same bytes in
# 4 KiB pieces with short pauses, a slow disk, so that kills land inside checkpoint writes.
FORK_SERVER = r"""
import io, json, os, sys, time
import torch
from stablenets.pipeline import cli, jobs  # cli imports the job's module when it runs

_save = torch.save

def slow_save(obj, f, **kwargs):
    buffer = io.BytesIO()
    _save(obj, buffer, **kwargs)
    payload = buffer.getvalue()
    with open(f, "wb") as fh:
        for i in range(0, len(payload), 4096):
            fh.write(payload[i : i + 4096])
            fh.flush()
            time.sleep(0.002)

torch.save = slow_save
torch.set_num_threads(1)  # as the jobs do; no thread pool exists at the fork
torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # imports what the jobs import
print("ready", flush=True)
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = cli.main(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print("pid", pid, flush=True)
    print("exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class ForkServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.lines.get(timeout=300) == "ready"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def start(self, argv: list[str], log: Path) -> int:
        """Fork one ``python -m stablenets`` job (stdout and stderr to ``log``); its pid."""
        self.proc.stdin.write(json.dumps([argv, str(log)]) + "\n")
        self.proc.stdin.flush()
        while True:  # skip what an earlier, failed test left unread
            kind, value = self.lines.get(timeout=600).split()
            if kind == "pid":
                return int(value)

    def status(self, timeout: float | None = 0) -> int | None:
        """The exit code of the running job (-N: killed by signal N), or None while it runs."""
        try:
            line = self.lines.get(timeout=timeout) if timeout else self.lines.get_nowait()
        except queue.Empty:
            return None
        kind, value = line.split()
        assert kind == "exit", line
        return int(value)

    def run(self, argv: list[str], log: Path) -> int:
        self.start(argv, log)
        return self.status(timeout=600)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    forks = ForkServer()
    yield forks
    forks.close()


def wait_for_checkpoint(running, path: Path, step: int) -> None:
    """Wait until the resume checkpoint has passed ``step`` while ``running()`` is true."""
    deadline = time.time() + 300
    while time.time() < deadline and running():
        if path.exists():
            try:
                if read_checkpoint(path)["run"]["step"] >= step:
                    return
            except CheckpointError:  # being replaced: try again
                pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared before the process ended")


@pytest.fixture(scope="module")
def uninterrupted(server, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    assert server.run(train_args(SPEC, dataset, out), out / "job.log") == 0
    return out


def one_error_line(stderr: str, *needles: str) -> str:
    """The job's stderr is one line, no traceback, containing every needle."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ============================================================================================
# Kill and resume
# ============================================================================================


def test_sigkill_then_rerun_resumes_and_matches_the_uninterrupted_run(
    dataset, uninterrupted, tmp_path
):
    """A standalone ``python -m stablenets train``, as Snakemake starts it."""
    proc = subprocess.Popen(command(SPEC, dataset, tmp_path), stdout=subprocess.PIPE, text=True)
    wait_for_checkpoint(lambda: proc.poll() is None, tmp_path / "work" / "checkpoint.pt", 25)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "model.pt").exists()
    resumed = run(SPEC, dataset, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert_same_training(uninterrupted, tmp_path)


def written_temporaries(path: Path) -> list[str]:
    """Names of the non-empty temporaries of ``path`` being written right now."""
    found = []
    for tmp in path.parent.glob(f".{path.name}.*") if path.parent.is_dir() else []:
        try:
            if tmp.stat().st_size > 0:
                found.append(tmp.name)
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return found


def test_sigkill_at_random_moments_and_inside_checkpoint_writes_never_loses_work(
    server, dataset, tmp_path
):
    """Kill one training run over and over (random moments, and while ``checkpoint.pt``'s
    temporary file is half written); after every kill the checkpoint is complete and loads, and
    the reruns end with exactly the weights and log of an uninterrupted run."""
    spec = {**SPEC, "train": {**SPEC["train"], "steps": 30, "checkpoint_every": 2}}
    reference = tmp_path / "reference"
    code = server.run(train_args(spec, dataset, reference), tmp_path / "reference.log")
    assert code == 0, (tmp_path / "reference.log").read_text()

    out, rng = tmp_path / "killed", random.Random(8)
    ckpt, log = out / "work" / "checkpoint.pt", tmp_path / "killed.log"
    kills = mid_write = 0
    last_step, history = 0, []
    for attempt in range(30):
        stale = {p.name for p in ckpt.parent.glob(".checkpoint.pt.*")}  # an earlier kill's
        pid = server.start(train_args(spec, dataset, out), log)
        mode = "write" if attempt % 3 != 2 else "random"
        writes_to_skip, seen = rng.randrange(2), set()
        deadline = time.time() + (rng.uniform(0.0, 1.5) if mode == "random" else 300)
        status = None
        while status is None and kills < 8:
            temporaries = written_temporaries(ckpt)
            seen.update(set(temporaries) - stale)
            if (mode == "write" and len(seen) > writes_to_skip) or time.time() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                status = server.status(timeout=60)
                break
            status = server.status(timeout=0.002)
        if status is None:  # enough kills: let this run finish
            status = server.status(timeout=600)
        if status == 0:
            break
        assert status == -signal.SIGKILL, (status, log.read_text()[-2000:])
        history.append((mode, writes_to_skip, sorted(seen), ckpt.exists()))
        kills += 1
        if {p.name for p in ckpt.parent.glob(".checkpoint.pt.*")} - stale:  # before rename
            mid_write += 1
        if ckpt.exists():  # never a partial checkpoint, and never a step backwards
            step = read_checkpoint(ckpt)["run"]["step"]
            assert step >= last_step
            last_step = step
        if (out / "model.pt").exists():
            load_model(out / "model.pt")
    else:
        raise AssertionError("the training run never finished")
    assert kills >= 5 and mid_write >= 3, (kills, mid_write, history)
    text = log.read_text()
    assert "resumed from" in text and "temporary of an interrupted checkpoint write" in text
    assert list(ckpt.parent.glob(".checkpoint.pt.*")) == []
    assert_same_training(reference, out)


def test_sigusr1_writes_a_checkpoint_and_exits_75(server, dataset, tmp_path):
    spec = {**SPEC, "train": {**SPEC["train"], "steps": 400, "checkpoint_every": 1000}}
    log = tmp_path / "job.log"
    pid = server.start(train_args(spec, dataset, tmp_path), log)
    deadline = time.time() + 300
    while "\nstep " not in "\n" + (log.read_text() if log.exists() else ""):
        assert time.time() < deadline, "no validation line"  # the loop and its handler run
        time.sleep(0.02)
    os.kill(pid, signal.SIGUSR1)
    assert server.status(timeout=300) == 75, log.read_text()
    assert "rerun to resume" in log.read_text()
    assert read_checkpoint(tmp_path / "work" / "checkpoint.pt")["run"]["step"] > 0


def test_checkpoint_from_another_config_is_ignored_with_a_log_line(server, dataset, tmp_path):
    pid = server.start(train_args(SPEC, dataset, tmp_path), tmp_path / "first.log")
    running = []  # the exit code, once the job ended

    def still_running() -> bool:
        running.append(server.status())
        return running[-1] is None

    wait_for_checkpoint(still_running, tmp_path / "work" / "checkpoint.pt", 10)
    os.kill(pid, signal.SIGKILL)
    assert server.status(timeout=60) == -signal.SIGKILL
    other = {**SPEC, "train": {**SPEC["train"], "steps": 20}}
    assert server.run(train_args(other, dataset, tmp_path), tmp_path / "second.log") == 0
    text = (tmp_path / "second.log").read_text()
    assert "ignoring checkpoint" in text and "resumed" not in text


def test_slurm_profile_requeues_and_signals_every_job_that_saves_progress_before_the_time_limit():
    profile = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile.get("slurm-requeue") is True
    resumable = [  # the rules whose job saves its progress in a --workdir
        block.split(":", 1)[0].strip()
        for path in sorted((ROOT / "workflow/rules").glob("*.smk"))
        for block in re.split(r"^rule ", path.read_text(), flags=re.M)[1:]
        if "--workdir" in block
    ]
    assert {"train_classifier", "evaluate_classifier", "pnp_deblur", "tv_deblur"} <= set(resumable)
    for rule in resumable:
        settings = json.dumps(profile.get("set-resources", {}).get(rule, {}))
        # SIGUSR1 or SIGTERM (both save and exit 75), sent to every process of the job
        # step, not only to the batch shell ("B:"), which would not pass it on
        assert re.search(r"--signal=(SIG)?(USR1|TERM)@\d+", settings), (rule, settings)


# A writer that is killed while it writes: the stdlib-only helper is loaded on its own (fast).
ATOMIC_WRITER = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.atomic_path(sys.argv[2]) as tmp, open(tmp, "wb") as fh:
    for _ in range(1000):
        fh.write(b"new " * 1024)
        fh.flush()
        print("wrote", flush=True)
        time.sleep(0.01)
"""


def test_outputs_are_replaced_atomically_even_when_the_writer_is_killed(tmp_path):
    target = tmp_path / "result.csv"
    target.write_text("old complete content\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", ATOMIC_WRITER, str(ROOT / "src/stablenets/atomic.py"), str(target)],
        stdout=subprocess.PIPE,
        text=True,
    )
    for _ in range(5):
        assert proc.stdout.readline() == "wrote\n"
    (partial,) = tmp_path.glob(".result.csv.*")  # the temporary is being written
    assert partial.stat().st_size >= 5 * 4096
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_text() == "old complete content\n"
    # Every writer in the package goes through the one helper: no other rename or temp file.
    for path in (ROOT / "src/stablenets").rglob("*.py"):
        text = path.read_text()
        if path.name in {"atomic.py", "download.py"}:  # download.py: directory extraction only
            text = text.replace("os.replace(tmp, dest)", "") if path.name == "download.py" else ""
        assert not re.search(r"os\.replace\(|\.replace\(path\)|mkstemp\(", text), path.name


def test_an_atomic_write_flushes_the_file_then_its_folder_and_leaves_the_umask_alone(
    tmp_path, monkeypatch
):
    """After the rename the folder is flushed too (the rename reaches the disk); the new file
    gets the mode ``open`` gives, from the umask read at import: ``os.umask``, which sets it for
    every thread, is not called (another thread's new file would get mode 0o666 meanwhile)."""
    (tmp_path / "plain").write_text("")  # the mode open gives
    flushed, fsync = [], os.fsync

    def record(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def umask(mask: int) -> int:
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "fsync", record)
    monkeypatch.setattr(os, "umask", umask)
    atomic.atomic_write(tmp_path / "out" / "result.csv", "a,b\n")
    assert flushed[0].startswith(str(tmp_path / "out" / ".result.csv."))
    assert flushed[1:] == [str(tmp_path / "out")]
    modes = [(tmp_path / p).stat().st_mode & 0o777 for p in ("out/result.csv", "plain")]
    assert modes[0] == modes[1]


def test_every_profile_reruns_the_incomplete_jobs_of_a_killed_snakemake():
    """``make smoke``, ``make smoke-slurm`` and plain ``snakemake`` (the default profile) redo
    the jobs a killed Snakemake left marked incomplete instead of stopping at them. A plain
    ``snakemake`` does load the default profile: Snakemake looks for ``profiles/default`` beside
    the Snakefile, which with the Snakefile at the root it never found (``workflow/Snakefile``
    now), so the README's command ran without it (nor its GPU count)."""
    run = snakemake(ROOT, "-n", "--quiet", "rules", timeout=300)
    said = run.stdout + run.stderr
    assert run.returncode == 0, said[-2000:]
    assert "Using workflow specific profile workflow/profiles/default" in said, said[-2000:]
    for name in ("default", "smoke", "slurm"):
        profile = yaml.safe_load((ROOT / f"workflow/profiles/{name}/config.yaml").read_text())
        assert profile.get("rerun-incomplete") is True, name
    makefile = (ROOT / "Makefile").read_text()
    for target in ("smoke", "smoke-slurm"):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.M)[1]
        assert recipe.index("-m stablenets.pipeline.locks") < recipe.index("/snakemake "), recipe


def test_the_unlock_helper_counts_snakemake_and_pipeline_job_processes_only():
    workflow = [
        ["/v/bin/python3.11", "/v/bin/snakemake", "--cores", "2"],  # the console script
        ["snakemake", "-n"],
        ["python", "-m", "snakemake", "--target-jobs", "train_classifier:variant=resnet"],
        ["python", "-m", "stablenets", "train", "--spec", "{}"],  # a job a killed Snakemake left
    ]
    others = [
        ["python", "-m", "stablenets.pipeline.locks", "--cores", "2"],
        ["/bin/sh", "-c", "python -m stablenets train --spec {} > log 2>&1"],
        ["make", "smoke"],
        ["python", "-m", "pytest", "tests/test_reliability.py"],
        [],
        # a word that is no program: a tmux session named so (the README runs Snakemake in
        # one), a conda environment, a benchmark or the config check (no output of the workflow)
        ["tmux", "new-session", "-d", "-s", "snakemake"],
        ["conda", "run", "-n", "snakemake", "make", "smoke"],
        ["python", "-m", "stablenets.bench.training", "--models", "classifier"],
        ["python", "-m", "stablenets.pipeline.config", "--configfile", "config.yaml"],
    ]
    assert all(locks.is_workflow_command(argv) for argv in workflow)
    assert not any(locks.is_workflow_command(argv) for argv in others)


def test_the_unlock_helper_counts_a_snakemake_or_job_however_python_or_a_wrapper_starts_it(
    tmp_path, monkeypatch
):
    """Python's options before the script (``-u``, ``-X utf8``, ``-W ignore``), ``-m`` glued to
    its module or naming a submodule, Nix's and Guix's wrapped programs: each is a Snakemake
    (or a job). Told generously (one counted wrongly only keeps a lock), but not by an
    option's value or a path that merely names the package (the project's folder). A live
    ``python -u .../snakemake`` keeps its lock."""
    snakemake = [
        ["/v/bin/python3.11", "-u", "/v/bin/snakemake", "--cores", "2"],
        ["python", "-X", "utf8", "/v/bin/snakemake"],
        ["python", "-W", "ignore", "/v/bin/snakemake"],
        ["python", "-Wignore", "-Xutf8", "-uB", "/v/bin/snakemake"],
        ["python", "-msnakemake", "-n"],
        ["python", "-m", "snakemake.cli", "-n"],
        ["python3", "-um", "snakemake"],
        ["/nix/store/a-python3/bin/python3.11", "/nix/store/b-snakemake/bin/.snakemake-wrapped"],
        ["/nix/store/b-snakemake/bin/.snakemake-wrapped", "--cores", "2"],
        ["/nix/store/a-python3/bin/.python3.11-wrapped", "-m", "snakemake"],
        ["/gnu/store/c-snakemake/bin/.snakemake-real"],
        ["/usr/libexec/platform-python", "/usr/bin/snakemake", "--cores", "2"],
        # launched on another machine: only the launcher is in this one's process list
        ["srun", "--pty", "python", "-m", "snakemake", "--cores", "8"],
        ["srun", "-p", "gpu", "snakemake", "--profile", "x"],
        ["ssh", "node1", "cd /w && snakemake --cores 8"],
    ]
    jobs = [
        ["python", "-u", "-X", "utf8", "-m", "stablenets", "train"],
        ["python", "-mstablenets", "train"],
        ["python", "-m", "stablenets.pipeline.cli", "train"],
        ["/v/bin/python3.11", "-u", "/v/bin/stablenets", "train"],
        ["/v/bin/stablenets", "train"],
    ]
    others = [
        ["python", "-u", "-m", "stablenets.pipeline.locks", "--cores", "2"],
        ["python", "-X", "stablenets", "x.py"],  # an option's value
        ["python", "/work/stablenets/benchmarks/x.py"],
        ["vim", "/home/u/stablenets"],  # the project's folder, named like the package
        ["python", "-c", "print('snakemake')"],
        ["srun", "--pty", "bash"],
        ["ssh", "node1", "uptime"],
    ]
    assert [argv for argv in snakemake + jobs if not locks.is_workflow_command(argv)] == []
    assert [argv for argv in others if locks.is_workflow_command(argv)] == []
    for key, value in local_env().items():
        monkeypatch.setenv(key, value)
    work = tmp_path / "wf"
    lock = work / locks.LOCK_DIR / "0.output.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{work / 'out.txt'}\n")
    script = tmp_path / "bin" / "snakemake"
    script.parent.mkdir()
    script.write_text("import time\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-u", str(script)], cwd=work)
    try:
        deadline = time.time() + 60
        while str(script) not in Path(f"/proc/{proc.pid}/cmdline").read_text():  # exec'd
            assert time.time() < deadline
            time.sleep(0.01)
        said = locks.unlock_if_stale(work, [])
        assert said.startswith(f"leaving the lock in {work / locks.LOCK_DIR}: pid {proc.pid} (")
        assert lock.exists()
    finally:
        proc.kill()
        proc.wait()


def start_fake_snakemake(script_dir: Path, cwd: Path) -> subprocess.Popen:
    """A sleeping process with a Snakemake's command line (``python .../snakemake``) in ``cwd``."""
    script = script_dir / "snakemake"
    script_dir.mkdir(parents=True, exist_ok=True)
    script.write_text("import time\ntime.sleep(300)\n")
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=cwd)
    deadline = time.time() + 60
    while str(script) not in Path(f"/proc/{proc.pid}/cmdline").read_text():  # exec'd
        assert time.time() < deadline
        time.sleep(0.01)
    return proc


def test_the_unlock_helper_never_unlocks_while_a_snakemake_runs_in_the_directory(
    tmp_path, monkeypatch
):
    """A lock stays while a Snakemake runs in the workflow's directory (or below it), and with
    no ``/proc`` while any Snakemake of this user runs; the line says that a Snakemake of other
    outputs may start beside it, not to unlock. Once none runs, the lock files go. A Snakemake
    in another directory does not count."""
    for key, value in local_env().items():
        monkeypatch.setenv(key, value)
    work = copy_workflow(tmp_path / "wf")
    lock = work / locks.LOCK_DIR / "0.input.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{work / 'results/smoke/data/cifar10.h5'}\n")
    elsewhere = start_fake_snakemake(tmp_path / "bin", tmp_path / "other")
    inside = start_fake_snakemake(tmp_path / "bin", work / "results")
    try:
        said = locks.unlock_if_stale(work, list(SMOKE_PROFILE))
        assert said.startswith(f"leaving the lock in {work / locks.LOCK_DIR}: pid {inside.pid} (")
        assert said.endswith(
            f"runs in {work}; a Snakemake with other outputs may start beside it, one with the "
            "same must wait for it (not --unlock)"
        )
        assert lock.exists()
        inside.kill()
        inside.wait()
        with monkeypatch.context() as m:  # no /proc: command lines only, every directory
            m.setattr(locks, "PROC", tmp_path / "no-proc")
            assert elsewhere.pid in dict(locks.workflow_processes(work))
            assert locks.unlock_if_stale(work, []).startswith("leaving the lock in")
            assert lock.exists()
        said = locks.unlock_if_stale(work, list(SMOKE_PROFILE))
    finally:
        for proc in (elsewhere, inside):
            proc.kill()
            proc.wait()
    assert said == (
        f"removed the lock a stopped Snakemake left in {work / locks.LOCK_DIR} "
        "(no Snakemake or job runs there)"
    )
    assert not lock.exists() and locks.unlock_if_stale(work, list(SMOKE_PROFILE)) is None


def _fake_slurm(
    tmp_path: Path, work: Path, submitted_from: str | None, after_cancel: str = ""
) -> Path:
    """``squeue``, ``scontrol`` and ``scancel`` stand-ins reading and writing ``tmp_path/slurm``:
    job 7 is a Snakemake SLURM job of ``work`` submitted from ``submitted_from`` (``None``: SLURM
    does not say), job 8 one of another directory, job 9 no Snakemake job; ``scancel`` leaves
    ``after_cancel`` in the queue; ``squeue`` fails while ``tmp_path/slurm/down`` exists."""
    state, bin_dir = tmp_path / "slurm", tmp_path / "slurm-bin"
    state.mkdir()
    bin_dir.mkdir()
    (state / "queue").write_text(
        f"7|rule_train_denoiser_wildcards_averaged|{work}\n"
        f"8|rule_train_classifier_wildcards_resnet|{tmp_path / 'other'}\n"
        f"9|an interactive session|{work}\n"
    )
    (state / "after").write_text(after_cancel)
    (state / "show").write_text(
        f"JobId=7 JobName=uuid UserId=u(1) AllocNode:Sid={submitted_from}:4242 WorkDir=/w\n"
        if submitted_from
        else "JobId=7 JobName=uuid UserId=u(1) WorkDir=/w\n"
    )
    scripts = {
        "squeue": f"[ -f {state}/down ] && exit 1\n"
        f"if [ -f {state}/cancelled ]; then cat {state}/after; else cat {state}/queue; fi",
        "scontrol": f"cat {state}/show",
        "scancel": f'echo "$@" >> {state}/cancelled',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _locked_workflow(tmp_path: Path) -> tuple[Path, Path]:
    work = copy_workflow(tmp_path / "wf")
    lock = work / locks.LOCK_DIR / "0.input.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{work / 'results/smoke/data/cifar10.h5'}\n")
    return work, lock


SLURM_PROFILES = [
    "--profile",
    "workflow/profiles/slurm",
    "--profile",
    "workflow/profiles/slurm-local",
]


@pytest.mark.parametrize("host", ["this machine's name", "localhost"])
def test_slurm_jobs_a_dead_snakemake_of_this_machine_left_running_are_cancelled_then_unlocked(
    host, tmp_path, monkeypatch
):
    """Job 7 (Snakemake's, submitted from here for this directory; a single-node cluster records
    ``localhost``) is cancelled and awaited, its process that outlived it here gets SIGTERM,
    then the lock goes; jobs of another directory or not Snakemake's are left alone. The job's
    own process never counts as a live Snakemake."""
    for key, value in local_env().items():
        monkeypatch.setenv(key, value)
    work, lock = _locked_workflow(tmp_path)
    name = socket.gethostname() if host == "this machine's name" else host
    monkeypatch.setenv("PATH", f"{_fake_slurm(tmp_path, work, name)}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # inherited by the job's process below
    job = start_fake_snakemake(tmp_path / "bin", work / "results")
    monkeypatch.delenv("SLURM_JOB_ID")
    try:
        assert [j.id for j in locks.slurm_jobs(work)] == [7]
        assert locks.workflow_processes(work, {7}) == []
        said = locks.unlock_if_stale(work, SLURM_PROFILES)
        assert job.wait(timeout=30) == -signal.SIGTERM
    finally:
        job.kill()
        job.wait()
    assert (tmp_path / "slurm/cancelled").read_text().split() == ["7"]
    assert said.endswith("; cancelled the SLURM jobs it left running (7): the rerun resumes them")
    assert said.startswith("removed the lock a stopped Snakemake left in") and not lock.exists()


@pytest.mark.parametrize(
    ("submitted_from", "after_cancel", "why"),
    [
        ("login2.cluster.example", "", "SLURM job 7 (rule_train_denoiser_wildcards_averaged) was "
         "submitted from login2.cluster.example, whose Snakemake this machine cannot see; rerun "
         "there, or scancel its jobs and unlock by hand"),
        (None, "", "SLURM does not say which machine submitted job 7 "
         "(rule_train_denoiser_wildcards_averaged), so this machine cannot tell whether its "
         "Snakemake still runs; once sure it does not, scancel its jobs (squeue --me) and unlock "
         "by hand"),
        ("localhost", "11|rule_pnp_deblur_wildcards_x|{work}\n",
         "SLURM jobs 11 were submitted meanwhile"),
    ],
)  # fmt: skip
def test_slurm_jobs_whose_snakemake_may_live_keep_the_lock(
    submitted_from, after_cancel, why, tmp_path, monkeypatch
):
    """Jobs submitted from another machine (whose Snakemake may live there) or from one SLURM
    does not name are not cancelled; jobs submitted while the orphans were cancelled mean a new
    Snakemake: the lock stays, one line says why."""
    work, lock = _locked_workflow(tmp_path)
    after = after_cancel.format(work=work)
    bin_dir = _fake_slurm(tmp_path, work, submitted_from, after)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    said = locks.unlock_if_stale(work, SLURM_PROFILES)
    assert said == f"leaving the lock in {work / locks.LOCK_DIR}: {why}"
    assert lock.exists()
    assert (tmp_path / "slurm/cancelled").exists() == bool(after_cancel)


def _silent_squeue(tmp_path: Path, monkeypatch) -> tuple[Path, Path, str]:
    """A locked workflow on a machine whose ``squeue`` does not answer; the line of a kept lock."""
    for key, value in local_env().items():
        monkeypatch.setenv(key, value)
    work, lock = _locked_workflow(tmp_path)
    bin_dir = _fake_slurm(tmp_path, work, "localhost")
    (tmp_path / "slurm/down").touch()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return work, lock, f"leaving the lock in {work / locks.LOCK_DIR}: squeue does not answer"


def test_an_unanswering_squeue_keeps_the_lock_of_a_slurm_run_only(tmp_path, monkeypatch):
    """``squeue`` failing (no controller answers): a SLURM run's lock stays, as its jobs may
    still run: one whose options say so (``--opt value`` or ``--opt=value``), or one whose dead
    Snakemake left a job marked incomplete with a cluster job id, whatever the next run's options
    say; a local run (SLURM's client installed, no cluster) is unlocked as before."""
    work, lock, kept = _silent_squeue(tmp_path, monkeypatch)
    for args in (
        SLURM_PROFILES,
        ["--executor=slurm"],
        ["--workflow-profile=workflow/profiles/slurm"],
    ):
        assert locks.unlock_if_stale(work, args).startswith(kept), args
    record = work / ".snakemake/incomplete/cmVzdWx0cy9zbW9rZS9tb2RlbHM="  # Snakemake's record
    record.parent.mkdir(parents=True)
    record.write_text('{"external_jobid": "7"}')
    assert locks.unlock_if_stale(work, list(SMOKE_PROFILE)).startswith(kept)
    assert lock.exists()
    record.write_text('{"external_jobid": null}')  # a local job
    said = locks.unlock_if_stale(work, list(SMOKE_PROFILE))
    assert said.startswith("removed the lock") and not lock.exists()


def test_a_missing_squeue_keeps_the_lock_of_a_slurm_run_as_a_silent_one_does(tmp_path, monkeypatch):
    """A rerun from a shell without ``squeue`` on its PATH (no ``module load slurm``) read that as
    "no job runs": the lock of a killed SLURM run went, its job running on, and the rerun
    submitted a second writer of the same checkpoint. Now it is kept as when ``squeue`` fails,
    and a local run's lock still goes."""
    work, lock, _ = _silent_squeue(tmp_path, monkeypatch)
    (tmp_path / "slurm/down").unlink()  # squeue would answer, were it found
    which = shutil.which
    monkeypatch.setattr(
        locks.shutil, "which", lambda name: None if name == "squeue" else which(name)
    )
    kept = f"leaving the lock in {work / locks.LOCK_DIR}: squeue is not on the PATH, so "
    assert locks.unlock_if_stale(work, SLURM_PROFILES).startswith(kept)
    record = work / ".snakemake/incomplete/cmVzdWx0cy9zbW9rZS9tb2RlbHM="
    record.parent.mkdir(parents=True)
    record.write_text('{"external_jobid": "7"}')
    assert locks.unlock_if_stale(work, list(SMOKE_PROFILE)).startswith(kept)
    assert lock.exists() and not (tmp_path / "slurm/cancelled").exists()
    record.unlink()
    said = locks.unlock_if_stale(work, list(SMOKE_PROFILE))
    assert said.startswith("removed the lock") and not lock.exists()


def test_a_snakefile_read_twice_opens_and_closes_no_second_descriptor_of_its_live_marker(
    tmp_path, monkeypatch
):
    """NFS emulates ``flock`` with POSIX record locks, which a process drops when it closes any
    descriptor of the file: a second read of the Snakefile opened the marker again and closed
    that descriptor, releasing the marker of a live Snakemake."""
    opened: list[str] = []
    real_open = os.open

    def counting(path, *args, **kwargs):  # noqa: ANN001, ANN202
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    marker = tmp_path / locks.LIVE_MARKER
    monkeypatch.setattr(locks.os, "open", counting)
    try:
        locks.hold_live_marker(tmp_path)
        locks.hold_live_marker(tmp_path)
        assert opened.count(str(marker)) == 1
    finally:
        key = os.stat(marker)
        os.close(locks._HELD.pop((key.st_dev, key.st_ino)))


def test_a_snakemake_the_process_list_does_not_show_keeps_its_lock_by_its_live_marker(
    tmp_path, monkeypatch
):
    """A Snakemake in another container or PID namespace (or hidden by hidepid) is not in this
    machine's process list: its lock was removed under it. The marker its Snakefile holds keeps
    the lock until that process ends, SIGKILL included, and its SLURM jobs (submitted from this
    machine's name) are not cancelled; ``-d`` names the directory."""
    work, lock = _locked_workflow(tmp_path)
    bin_dir = _fake_slurm(tmp_path, work, socket.gethostname())
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    code = (
        "import sys, time; from pathlib import Path; "
        "from stablenets.pipeline.locks import hold_live_marker; "
        "hold_live_marker(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"
    )
    hidden = subprocess.Popen(  # its command line and directory are no Snakemake's
        [sys.executable, "-c", code, str(work)], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        assert hidden.stdout.readline() == "held\n"
        assert locks.workflow_processes(work) == []
        said = locks.unlock_if_stale(work, ["--executor", "slurm"])
        assert said.startswith(f"leaving the lock in {work / locks.LOCK_DIR}: a process holds")
        assert lock.exists() and not (tmp_path / "slurm/cancelled").exists()
    finally:
        hidden.kill()
        hidden.wait()
    monkeypatch.setenv("PATH", os.environ["PATH"].removeprefix(f"{bin_dir}:"))
    elsewhere = subprocess.run(
        [sys.executable, "-m", "stablenets.pipeline.locks", "-d", str(work)],
        cwd=tmp_path, capture_output=True, text=True, env=local_env(),
    )  # fmt: skip
    assert elsewhere.returncode == 0 and "removed the lock" in elsewhere.stderr, elsewhere.stderr
    assert not lock.exists()


def test_a_profile_named_as_snakemake_finds_it_keeps_a_slurm_runs_lock_while_squeue_fails(
    tmp_path, monkeypatch
):
    """``--profile cluster`` found in the user's profile folder (and ``$SNAKEMAKE_PROFILE``
    naming it), ``--workflow-profile slurm`` (``workflow/profiles/slurm``) and the default
    workflow profile, with ``executor: slurm``: only ``<dir>/<name>/config.yaml`` was read, so
    the run was taken for a local one and its lock removed while its jobs might run."""
    work, lock, kept = _silent_squeue(tmp_path, monkeypatch)
    user = tmp_path / "xdg"
    (user / "snakemake/cluster").mkdir(parents=True)
    (user / "snakemake/cluster/config.yaml").write_text("executor: slurm\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(user))
    assert locks.unlock_if_stale(work, ["--profile", "cluster"]).startswith(kept)
    monkeypatch.setenv("SNAKEMAKE_PROFILE", "cluster")
    assert locks.unlock_if_stale(work, []).startswith(kept)
    monkeypatch.delenv("SNAKEMAKE_PROFILE")
    # a workflow profile by its short name, found in workflow/profiles/ as Snakemake finds it
    assert locks.unlock_if_stale(work, ["--workflow-profile", "slurm"]).startswith(kept)
    default = work / "workflow/profiles/default/config.yaml"  # read without the option
    default.write_text(default.read_text() + "executor: slurm\n")
    assert locks.unlock_if_stale(work, []).startswith(kept)
    assert lock.exists()


def test_slurm_jobs_are_left_alone_while_their_snakemake_runs_here(tmp_path, monkeypatch):
    """A live Snakemake in the directory keeps the lock and its SLURM jobs: nothing cancelled."""
    work, lock = _locked_workflow(tmp_path)
    bin_dir = _fake_slurm(tmp_path, work, socket.gethostname())
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    snakemake = start_fake_snakemake(tmp_path / "bin", work)
    try:
        said = locks.unlock_if_stale(work, SLURM_PROFILES)
    finally:
        snakemake.kill()
        snakemake.wait()
    assert said.startswith(f"leaving the lock in {work / locks.LOCK_DIR}: pid {snakemake.pid} (")
    assert lock.exists() and not (tmp_path / "slurm/cancelled").exists()


def test_a_snakemake_that_mounts_the_directory_at_another_path_keeps_the_lock(
    tmp_path, monkeypatch
):
    """A Snakemake in a container that bind-mounts the project at another path (here a mount
    namespace of its own, made by ``unshare``) works in the same folder under another name: it
    keeps the lock, as its working directory is compared by device and inode."""
    for key, value in local_env().items():
        monkeypatch.setenv(key, value)
    work, lock = _locked_workflow(tmp_path)
    (work / "results").mkdir(exist_ok=True)
    mount, script = tmp_path / "mnt", tmp_path / "bin" / "snakemake"
    mount.mkdir()
    script.parent.mkdir()
    script.write_text("import time\ntime.sleep(300)\n")
    inside = 'mount --bind "$1" "$2" && cd "$2/results" && exec "$3" "$4"'
    proc = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", inside, "sh",
         str(work), str(mount), sys.executable, str(script)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0")[0] != sys.executable:
            if proc.poll() is not None:  # it never exec'd the fake Snakemake
                pytest.skip(f"no mount namespace here: {proc.stderr.read().strip()}")
            time.sleep(0.01)
        assert os.readlink(f"/proc/{proc.pid}/cwd") == str(mount / "results")  # another path
        said = locks.unlock_if_stale(work, list(SMOKE_PROFILE))
    finally:
        proc.kill()
        proc.wait()
    assert said.startswith(f"leaving the lock in {work / locks.LOCK_DIR}: pid {proc.pid} (")
    assert lock.exists()


def test_a_snakemake_whose_directory_cannot_be_read_keeps_the_lock_where_it_may_hold_it(
    tmp_path, monkeypatch
):
    """A Snakemake whose working directory ``/proc`` does not give (another user's, or this
    user's under another group) keeps the lock when it may hold it: it runs as this user or
    root, or its user owns a lock file. Another user's Snakemake elsewhere on a shared machine
    does not keep this user's stale lock. (A symlink loop stands in for the unreadable
    directory: another user's gives EACCES, which root never gets; as root the fake process is
    handed to another user with ``chown``.)"""
    for key, value in local_env().items():
        monkeypatch.setenv(key, value)
    work, lock = _locked_workflow(tmp_path)
    entry = tmp_path / "proc" / "4242"
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"python\0/usr/bin/snakemake\0--cores\0004\0")
    (entry / "cwd").symlink_to(entry / "cwd")
    monkeypatch.setattr(locks, "PROC", entry.parent)
    command = "python /usr/bin/snakemake --cores 4 [its working directory cannot be read]"
    assert locks.workflow_processes(work) == [(4242, command)]  # this user's
    said = locks.unlock_if_stale(work, list(SMOKE_PROFILE))
    assert said.startswith(
        f"leaving the lock in {work / locks.LOCK_DIR}: pid 4242 (python /usr/bin/snakemake "
        f"--cores 4) may run in {work} [its working directory cannot be read]"
    ), said
    assert lock.exists()
    if os.geteuid() != 0:
        return  # handing a process to another user needs root
    os.chown(entry, 65534, 65534)
    assert locks.workflow_processes(work) == []  # another user's, elsewhere
    os.chown(lock, 65534, 65534)
    assert locks.workflow_processes(work) == [(4242, command)]  # the lock's owner
    os.chown(lock, 0, 0)
    assert locks.unlock_if_stale(work, list(SMOKE_PROFILE)).startswith("removed the lock")
    assert not lock.exists()


def test_a_lock_written_while_the_unlock_helper_checks_is_left_with_the_stale_one(
    tmp_path, monkeypatch
):
    """A Snakemake that locks the directory just after the helper looked for processes keeps
    its lock, and the stale one stays too (``snakemake --unlock`` re-read the workflow for
    seconds, then removed the whole lock folder)."""
    for key, value in local_env().items():
        monkeypatch.setenv(key, value)
    work, lock = _locked_workflow(tmp_path)
    new = lock.with_name("1.output.lock")
    scan = locks.workflow_processes

    def scan_then_lock(directory: Path, jobs: tuple = ()) -> list[tuple[int, str]]:
        found = scan(directory, jobs)
        new.write_text(f"{work / 'results/smoke/tables/pnp.csv'}\n")  # a Snakemake starts
        return found

    monkeypatch.setattr(locks, "workflow_processes", scan_then_lock)
    said = locks.unlock_if_stale(work, list(SMOKE_PROFILE))
    assert said == (
        f"leaving the lock in {work / locks.LOCK_DIR}: a Snakemake locked it meanwhile "
        "(1.output.lock)"
    )
    assert lock.exists() and new.exists()


def test_two_runs_of_the_unlock_helper_take_turns(tmp_path, monkeypatch):
    """While one run of the helper holds ``.snakemake/stablenets-unlock.flock`` (it checks or
    removes), another waits for it (``/proc/locks`` shows its request blocked) and removes
    nothing; then it goes on."""
    for key, value in local_env().items():
        monkeypatch.setenv(key, value)
    work, lock = _locked_workflow(tmp_path)
    said: queue.Queue = queue.Queue()
    flock = work / ".snakemake/stablenets-unlock.flock"
    with open(flock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        other = threading.Thread(
            target=lambda: said.put(locks.unlock_if_stale(work, list(SMOKE_PROFILE)))
        )
        other.start()
        waiting = re.compile(rf"^\d+: -> FLOCK .* [0-9a-f:]+:{os.stat(flock).st_ino} ", re.M)
        deadline = time.monotonic() + 30
        while not waiting.search(Path("/proc/locks").read_text()):
            assert time.monotonic() < deadline and other.is_alive(), "it did not wait"
            time.sleep(0.01)
        assert lock.exists()
    other.join(timeout=60)
    assert said.get_nowait().startswith("removed the lock") and not lock.exists()


# A job choosing its GPU among two with the lock folder argv[1]; it holds its lock until stdin
# closes.
CLAIM_GPU = r"""
import sys
from pathlib import Path
from stablenets.pipeline import runtime
runtime._LOCK_DIR = Path(sys.argv[1])
print(runtime._claim_gpu(2), flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize(("setting", "current"), [("auto", 1), ("cuda:1", 1), ("cuda", 0)])
def test_the_gpu_a_job_chooses_becomes_its_current_device(setting, current, monkeypatch):
    """CUDA graphs capture on the current device's streams, and a context on GPU 0 takes memory
    from its job: a job on GPU 1 (here ``auto`` finding GPU 0 held) makes GPU 1 current. (No GPU
    here: torch.cuda's answers are stood in for.)"""
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(runtime, "_claim_gpu", lambda count: 1)
    device = runtime.select_device(setting)
    assert (device.type, chosen) == ("cuda", [current])


def test_jobs_of_two_users_share_the_gpu_locks(monkeypatch):
    """The first job makes the lock folder as ``/tmp`` is (1777) and its lock file readable by
    all; a job of another user then takes the second GPU through the same folder instead of
    failing on the first user's files. As root the second job runs as ``nobody`` (its effective
    uid, in this process for a moment); otherwise the same user's lock file made read-only
    stands in for another user's."""
    where = Path(tempfile.mkdtemp(prefix="stablenets-test-"))  # beside /tmp's: all may enter
    where.chmod(0o755)
    folder = where / "gpu-locks"
    monkeypatch.setattr(runtime, "_LOCK_DIR", folder)
    monkeypatch.setattr(runtime, "_held_locks", [])
    first = subprocess.Popen(
        [sys.executable, "-c", CLAIM_GPU, str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert first.stdout.readline() == "0\n"
        modes = folder.stat().st_mode & 0o7777, (folder / "gpu0.lock").stat().st_mode & 0o777
        assert modes == (0o1777, 0o444)
        if os.geteuid() == 0:
            os.seteuid(65534)
            try:
                second = runtime._claim_gpu(2)
            finally:
                os.seteuid(0)
        else:
            (folder / "gpu0.lock").chmod(0o444)
            second = runtime._claim_gpu(2)
    finally:
        for fd in runtime._held_locks:
            os.close(fd)
        first.communicate("")
        shutil.rmtree(where)
    assert second == 1


def test_a_gpu_lock_folder_that_is_a_link_gives_way_to_this_users_own(tmp_path, monkeypatch):
    """Where the shared lock folder is a link (which another user could plant in ``/tmp``, to
    one of this user's folders), nothing is changed through it: a job takes its GPU through
    this user's own folder instead, the link's target keeps its mode and gets no lock file."""
    victim = tmp_path / "private"
    victim.mkdir(mode=0o700)
    (tmp_path / "gpu-locks").symlink_to(victim)
    monkeypatch.setattr(runtime, "_LOCK_DIR", tmp_path / "gpu-locks")
    monkeypatch.setattr(runtime, "_held_locks", [])
    try:
        assert runtime._claim_gpu(2) == 0
        assert runtime._claim_gpu(2) == 1  # the first is held
    finally:
        for fd in runtime._held_locks:
            os.close(fd)
    assert (tmp_path / f"gpu-locks-{os.geteuid()}" / "gpu1.lock").is_file()
    assert victim.stat().st_mode & 0o7777 == 0o700 and not list(victim.iterdir())


# The smoke subset of the kill test (one model per rule): the whole smoke DAG runs once per
# session (conftest.smoke_run), whose rows of these variants the resumed run must reproduce.
KILL_SUBSET = {
    "classification": {"select": ["resnet"]},
    "denoising": {"select": ["averaged"]},
    "pnp": {"denoisers": ["averaged"]},
}
KILLED_CHECKPOINT = "results/smoke/checkpoints/classification/resnet/seed0/checkpoint.pt"
KILLED_MODEL = "results/smoke/models/classification/resnet/seed0/model.pt"
MACHINE_COLUMNS = ("time", "elapsed", "memory")  # measured on the machine, not computed


def make_smoke(work: Path, out: Path) -> subprocess.Popen:
    """``make smoke`` on ``KILL_SUBSET`` with this environment, in its own process group."""
    config = " ".join(
        f'{key}="{yaml.safe_dump(value, default_flow_style=True).strip()}"'
        for key, value in KILL_SUBSET.items()
    )
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}  # of an enclosing `make test`
    return subprocess.Popen(
        ["make", "smoke", f"VENV={BIN.parent}", "STAMP=", f"SMOKE_CONFIG={config}"],
        cwd=work,
        env={k: v for k, v in local_env().items() if k not in drop},
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.slow
def test_make_smoke_killed_with_sigkill_finishes_when_rerun_with_bit_identical_results(
    smoke_run, tmp_path
):
    """SIGKILL to ``make smoke``'s whole process group (make, Snakemake, the training jobs)
    while a training job runs; the same ``make smoke`` again clears the dead Snakemake's lock,
    redoes the incomplete jobs, resumes the training from its checkpoint and ends with the
    uninterrupted run's tables and weights. The same seed gives bit-identical results: the
    datasets, a denoiser's evaluation file, weights and training log (all but timings,
    provenance and ``RUN_HISTORY``) equal those of the session's smoke run, made in another
    copy."""
    work = copy_workflow(tmp_path / "wf")
    t0 = time.monotonic()
    first = make_smoke(work, tmp_path / "first.out")
    ckpt = work / KILLED_CHECKPOINT
    while not ckpt.exists():
        assert first.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
        assert time.monotonic() - t0 < 600, "no checkpoint in time"
        time.sleep(0.1)
    # Stop the training where it is (SIGKILL below ends a stopped process as any other): on a
    # loaded machine the test could otherwise look again only after the job has ended.
    trainers = training_processes(work, ckpt)
    for pid in trainers:
        os.kill(pid, signal.SIGSTOP)
    ended = "the training ended before the test could stop it (an overloaded machine?)"
    assert len(trainers) == 1 and not (work / KILLED_MODEL).exists(), ended
    said = locks.unlock_if_stale(work, list(SMOKE_PROFILE))  # the live run keeps its lock
    assert said.startswith("leaving the lock in"), said
    assert locks._marker_held(work, settle_s=0), "the live Snakemake does not hold its marker"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic() - t0
    assert list((work / locks.LOCK_DIR).glob("*.lock")), "the killed Snakemake left no lock"
    while locks.workflow_processes(work):  # the killed processes are gone in a moment
        assert time.monotonic() - t0 < 660
        time.sleep(0.05)
    assert not locks._marker_held(work), "SIGKILL left the marker held"  # once its files close

    second = make_smoke(work, tmp_path / "second.out")
    assert second.wait(timeout=1200) == 0, (tmp_path / "second.out").read_text()[-4000:]
    print(f"killed after {killed_at:.0f} s; rerun done after {time.monotonic() - t0:.0f} s")
    output = (tmp_path / "second.out").read_text()
    assert "stablenets.pipeline.locks: removed the lock a stopped Snakemake left in" in output
    joblog = (work / "logs/smoke/train_classifier/resnet/seed0.log").read_text()
    resumed = re.search(rf"resumed from {re.escape(KILLED_CHECKPOINT)} at step (\d+)", joblog)
    assert resumed and 50 <= int(resumed[1]) < 200, joblog
    # Snakemake empties the rule's log before each attempt: the workdir's keeps the killed
    # attempt's lines (an out-of-memory kill's last words), then the rerun's, each begun by its
    # start line
    attempts = (work / KILLED_CHECKPOINT).parent / cli.ATTEMPTS_LOG
    history = attempts.read_text()
    starts = [m.start() for m in re.finditer(r"^stablenets train: started ", history, re.M)]
    assert len(starts) == 2 and starts[0] == 0, history[:2000]
    assert "step 0/" in history[: starts[1]], history[:2000]  # the killed attempt's progress
    assert history[starts[1] :] == joblog  # the rerun's lines, as its rule's log has them

    results, local = work / "results/smoke", smoke_run / "results/smoke"
    for table in sorted(local.glob("tables/*.csv")):
        expected, got = pd.read_csv(table), pd.read_csv(results / "tables" / table.name)
        if "variant" in expected:
            expected = expected[expected["variant"].isin(got["variant"])].reset_index(drop=True)
        machine = [c for c in expected if any(k in c for k in MACHINE_COLUMNS)]
        pd.testing.assert_frame_equal(
            got.drop(columns=machine), expected.drop(columns=machine), check_exact=True
        )
    for model in ("classification/resnet/seed0", "denoising/sigma0.05/averaged/seed0"):
        assert_same_model(local / "models" / model, results / "models" / model)
    evaluation = "eval/denoising/sigma0.05/averaged/seed0.h5"
    for name in ("data/cifar10.h5", "data/bsds500.h5", evaluation):
        assert_same_h5(local / name, results / name)


def test_every_rule_replaces_its_shell_by_its_job_so_that_signals_reach_the_job_alone():
    """The test below shows why, for one rule; this one holds every rule to it."""
    shells = [
        block.split("shell:", 1)[1].split('"')[1]
        for path in sorted((ROOT / "workflow/rules").glob("*.smk"))
        for block in re.split(r"^rule ", path.read_text(), flags=re.M)[1:]
        if "shell:" in block  # not the target rules
    ]
    assert len(shells) >= 12 and all(s.startswith("exec python -m stablenets ") for s in shells)


@pytest.mark.slow
def test_sigterm_to_snakemake_and_its_jobs_waits_for_the_training_to_save_and_exit_75(tmp_path):
    """What SLURM does at a job's time limit (``--signal=TERM@...``) and ``scancel`` do: SIGTERM
    to every process of the job step, Snakemake and its job alike. The job's shell is replaced
    by the job (``exec``), so Snakemake waits while the training, held stopped here, finishes
    its step, writes a checkpoint and exits 75; a rerun resumes at that step. A job left behind
    its shell would be orphaned: Snakemake would end at once and, on a cluster, the step's
    teardown would kill the job before it saved."""
    work = copy_workflow(tmp_path / "wf")
    config = [f"{k}={json.dumps(v)}" for k, v in KILL_SUBSET.items()]
    args = [SNAKEMAKE, *SMOKE_PROFILE, "--config", *config, "--", KILLED_MODEL]
    out = tmp_path / "first.out"
    first = subprocess.Popen(
        args, cwd=work, env=local_env(), stdout=out.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    ckpt, t0 = work / KILLED_CHECKPOINT, time.monotonic()
    while not (trainers := training_processes(work, ckpt)) or not ckpt.exists():
        assert first.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() - t0 < 600, "no checkpoint in time"
        time.sleep(0.1)
    (trainer,) = trainers
    os.kill(trainer, signal.SIGSTOP)
    os.killpg(first.pid, signal.SIGTERM)
    time.sleep(3)
    assert first.poll() is None, "Snakemake ended while its job had not saved"
    os.kill(trainer, signal.SIGCONT)
    assert first.wait(timeout=120) != 0
    joblog = (work / "logs/smoke/train_classifier/resnet/seed0.log").read_text()
    said = re.search(
        rf"signal 15 at step (\d+): checkpoint {re.escape(KILLED_CHECKPOINT)} written", joblog
    )
    assert said, joblog[-2000:]
    assert not training_processes(work, ckpt) and not (work / KILLED_MODEL).exists()

    second = snakemake(work, *SMOKE_PROFILE, "--config", *config, "--", KILLED_MODEL)
    assert second.returncode == 0, second.stderr[-3000:]
    joblog = (work / "logs/smoke/train_classifier/resnet/seed0.log").read_text()
    assert f"resumed from {KILLED_CHECKPOINT} at step {said[1]}" in joblog, joblog[-2000:]


# ============================================================================================
# Divergence
# ============================================================================================


def test_divergence_stops_with_the_step_and_last_checkpoint(server, dataset, tmp_path):
    spec = {
        **SPEC,
        "model": "resnet_classifier",
        "train": {**SPEC["train"], "lr_max": 1.0e6, "warmup": 0.1},
    }
    log = tmp_path / "job.log"
    assert server.run(train_args(spec, dataset, tmp_path), log) == 1
    text = log.read_text()
    assert "training diverged at step" in text and "last good checkpoint" in text
    assert "Traceback" not in text
    assert not (tmp_path / "model.pt").exists()


def _too_slow(signum, frame):
    raise AssertionError("the diverged run kept going (a forward pass with exploded norms)")


def test_an_exploding_norm_estimate_stops_the_job_before_the_next_forward_pass(
    dataset, tmp_path, capsys
):
    """A huge learning rate blows the operator norms up while the loss is still finite; the
    job stops right after the power iteration, naming the step, the norm and the last good
    checkpoint, and never runs the forward pass, whose sub-step count grows with the norm
    squared (about 10^8 sub-steps here: hours)."""
    spec = {
        **SPEC,
        "train": {**SPEC["train"], "lr_max": 1.0e6, "warmup": 0.1, "max_norm": 5.0},
    }
    spec["train"]["checkpoint_every"] = 1
    previous = signal.signal(signal.SIGALRM, _too_slow)
    signal.alarm(240)
    try:
        code = cli.main(train_args(spec, dataset, tmp_path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 1
    line = one_error_line(capsys.readouterr().err, "training diverged at step", "loss=not computed")
    step = int(re.search(r"at step (\d+)", line).group(1))
    assert re.search(r"largest norm estimate=[0-9.e+]+ \(limit 5.0\)", line), line
    assert f"last good checkpoint: {tmp_path / 'work' / 'checkpoint.pt'} (step {step})" in line
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "log.csv").exists()


# A training job under a memory ceiling: the limit (RLIMIT_AS) is set after torch is imported,
# at the address space mapped so far plus argv[1] bytes, so it bounds what the run allocates.
MEMORY_CAPPED = r"""
import resource, sys
import torch
from stablenets.pipeline import cli, jobs
status = open("/proc/self/status").read()
mapped = int(status.split("VmSize:")[1].split()[0]) * 1024
limit = mapped + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(cli.main(sys.argv[2:]))
"""
HEADROOM = 3 * 2**30  # the smoke classifier's training needs under 1 GiB
# The smoke classifier at 30x its learning rate, seeded: its sub-steps run away (norms below
# max_norm), to a pass of 1,864 at the guard's stop, which would hold more than 3 GiB.
RUNAWAY = {"lr_max": 3.0, "checkpoint_every": 10}
# At 10x: the guard stops it at step 48 (188 sub-steps), and a limit of 188 fits in memory.
MILD_RUNAWAY = {"lr_max": 1.0, "checkpoint_every": 10}
AUTO_HEADROOM = (
    5 * 2**28
)  # 1.25 GiB: the auto limit stops the runaway sooner (its last steps are slow)


@pytest.fixture(scope="module")
def smoke_cifar(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smoke-data") / "cifar10.h5"
    data.make_synthetic_classification(path, **smoke_config()["data"]["cifar10"]["synthetic"])
    return path


def smoke_train_spec(**train) -> dict:
    """The smoke DAG's job spec for the nonexpansive classifier, with ``train`` overrides."""
    jobs = Jobs(validate_config(smoke_config(), SCHEMA))
    spec = json.loads(jobs.train_spec("classification", "nonexpansive", 0))
    spec["train"].update(train)
    return spec


def run_capped(
    spec: dict, dataset: Path, out: Path, headroom: int = HEADROOM
) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", MEMORY_CAPPED, str(headroom), *train_args(spec, dataset, out)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def test_without_the_substep_limit_the_runaway_run_dies_in_the_allocator(smoke_cifar, tmp_path):
    """The failure the limit prevents (the CPU twin of a CUDA out-of-memory at 139 GiB): still
    one line, naming the settings that bound the memory, but not the block that ran away."""
    spec = smoke_train_spec(**RUNAWAY, max_substeps=10**6)
    died = run_capped(spec, smoke_cifar, tmp_path)
    assert died.returncode == 1
    line = one_error_line(
        died.stderr,
        "stablenets train: error: out of memory (CPU, tried to allocate ",
        f"lower classification.train.batch_size (now {spec['train']['batch_size']}), "
        "classification.train.max_substeps (now 1000000) or classification.eval_batch (now "
        f"{spec['eval_batch']})",
        "a rerun resumes from it",
        "; last good checkpoint ",
    )
    assert "block" not in line


@pytest.mark.parametrize(
    "err, expected",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
        (MemoryError(), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("can't allocate memory"), False),
    ],
)  # fmt: skip
def test_out_of_memory_is_recognised_on_either_device(err, expected):
    assert is_out_of_memory(err) is expected


def test_the_out_of_memory_line_promises_a_resume_only_where_the_rerun_resumes():
    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.50 GiB. GPU 0 has ...")
    pnp_spec = {"pnp": {"batch_size": 20, "group_size": 40, "val_images": 20}}
    pnp = cli._out_of_memory_line("pnp", pnp_spec, err)
    assert pnp == (  # the strength is chosen on every validation image at once: they count too
        "stablenets pnp: error: out of memory (CUDA, tried to allocate 7.50 GiB): lower "
        "pnp.batch_size (now 20), pnp.group_size (now 40) or pnp.val_images (now 20); what the "
        "job saved is kept, and a rerun resumes from it unless it changes pnp.val_images, which "
        "starts it again (a change of pnp.group_size solves its saved image groups again)"
    )
    tv_deblur = cli._out_of_memory_line(
        "tv-deblur", {"pnp": {"group_size": 40, "val_images": 20}}, MemoryError()
    )
    assert tv_deblur.endswith("lower pnp.group_size (now 40) or pnp.val_images (now 20); what "
                              "the job saved is kept, and a rerun resumes from it unless it "
                              "changes pnp.val_images, which starts it again (a change of "
                              "pnp.group_size solves its saved image groups again)")  # fmt: skip
    train = {"batch_size": 128, "max_substeps": "auto", "memory_fraction": 0.8}
    auto = cli._out_of_memory_line(
        "train", {"task": "denoising", "train": train, "eval_batch": 4}, err
    )  # the limit is a share of the memory: that share is what to lower, and keeps the progress
    assert auto.endswith(
        "lower denoising.train.batch_size (now 128), denoising.train.memory_fraction (now 0.8) or "
        "denoising.eval_batch (now 4); what the job saved is kept, and a rerun resumes from it "
        "unless it changes denoising.train.batch_size, which starts it again"
    ), auto  # eval_batch only batches validation: lowering it keeps the finished steps
    train = {"batch_size": 128, "max_substeps": 3000}
    capped = cli._out_of_memory_line("train", {"task": "classification", "train": train}, err)
    assert "unless it changes classification.train.batch_size, which" in capped
    assert "max_substeps (now 3000)" in capped
    tv = cli._out_of_memory_line(
        "evaluate-tv", {"tv": {"group_size": 20, "val_images": None}}, MemoryError()
    )  # the weight is chosen on every validation image at once: their number counts too
    assert tv.endswith("out of memory (host): lower denoising.tv.group_size (now 20) or "
                       "denoising.tv.val_images (now None); what the job saved is kept, and a "
                       "rerun resumes from it unless it changes denoising.tv.val_images, which "
                       "starts it again (a change of denoising.tv.group_size solves its saved "
                       "image groups again)")  # fmt: skip
    fixed = cli._out_of_memory_line("prepare-data", {}, MemoryError())
    assert fixed.endswith("run it where more memory is free; a rerun starts it again")
    ev = {"evaluate": {"batch_size": 5, "group_size": 20, "lipschitz_search": {"images": 2}}}
    denoiser = cli._out_of_memory_line("evaluate-denoiser", ev, err)
    assert denoiser.endswith("lower denoising.evaluate.batch_size (now 5), "
                             "denoising.evaluate.group_size (now 20) or "
                             "denoising.evaluate.lipschitz_search.images (now 2); what the job "
                             "saved is kept, and a rerun resumes from it (a change of "
                             "denoising.evaluate.lipschitz_search.images redoes only its "
                             "Lipschitz search) (a change of denoising.evaluate.group_size "
                             "solves its saved image groups again)"), denoiser  # fmt: skip
    # a denoiser's images are denoised each on its own: its batch size keeps every saved group,
    # as a classifier's does not (its attacks are seeded per batch)
    classifier = cli._out_of_memory_line("evaluate-classifier", ev, err)
    assert "unless it changes classification.evaluate.batch_size, which starts" in classifier


def test_runaway_substeps_stop_the_job_in_one_line_naming_the_block_and_a_resumable_checkpoint(
    smoke_cifar, tmp_path
):
    spec = smoke_train_spec(**MILD_RUNAWAY)
    limit, ckpt = spec["train"]["max_substeps"], tmp_path / "work" / "checkpoint.pt"
    stopped = run_capped(spec, smoke_cifar, tmp_path)
    assert stopped.returncode == 1
    good = read_checkpoint(ckpt)["run"]["step"]
    line = one_error_line(
        stopped.stderr,
        "training stopped at step ",
        f"above train.max_substeps={limit} (their activations would not fit in memory)",
        f"; last good checkpoint: {ckpt} (step {good})",
    )
    at = int(re.search(r"training stopped at step (\d+):", line)[1])
    assert good < at <= good + spec["train"]["checkpoint_every"], (good, at)
    found = re.search(r"would take (\d+) sub-steps.*; block (\S+) needs (\d+) at norm est", line)
    total, block, count = int(found[1]), found[2], int(found[3])
    assert limit < total and 0 < count <= total, line
    model = build_model(spec["model"], **spec["kwargs"])
    assert block in dict(model.named_modules()), block
    assert re.search(rf"^step {good}/200 loss .* eta \S+$", stopped.stdout, re.M), stopped.stdout
    assert not (tmp_path / "model.pt").exists()
    # Resumable: the checkpoint is the run's own; the same command resumes from it (and, being
    # deterministic, stops again at the same step with the same line).
    again = run_capped(spec, smoke_cifar, tmp_path)
    assert f"resumed from {ckpt} at step {good}" in again.stdout, again.stdout
    assert again.returncode == 1 and one_error_line(again.stderr) == line
    # A higher limit resumes from the same checkpoint (limits are not in the resume hash) and
    # passes the step that stopped.
    higher = copy.deepcopy(spec)
    higher["train"]["max_substeps"] = total
    raised = run_capped(higher, smoke_cifar, tmp_path)
    assert f"resumed from {ckpt} at step {good}" in raised.stdout, raised.stdout
    later = re.search(r"training stopped at step (\d+)", raised.stderr)
    assert raised.returncode == 0 or (later and int(later[1]) > at), raised.stderr[-2000:]


def test_runaway_substeps_stop_before_memory_runs_out_with_the_limit_sized_from_free_memory(
    smoke_cifar, tmp_path
):
    """``max_substeps: auto`` under an address-space cap (the CPU twin of a smaller GPU): the
    limit is read from the memory left, so the run that dies in the allocator without a limit
    stops in the guard's line instead, before the pass that would not fit."""
    spec = smoke_train_spec(**RUNAWAY, max_substeps="auto")
    ckpt = tmp_path / "work" / "checkpoint.pt"
    stopped = run_capped(spec, smoke_cifar, tmp_path, AUTO_HEADROOM)
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    good = read_checkpoint(ckpt)["run"]["step"]
    line = one_error_line(stopped.stderr, "training stopped at step ", "train.max_substeps=auto")
    size = r"([\d.]+ [MG]iB)"
    found = re.search(
        rf"would take (\d+) sub-steps keeping {size} of activations, above the {size} that "
        rf"train\.max_substeps=auto allows \(80% of the {size} left under ulimit -v\); "
        r"block (\S+) needs (\d+) at norm estimate [\d.e+]+; last good checkpoint: (.*)$",
        line,
    )
    assert found, line
    need, allowed, free = map(_bytes, found.group(2, 3, 4))
    assert need > allowed and allowed == pytest.approx(0.8 * free, rel=0.01), line
    assert 0 < free < AUTO_HEADROOM, line  # the cap, less what the job has mapped (fragments too)
    assert found[7] == f"{ckpt} (step {good})", line
    assert found[5] in dict(build_model(spec["model"], **spec["kwargs"]).named_modules())
    start = re.search(rf"^sub-step limit \(train.max_substeps=auto\): activations up to {size}, "
                      rf"80% of the {size} left under ulimit -v; a pass keeps {size} at the "
                      r"current (\d+) sub-steps$", stopped.stdout, re.M)  # fmt: skip
    # the start's budget, or less where less is free before the pass (allocator fragments)
    assert start and allowed <= _bytes(start[1]) and _bytes(start[3]) < allowed, stopped.stdout


def _bytes(size: str) -> float:
    """``"2.36 GiB"`` or ``"24.0 MiB"`` in bytes."""
    value, unit = size.split()
    return float(value) * {"MiB": 2**20, "GiB": 2**30}[unit]


# ============================================================================================
# Bad input
# ============================================================================================


def smoke_config(**extra) -> dict:
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    return overlay(overlay(base, smoke), extra)


BAD_CONFIGS = {
    "wrong type": (
        {"classification": {"train": {"batch_size": "64"}}},
        "classification.train.batch_size: '64' is not of type 'integer'",
    ),
    "no sub-step": (
        {"classification": {"train": {"max_substeps": 0}}},
        "classification.train.max_substeps: 0 is less than the minimum of 1",
    ),
    "a limit that is neither a count nor auto": (
        {"denoising": {"train": {"max_substeps": "Auto"}}},
        "denoising.train.max_substeps: 'Auto' is not allowed; allowed: ['auto']",
    ),
    "a TV weight given twice (solved twice)": (
        {"denoising": {"tv": {"weights": [0.1, 0.1]}}},
        "denoising.tv.weights: [0.1, 0.1] has non-unique elements",
    ),
    "more memory than there is": (
        {"denoising": {"train": {"memory_fraction": 1.5}}},
        "denoising.train.memory_fraction: 1.5 is greater than the maximum of 0.95",
    ),
    "unknown model": (
        {"denoising": {"variants": {"euler": {"model": "transformer"}}}},
        "denoising.variants.euler.model: 'transformer' is not allowed; allowed: [",
    ),
    "classifier as a denoiser": (
        {"denoising": {"variants": {"euler": {"model": "resnet_classifier"}}}},
        "denoising.variants.euler.model: 'resnet_classifier' is not a denoising model; allowed:",
    ),
    "negative steps": (
        {"denoising": {"train": {"steps": -5}}},
        "denoising.train.steps: -5 is less than the minimum of 1",
    ),
    "theta above 1": (
        {"denoising": {"variants": {"averaged": {"kwargs": {"theta": 1.5}}}}},
        "denoising.variants.averaged.kwargs.theta: 1.5 is greater than the maximum of 1",
    ),
    "theta 0": (
        {"denoising": {"variants": {"averaged": {"kwargs": {"theta": 0}}}}},
        "denoising.variants.averaged.kwargs.theta: 0 is less than or equal to the minimum of 0",
    ),
    "PnP step size": ({"pnp": {"eta": 2.5}}, "pnp.eta: 2.5 must be < 2/||K||^2 = "),
    "unknown integrator": (
        {"denoising": {"variants": {"euler": {"kwargs": {"integrator": "rk5"}}}}},
        "denoising.variants.euler.kwargs.integrator: 'rk5' is not allowed; allowed: [",
    ),
    "margin loss offset of the wrong type": (
        {
            "classification": {
                "variants": {"resnet": {"train": {"loss": {"name": "margin", "offset": "x"}}}}
            }
        },
        "classification.variants.resnet.train.loss.offset: 'x' is not of type 'number'",
    ),  # fmt: skip
    "misspelt key": (
        {"classification": {"train": {"stepz": 3}}},
        "classification.train.stepz: unknown key; allowed: ",
    ),
    "a count written as a float": (  # JSON Schema's integer; a slice or linspace would fail
        {"classification": {"evaluate": {"eps": {"num": 40.0}}}},
        "classification.evaluate.eps.num: 40.0 is not of type 'integer'",
    ),
    "a count or null written as a float": (
        {"classification": {"evaluate": {"n_test": 1.0e3}}},
        "classification.evaluate.n_test: 1000.0 is not of type 'null' or of type 'integer'",
    ),
    "a limit or auto written as a float": (
        {"classification": {"train": {"max_substeps": 2000.0}}},
        "classification.train.max_substeps: 2000.0 is not of type 'integer' or one of ['auto']",
    ),
    "a seed written as a float": ({"seeds": [1.0]}, "seeds.0: 1.0 is not of type 'integer'"),
    "a one-step warm-up": (  # OneCycleLR would divide by zero in every training job
        # (the resnet's warm-up of 0.2 would be under one step: its own steps keep it apart)
        {
            "classification": {
                "train": {"steps": 2},
                "variants": {"resnet": {"train": {"steps": 10}}},
            }
        },  # fmt: skip
        "classification.train: warmup 0.5 x steps 2 is one warm-up step",
    ),
    "a variant's one-step warm-up": (
        {"classification": {"variants": {"resnet": {"train": {"steps": 5}}}}},
        "classification.variants.resnet.train: warmup 0.2 x steps 5 is one warm-up step",
    ),
    "a warm-up that runs downward": (
        {"denoising": {"train": {"lr_max": 1.0e-6}}},
        "denoising.train: lr_initial 1e-05 must be below lr_max 1e-06",
    ),
    "a variant named as the TV baseline": (  # its rows would merge with TV's in the tables
        {"denoising": {"variants": {"tv": {"model": "dncnn"}}}},
        "denoising.variants.tv: 'tv' names the TV baseline in the tables; rename the variant",
    ),
    "a name YAML reads as a number": (  # the workflow's sorting of names would stop on it
        {"denoising": {"variants": {64: {"model": "dncnn"}}}},
        "denoising.variants.64: a name must be a string; quote it ('64')",
    ),
    "a batch larger than the training set": (  # every training job would stop at its step 0
        {"denoising": {"train": {"batch_size": 64}}},
        "denoising.train.batch_size: 64 is more than the BSDS500 training set (48 images)",
    ),
    "a variant's batch larger than the training set": (
        {"classification": {"variants": {"resnet": {"train": {"batch_size": 4096}}}}},
        "classification.variants.resnet.train.batch_size: 4096 is more than the CIFAR-10 "
        "training set (3000 images)",
    ),
    "a classifier for other classes than the data's": (
        {"classification": {"variants": {"resnet": {"kwargs": {"num_classes": 20}}}}},
        "classification.variants.resnet.kwargs.num_classes: 20, but the CIFAR-10 data give 10",
    ),
    "a classifier certified for other images than the data's": (
        {"classification": {"variants": {"resnet": {"kwargs": {"input_size": 16}}}}},
        "classification.variants.resnet.kwargs.input_size: 16, but the CIFAR-10 data give [32, 32]",
    ),
    "classifiers that keep a default the data do not fit": (  # one line, not one per variant
        {"data": {"cifar10": {"synthetic": {"image_size": 16}}}},
        "classification.variants: ['nonexpansive', 'resnet', 'cpl_XS', 'sll_XS', 'aol_XS', "
        "'orthogonal_XS'] keep the default input_size 32, but the CIFAR-10 data give [16, 16]; "
        "set kwargs.input_size",
    ),
    "a denoiser for grey images": (
        {"denoising": {"variants": {"dncnn": {"kwargs": {"channels": 1}}}}},
        "denoising.variants.dncnn.kwargs.channels: 1, but the BSDS500 data give 3",
    ),
    "an empty validation split": (  # round(1e-6 x 50,000) = 0 images to validate on
        {"data": {"cifar10": {"source": "download", "val_fraction": 1.0e-6}}},
        "data.cifar10.val_fraction: 1e-06 leaves no CIFAR-10 validation images",
    ),
    "more PnP images than the test set": (
        {"pnp": {"n_images": 9}},
        "pnp.n_images: 9 is more than the BSDS500 test set (8 images)",
    ),
    "an evaluation on more test images than there are": (  # the caption would quote them
        {"denoising": {"evaluate": {"n_test": 9}}},
        "denoising.evaluate.n_test: 9 is more than the BSDS500 test set (8 images)",
    ),
    "a Lipschitz search on more images than are evaluated": (
        {"classification": {"evaluate": {"lipschitz_search": {"images": 51}}}},
        "classification.evaluate.lipschitz_search.images: 51 is more than the 50 test images "
        "evaluated",
    ),
    "a TV deblurring weight chosen on more validation images than there are": (
        {"pnp": {"val_images": 9}},
        "pnp.val_images: 9 is more than the BSDS500 validation set (8 images)",
    ),
    "a TV denoising weight chosen on more validation images than there are": (
        {"denoising": {"tv": {"val_images": 12}}},
        "denoising.tv.val_images: 12 is more than the BSDS500 validation set (8 images)",
    ),
    "a TV deblurring weight given alone, as before its choice on validation images": (
        {"pnp": {"tv": {"weight": 0.01}}},
        "pnp.tv.weight: unknown key; allowed: iters, step, tol, weights",
    ),
    "a PnP denoiser twice": (
        {"pnp": {"denoisers": ["averaged", "averaged"]}},
        "pnp.denoisers: ['averaged', 'averaged'] has non-unique elements",
    ),
    "a setting the block ignores": (
        {"denoising": {"variants": {"aol": {"kwargs": {"theta": 0.5}}}}},
        "denoising.variants.aol.kwargs.theta: the aol block does not use 'theta'; remove it",
    ),
    # settings the jobs would reject only after training: refused at parse time
    "custom AutoAttack without attacks": (
        {"classification": {"evaluate": {"strong": {"version": "custom", "attacks": None}}}},
        "classification.evaluate.strong: give attacks exactly when version='custom'",
    ),
    "PGD restarts from one start": (
        {"classification": {"evaluate": {"pgd": {"restarts": 2, "random_start": False}}}},
        "classification.evaluate.pgd: restarts > 1 without random_start would repeat the same",
    ),
    "a number YAML reads as text": (
        {"pnp": {"tol": "1e-5"}},
        "pnp.tol: '1e-5' is not of type 'number' (YAML reads 1e-5 as text: write it with a dot",
    ),
    "decreasing radius grid": (
        {"classification": {"evaluate": {"eps": {"start": 1.0, "stop": 0.5}}}},
        "classification.evaluate.eps: start 1.0 must be below stop 0.5",
    ),
    "a radius grid of one radius": (
        {"classification": {"evaluate": {"eps": {"start": 0.5, "stop": 0.5}}}},
        "classification.evaluate.eps: start 0.5 must be below stop 0.5",
    ),
    "patch larger than the images": (
        {"denoising": {"patch": [48, 40]}},
        "denoising.patch: [48, 40] is larger than the BSDS500 images ([40, 48])",
    ),
    "a blur kernel larger than the images PnP deblurs": (
        {"pnp": {"blur": {"size": 41, "sigma": 3.0}}},
        "pnp.blur: kernel 41x41 larger than image 40x48 (the BSDS500 images)",
    ),
    "even blur size": (
        {"pnp": {"blur": {"size": 8}}},
        "pnp.blur: Gaussian kernel size must be a positive odd integer, got 8",
    ),
    "a BSDS500 crop of a portrait's size": (  # the photographs are turned to landscape first
        {"data": {"bsds500": {"source": "download", "size": [481, 321]}}},
        "data.bsds500.size: [481, 321] is larger than the BSDS500 photographs (321x481, "
        "portraits turned to landscape)",
    ),
    "a robustness figure of a variant that does not run": (
        {"classification": {"select": ["nonexpansive"], "robustness_figure": ["resnet"]}},
        "classification.robustness_figure: ['resnet'] are not among the variants that run; "
        "allowed: ['nonexpansive']",
    ),
    "noise levels of one path label": (
        {"denoising": {"noise_levels": [0.05, 0.050000001]}},
        "denoising.noise_levels: [0.05, 0.050000001] share path labels ['0.05', '0.05']",
    ),
    "a seed past 64-bit generators": (
        {"seeds": [0, 2**40]},
        "seeds.1: 1099511627776 is greater than the maximum of 2147483647",
    ),
    "standard radii of one table column": (
        {"classification": {"evaluate": {"standard_eps": [0.1411764706, 0.14117647]}}},
        "classification.evaluate.standard_eps: [0.1411764706, 0.14117647] share table columns "
        "['36/255', '36/255']",
    ),
}


def test_the_shipped_configs_are_valid():
    validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()), SCHEMA)
    validate_config(smoke_config(), SCHEMA)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_value_fails_with_one_line_naming_the_key(case):
    over, message = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as err:
        validate_config(smoke_config(**over), SCHEMA)
    header, *problems = str(err.value).splitlines()
    assert header == "invalid configuration:"
    assert len(problems) == 1, str(err.value)  # one line: the key, the value, what is allowed
    assert problems[0].strip().startswith("config: " + message.split(":")[0]), problems[0]
    assert message in problems[0], problems[0]


def test_switching_the_strong_attack_to_pgd_needs_no_other_edit():
    """``strong: {method: pgd}`` over the paper's settings was refused for their AutoAttack
    ``grid_attacks``: settings of the other method are ignored, as ``steps`` is with AutoAttack."""
    from stablenets.evaluation.radius_sweep import SweepPlan, runs_grid_attacks

    raw = copy.deepcopy(yaml.safe_load((ROOT / "config.yaml").read_text()))
    raw["classification"]["evaluate"]["strong"]["method"] = "pgd"
    assert raw["classification"]["evaluate"]["strong"]["grid_attacks"] is not None
    strong = validate_config(raw, SCHEMA)["classification"]["evaluate"]["strong"]
    assert not runs_grid_attacks(strong)
    ev = validate_config(raw, SCHEMA)["classification"]["evaluate"]
    plan = SweepPlan.from_config(ev, seed=0, log=lambda line: None)
    assert plan.grid is None  # the bisection runs the strong PGD


def test_autoattack_on_fewer_classes_than_its_losses_need_fails_before_training():
    """pyautoattack's targeted DLR loss reads the fourth largest logit: APGD-T on three classes
    fails with an IndexError inside the attack, after training. The config names both runs that
    would (the strong attack and the grid's); the attack itself refuses in one line too."""
    from stablenets.evaluation.robustness import autoattack_l2

    three = {
        "data": {"cifar10": {"synthetic": {"num_classes": 3}}},
        "classification": {
            "variants": {
                name: {"kwargs": {"num_classes": 3}}
                for name in smoke_config()["classification"]["variants"]
            },
            "evaluate": {
                "strong": {
                    "version": "standard",
                    "attacks": None,
                    "grid_attacks": ["apgd-t"],
                    "on_grid": True,
                }
            },
        },
    }
    with pytest.raises(ConfigError) as err:
        validate_config(smoke_config(**three), SCHEMA)
    assert str(err.value).splitlines()[1:] == [
        "  config: classification.evaluate.strong: AutoAttack standard needs 4 classes or "
        "more; the CIFAR-10 data have 3",
        "  config: classification.evaluate.strong.grid_attacks: AutoAttack custom [apgd-t] "
        "needs 4 classes or more; the CIFAR-10 data have 3",
    ]
    three["classification"]["evaluate"]["strong"] = {
        "version": "custom",
        "attacks": ["apgd-ce"],
        "grid_attacks": None,
    }
    validate_config(smoke_config(**three), SCHEMA)  # cross-entropy alone needs two
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with pytest.raises(ValueError, match="needs 4 classes or more, the model has 3"):
        autoattack_l2(model, torch.rand(2, 3, 2, 2), torch.zeros(2, dtype=torch.long), 0.5)
    dlr = {"version": "custom", "attacks": ["apgd-dlr"], "grid_attacks": ["apgd-t"]}
    three["classification"]["evaluate"]["strong"] = {**dlr, "on_grid": False}  # grid unused
    validate_config(smoke_config(**three), SCHEMA)  # the DLR loss needs three
    three["data"]["cifar10"]["synthetic"]["num_classes"] = 2
    for variant in three["classification"]["variants"].values():
        variant["kwargs"]["num_classes"] = 2
    with pytest.raises(ConfigError, match=r"AutoAttack custom \[apgd-dlr\] needs 3 classes"):
        validate_config(smoke_config(**three), SCHEMA)


def test_a_config_file_that_is_not_a_mapping_of_settings_fails_in_one_line(tmp_path):
    """Broken YAML names the file, line and column; a key given twice (a copied variant block
    left under its old name) names both lines; a file holding a list names what it holds, an
    empty one too (Snakemake refuses it, naming no file); a bad value names the file that set
    it."""
    broken, listed, empty = tmp_path / "broken.yaml", tmp_path / "list.yaml", tmp_path / "e.yaml"
    broken.write_text("pnp:\n  denoisers: [averaged, dncnn\nseeds: [0]\n")
    twice = tmp_path / "twice.yaml"
    twice.write_text("classification:\n  variants:\n    euler: {}\n    heun: {}\n    euler: {}\n")
    listed.write_text("- seeds\n- 0\n")
    empty.write_text("# nothing yet\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: [0]\npnp:\n  eta: 5.0\n")
    misspelt = tmp_path / "misspelt.yaml"  # two in one mapping: each its own line, each named
    misspelt.write_text("pnp:\n  etaa: 1.0\n  tola: 2.0\n")
    base = [ROOT / "config.yaml", ROOT / "config" / "smoke.yaml"]
    for path, message, lines in (
        (broken, f"config: {broken}: not valid YAML: line 3, column 6: ", 0),  # + PyYAML's
        (twice, f"config: {twice}: not valid YAML: line 5, column 5: key 'euler' given twice", 0),
        (listed, f"config: {listed}: holds a list, not a mapping of settings", 0),
        (empty, f"config: {empty}: holds no settings (Snakemake refuses an empty config file)", 0),
        (bad, f"invalid configuration:\n  {bad}: pnp.eta: 5.0 must be < 2/||K||^2", 1),
        (misspelt, f"invalid configuration:\n  {misspelt}: pnp.etaa: unknown key; allowed:", 2),
    ):
        with pytest.raises(ConfigError) as err:
            load_config([*base, path], SCHEMA)
        said = str(err.value)
        assert said.startswith(message) and said.count("\n") == lines, said
    assert f"\n  {misspelt}: pnp.tola: unknown key" in said
    # what Snakemake reads is read: JSON (tabs included), YAML anchors and merge keys
    merged, tabbed = tmp_path / "merged.yaml", tmp_path / "tabbed.json"
    merged.write_text(
        "pnp:\n  tv: &tv {iters: 7, tol: 0.001}\ndenoising:\n  tv: {<<: *tv, tol: 0.01}\n"
    )
    tabbed.write_text('{\n\t"pnp": {"max_iter": 9}}')
    config = load_config([*base, merged, tabbed], SCHEMA)
    assert config["denoising"]["tv"]["iters"] == 7 and config["denoising"]["tv"]["tol"] == 0.01
    assert config["pnp"]["max_iter"] == 9


def test_a_cross_field_problem_is_named_by_the_file_that_set_either_of_its_keys(tmp_path):
    """``pnp.noise_level`` (set in config.yaml) must be one of ``denoising.noise_levels``: an
    overlay that changed the noise levels alone was told config.yaml was at fault."""
    levels = tmp_path / "levels.yaml"
    levels.write_text("denoising:\n  noise_levels: [0.05]\n")
    with pytest.raises(ConfigError) as err:
        load_config([ROOT / "config.yaml", levels], SCHEMA)
    assert str(err.value) == (
        f"invalid configuration:\n  {levels}: pnp.noise_level: 0.15 is not one of "
        "denoising.noise_levels [0.05]"
    )


def test_the_config_files_read_before_snakemake_are_those_snakemake_reads(tmp_path):
    """The workflow's config.yaml, skipped where absent with --configfile files given (Snakemake
    goes on with them) or with --replace-workflow-config, then each --configfile."""
    own, over = tmp_path / "config.yaml", tmp_path / "over.yaml"
    assert snakemake_files(own, [over], replace=False) == [over]  # absent
    own.write_text("seeds: [0]\n")
    assert snakemake_files(own, [over], replace=False) == [own, over]
    assert snakemake_files(own, [over], replace=True) == [over]
    assert snakemake_files(own, [], replace=False) == [own]


# Keys a config may leave out with no default to fill them: the code does without them.
OPTIONAL_KEYS = re.compile(
    r"(classification|denoising)\.(select|train\.(loss|budget_minutes|stop_after)"
    r"|variants\.[^.]+(\.(size|kwargs(\..+)?|train(\.[^.]+)?|train\.loss\.temperature))?)"
    r"|data\.(cifar10|bsds500)\.(urls|md5|sha256)"  # a synthetic or photo source needs none
    r"|classification\.evaluate\.strong\.attacks"  # version custom only
)


def _key_paths(node: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping, one per variant name pattern (``variants.*``)."""
    out, seen = [], set()
    for key, value in node.items():
        for path in [(*prefix, key)] + (_key_paths(value, (*prefix, key)) if isinstance(
                value, dict) else []):  # fmt: skip
            generic = re.sub(r"variants\.[^.]+", "variants.*", ".".join(map(str, path)))
            if generic not in seen:
                seen.add(generic)
                out.append(path)
    return out


@pytest.mark.parametrize("scale", ["paper", "smoke"])
def test_every_config_key_left_out_is_named_by_the_error_or_filled_by_a_default(scale):
    """The adversary deletes each key of the shipped config in turn (one variant of each
    pattern). Either the config is refused, each line naming the key, or the validated
    config holds the key again (a schema default), or the key is one the code does without
    (``OPTIONAL_KEYS``): never a config that passes and a job that fails hours later on a
    KeyError."""
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    config = base if scale == "paper" else smoke_config()
    schema = yaml.safe_load(SCHEMA.read_text())
    unnamed, dropped = [], []
    for path in _key_paths(config):
        broken = copy.deepcopy(config)
        functools.reduce(lambda node, key: node[key], path[:-1], broken).pop(path[-1])
        where, key = ".".join(map(str, path[:-1])), str(path[-1])
        try:
            valid = validate_config(broken, schema)
        except ConfigError as err:
            problems = str(err).splitlines()[1:]  # one line per problem
            # each names the key, or a setting that refers to it (every variant of a size)
            named = [f"config: {where}" in line and key in line or f"'{key}'" in line
                     or f"{where}.{key}" in line for line in problems]  # fmt: skip
            if not problems or not all(named):
                unnamed.append((".".join(map(str, path)), problems))
            continue
        parent = functools.reduce(lambda node, key: node.get(key, {}), path[:-1], valid)
        if path[-1] not in parent and not OPTIONAL_KEYS.fullmatch(".".join(map(str, path))):
            dropped.append(".".join(map(str, path)))
    assert not unnamed, unnamed
    assert not dropped, f"left out, no default, not optional: {dropped}"


def test_a_job_on_the_other_tasks_dataset_or_on_a_missing_gpu_fails_with_one_line(
    dataset, tmp_path, capsys
):
    photos = tmp_path / "bsds.h5"
    data.make_smoke_photos(photos, (16, 16), 4, 2, 2, 0)
    assert cli.main(train_args(SPEC, photos, tmp_path / "a")) == 1
    one_error_line(
        capsys.readouterr().err,
        f"{photos} holds a denoising dataset; this job needs classification",
    )
    assert cli.main(train_args({**SPEC, "device": "cuda:99"}, dataset, tmp_path / "b")) == 1
    one_error_line(capsys.readouterr().err, "device: 'cuda:99' requested but this machine has")


def test_model_arguments_the_model_refuses_fail_training_in_one_line_naming_the_variant(
    dataset, tmp_path, capsys
):
    """The config's checks know the arguments' names, not whether the model takes their values
    (that needs building every model: 30 s for the paper's on a CPU, at each Snakemake start)."""
    spec = {**SPEC, "kwargs": {**SPEC["kwargs"], "stages": 6}}
    assert cli.main(train_args(spec, dataset, tmp_path)) == 1
    one_error_line(
        capsys.readouterr().err,
        "classification.variants.tiny.kwargs: input_size 16 is too small for 6 stages",
    )


def test_a_null_model_argument_reaches_the_job_where_it_is_not_the_models_default():
    """``init_norm: null`` (PyTorch's initialisation) is not the paper classifier's default (1):
    the job builds what the config says. ``power_size: null`` is the denoisers' default: the
    spec is as without it."""
    kwargs = {"variants": {"nonexpansive": {"kwargs": {"init_norm": None}}}}
    jobs = Jobs(validate_config(smoke_config(classification=kwargs), SCHEMA))
    spec = json.loads(jobs.train_spec("classification", "nonexpansive", 0))["kwargs"]
    assert "init_norm" in spec and spec["init_norm"] is None
    torch.manual_seed(0)
    built = build_model("nonexpansive_classifier", **spec)
    torch.manual_seed(0)
    rescaled = build_model("nonexpansive_classifier", **{**spec, "init_norm": 1.0})
    assert not torch.equal(built.lift.weight, rescaled.lift.weight)
    denoiser = json.loads(jobs.train_spec("denoising", "euler", 0, "0.05"))
    assert "power_size" not in denoiser["kwargs"]


def test_a_hand_written_spec_missing_a_key_fails_with_one_line_naming_it(dataset, tmp_path, capsys):
    """What the job reads and the spec lacks, top-level or nested, also where the key is
    elsewhere in the spec (``pnp.seed`` beside ``seed``): one line, not a traceback. A KeyError
    of a job's own dict keeps its traceback."""
    for i, spec in enumerate(
        (
            {k: v for k, v in SPEC.items() if k != "train"},
            {**SPEC, "train": {k: v for k, v in SPEC["train"].items() if k != "batch_size"}},
        )
    ):
        assert cli.main(train_args(spec, dataset, tmp_path / str(i))) == 1
        needles = ["--spec has no key 'train'"] if i == 0 else ["--spec train: ", "'batch_size'"]
        one_error_line(capsys.readouterr().err, *needles)

    def raised(read: Callable[[dict], object]) -> KeyError:
        try:
            read(SPEC)
        except KeyError as err:
            return err
        raise AssertionError("no KeyError")

    assert cli._missing_spec_key(raised(lambda spec: spec["absent"]), SPEC) == "absent"
    assert cli._missing_spec_key(raised(lambda spec: spec["train"]["absent"]), SPEC) == "absent"

    def own_dict() -> object:
        return {"a": 1}["absent"]

    # a KeyError of a job's own dict (a checkpoint's, a log row's) keeps its traceback
    assert cli._missing_spec_key(raised(lambda spec: own_dict()), SPEC) is None
    # a key the spec has elsewhere (train.steps) is missing where it is read
    assert cli._missing_spec_key(raised(lambda spec: spec["steps"]), SPEC) == "steps"
    assert cli._missing_spec_key(ValueError("nope"), SPEC) is None
    photos = tmp_path / "photos.h5"
    data.make_smoke_photos(photos, (16, 24), 4, 2, 2, 0)
    pnp = {"n_images": 2, "val_images": 2, "val_noise_seed": 8, "noise": 0.01,
           "blur": {"size": 3, "sigma": 1.0}, "tv": {}}  # fmt: skip
    tv = {"seed": 0, "device": "cpu", "variant": "tv", "pnp": pnp}  # pnp.seed left out
    args = ["--data", str(photos), "--out", str(tmp_path / "tv.h5"), "--workdir", str(tmp_path)]
    assert cli.main(["tv-deblur", "--spec", json.dumps(tv), *args]) == 1
    one_error_line(capsys.readouterr().err, "--spec has no key 'seed' where the job reads it")


STAND_IN = {"n_train": 8, "n_val": 4, "n_test": 4, "num_classes": 2, "image_size": 8,
            "noise": 0.1, "seed": 0}  # fmt: skip


@pytest.mark.parametrize(
    ("synthetic", "needle"),
    [
        ({**STAND_IN, "n_test": None}, "missing a required argument: 'n_test'"),
        ({**STAND_IN, "n_tset": 4}, "unexpected keyword argument 'n_tset'"),
    ],
)
def test_a_hand_written_stand_in_data_spec_with_a_setting_missing_or_misspelt_fails_in_one_line(
    synthetic, needle, tmp_path, capsys
):
    synthetic = {k: v for k, v in synthetic.items() if v is not None}
    spec = {"source": "synthetic", "dataset": "cifar10", "synthetic": synthetic}
    args = ["--cache", str(tmp_path), "--urls", "[]", "--out", str(tmp_path / "d.h5")]
    assert cli.main(["prepare-data", "--spec", json.dumps(spec), *args]) == 1
    one_error_line(capsys.readouterr().err, "--spec synthetic: ", needle)
    assert not (tmp_path / "d.h5").exists()
    assert not (tmp_path / f"d.{cli.ATTEMPTS_LOG}").exists()  # nothing downloaded, no history
    # a download's attempts (hours at BSDS500's kB/s) are kept in its cache, by dataset
    cache = tmp_path / "cache"
    urls = ["--urls", '["file:///absent/x.tgz"]']
    args = ["--cache", str(cache), *urls, "--out", str(tmp_path / "d.h5")]
    assert cli.main(["prepare-data", "--spec", json.dumps(spec), *args]) == 1
    history = (cache / f"d.{cli.ATTEMPTS_LOG}").read_text().splitlines()
    assert history[0].startswith("stablenets prepare-data: started ") and needle in history[1]


def test_a_finished_training_rerun_with_other_threads_or_intervals_resumes_at_its_end(
    dataset, tmp_path
):
    """Snakemake reruns a job whose spec changed; a change of where it runs, how often it
    logs or saves, or how it spends memory (recomputed sub-steps, CUDA graphs and how many it
    keeps: these restarted it from step 0) changes no number, so the rerun resumes from the last
    checkpoint: no step is trained again and the model is the same."""
    work, first, again = tmp_path / "work", tmp_path / "a", tmp_path / "b"
    pipeline_jobs.train_model(SPEC, dataset, first / "m.pt", first / "l.csv", work, log=str)
    memory = {"remat": True, "cuda_graphs": True, "cuda_graph_cache": 2}  # CPU: graphs unused
    changed = {**SPEC, "threads": 2, "train": {**SPEC["train"], "log_every": 1, **memory}}
    lines: list[str] = []
    pipeline_jobs.train_model(changed, dataset, again / "m.pt", again / "l.csv", work, lines.append)
    assert f"resumed from {work / 'checkpoint.pt'} at step 40" in lines
    assert not [line for line in lines if re.match(r"step \d+/40 loss", line)], lines
    weights = [read_checkpoint(d / "m.pt")["state_dict"] for d in (first, again)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _rewritten(path: Path, out: Path, **attrs: object) -> Path:
    """A copy of the HDF5 file ``path`` at ``out`` with ``attrs`` set (written again)."""
    shutil.copyfile(path, out)
    with h5py.File(out, "a") as fh:
        fh.attrs.update(attrs)
    return out


def test_a_training_rerun_on_other_data_starts_afresh_and_on_the_same_data_rewritten_resumes(
    dataset, tmp_path
):
    """The checkpoint's key was the spec alone: data generated again with another seed (or
    split, or downloaded in place of the stand-in) reran the job, which resumed the finished
    checkpoint of the old data and recorded the new data's sha256 beside it. Now the key holds
    what the data file holds; the same data written again under another commit still resumes."""
    work, lines = tmp_path / "work", []
    pipeline_jobs.train_model(SPEC, dataset, tmp_path / "m.pt", tmp_path / "l.csv", work, str)
    same = _rewritten(dataset, tmp_path / "same.h5", git_commit="0" * 40, versions="{}")
    pipeline_jobs.train_model(SPEC, same, tmp_path / "m.pt", tmp_path / "l.csv", work, lines.append)
    assert f"resumed from {work / 'checkpoint.pt'} at step 40" in lines
    other, lines = tmp_path / "other.h5", []
    data.make_synthetic_classification(other, 200, 50, 50, 10, 16, 0.05, 1)
    pipeline_jobs.train_model(
        SPEC, other, tmp_path / "m.pt", tmp_path / "l.csv", work, lines.append
    )
    assert not [line for line in lines if line.startswith("resumed")], lines
    assert any(line.startswith(f"ignoring checkpoint {work / 'checkpoint.pt'}") for line in lines)


def test_pnp_steps_that_grow_stop_the_job_in_one_line_naming_the_model_and_image(
    monkeypatch, tmp_path, capsys
):
    """The non-increasing-steps guarantee raised a plain RuntimeError, which the command line
    showed as a traceback of ten frames; it is an ``InvariantError`` like the certificates'."""
    from stablenets.evaluation import pnp

    def job(spec: dict, *paths: Path, log: Callable[[str], None]) -> None:
        pnp.assert_nonincreasing([1.0, 0.5, 0.75], model="euler", image="test 3")

    monkeypatch.setattr(cli, "_job", lambda name: job)
    paths = [f"--{p}={tmp_path / p}" for p in ("model", "data", "out", "workdir")]
    assert cli.main(["pnp", "--spec", "{}", *paths]) == 1
    one_error_line(
        capsys.readouterr().err,
        "stablenets pnp: error: PnP step differences ||x_(k+1) - x_k|| increase for model "
        "'euler' on image 'test 3' at iteration 2",
    )


def test_a_report_job_on_a_junk_or_missing_result_file_fails_with_one_line_naming_it(
    tmp_path, capsys
):
    junk, missing = tmp_path / "junk.h5", tmp_path / "missing.h5"
    junk.write_bytes(b"not hdf5")
    for path in (junk, missing):
        args = ["table", "--spec", json.dumps({"kind": "classification"}), "--inputs", str(path)]
        assert cli.main([*args, "--out", str(tmp_path / "t.csv")]) == 1
        one_error_line(capsys.readouterr().err, f"{path}: not a readable results file")


def test_a_damaged_result_file_is_read_or_refused_in_one_line_naming_it(tmp_path):
    """HDF5 keeps no checksums: a result file with one byte changed may still read; where it
    does not, HDF5's own errors (RuntimeError, KeyError among them) become one line naming the
    file. 200 seeded single-byte changes of one file."""
    good = tmp_path / "good.h5"
    write_results(good, {"variant": "a", "mean_psnr": 20.0}, {"history/psnr": np.arange(50.0)})
    raw, rng, refused = bytearray(good.read_bytes()), random.Random(0), 0
    for i in range(200):
        bad = bytearray(raw)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"bad{i}.h5"
        path.write_bytes(bytes(bad))
        try:
            read_results(path)
        except ValueError as err:
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err), err
            refused += 1
    assert refused > 0


def test_a_bad_config_stops_snakemake_before_any_job(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    bad = work / "config" / "bad.yaml"
    bad.write_text("pnp:\n  eta: 5.0\n")
    run = snakemake(work, "-n", "--configfile", "config.yaml", str(bad), timeout=300)
    assert run.returncode != 0
    said = run.stderr.splitlines()
    assert said[-1] == "  config/bad.yaml: pnp.eta: 5.0 must be < 2/||K||^2 = 2 for a convergent " \
        "forward-backward iteration", run.stderr  # fmt: skip
    assert said[-2] == "invalid configuration:" and 'File "' not in run.stderr  # no traceback
    bad.write_text("pnp:\n  eta: 0.5\n  eta: 5.0\n")  # Snakemake's loader keeps the last
    run = snakemake(work, "-n", "--configfile", "config.yaml", str(bad), timeout=300)
    assert run.returncode != 0 and run.stderr.splitlines()[-1] == (
        "config: config/bad.yaml: not valid YAML: line 3, column 3: key 'eta' given twice "
        "(first on line 2)"
    ), run.stderr
    run = snakemake(work, "-n", "--config", "pnp={eta: 0.5}", timeout=300)
    assert run.returncode != 0 and run.stderr.splitlines()[-1] == (
        "  --config: pnp.eta: '0.5' is not of type 'number' (--config gives nested values as "
        "strings: set it in a --configfile)"
    ), run.stderr
    assert not (work / "results").exists()


def test_a_misspelt_cost_input_stops_snakemake_before_any_job(tmp_path):
    """The cost report's paper configuration and benchmark files are the ``cost`` rule's inputs:
    a path misspelt is named before the DAG runs, not by its last job."""
    work = copy_workflow(tmp_path / "wf")
    for key, value in (("paper_config", "confg.yaml"), ("bench", ["benchmarks/results/no.csv"])):
        over = work / "config" / "cost.yaml"
        over.write_text(yaml.safe_dump({"cost": {key: value}}))
        args = ["--configfile", "config/smoke.yaml", str(over), "--", "all_with_cost"]
        run = snakemake(work, "-n", *SMOKE_PROFILE, *args, timeout=300)
        assert run.returncode != 0, run.stdout[-2000:]
        missing = value if isinstance(value, str) else value[0]
        said = run.stdout + run.stderr
        expected = (  # the paper configuration is read when the workflow starts
            f"config: cost.paper_config: {missing} is not a valid whole configuration: "
            f"{missing}: cannot read"
            if key == "paper_config"
            else "Missing input files for rule cost"
        )
        assert expected in said and missing in said and "Traceback" not in said, said[-2000:]
    assert not (work / "results").exists()


def test_a_missing_or_corrupted_dataset_file_fails_with_one_line(dataset, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "cifar10.h5"
    assert cli.main(train_args(SPEC, missing, tmp_path / "a")) == 1
    one_error_line(capsys.readouterr().err, str(missing), "no such dataset file")

    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(dataset.read_bytes()[: dataset.stat().st_size // 2])
    assert cli.main(train_args(SPEC, truncated, tmp_path / "b")) == 1
    err = capsys.readouterr().err
    assert re.search("not a readable HDF5 file|unreadable", err), err
    one_error_line(err, str(truncated))

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as fh:
        fh["images"] = np.zeros((2, 3, 4, 4))
    assert cli.main(train_args(SPEC, foreign, tmp_path / "c")) == 1
    one_error_line(capsys.readouterr().err, str(foreign), "no split 'train' with images")
    for name in "abc":
        assert not (tmp_path / name / "model.pt").exists()


def test_data_rule_rejects_a_corrupted_archive_and_leaves_no_output(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    cifar, _, _ = make_cifar_archive(tmp_path / "srv")
    raw = bytearray(cifar.read_bytes())
    good_md5 = md5_of(cifar)
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in transit
    cifar.write_bytes(bytes(raw))
    extra = archive_overlay(work, tmp_path / "cache", cifar, cifar, good_md5)
    target = "results/archives/data/cifar10.h5"
    run = snakemake(work, target, "--cores", "1", "--configfile", "config.yaml", str(extra))
    assert run.returncode != 0
    log = (work / "logs/archives/prepare_data/cifar10.log").read_text()
    assert re.search(r"checksum mismatch", log, re.I) and good_md5 in log and md5_of(cifar) in log
    assert "Traceback" not in log
    assert not (work / target).exists()
    history = tmp_path / "cache" / f"cifar10.{cli.ATTEMPTS_LOG}"  # the attempt's output
    assert list((tmp_path / "cache").iterdir()) == [history]  # no partial kept
    assert re.search(r"checksum mismatch", history.read_text(), re.I)


def _model(name: str, **kwargs):
    torch.manual_seed(0)
    return build_model(name, **kwargs)


def test_checkpoint_errors_name_the_path(tmp_path):
    model = _model("nonexpansive_denoiser", width=6, depth=3, input_size=(8, 10))
    good = tmp_path / "good.pt"
    save_model(model, good)
    raw = good.read_bytes()

    def refused(path: Path, match: str, **kwargs) -> None:
        with pytest.raises(CheckpointError, match=match) as info:
            load_model(path, **kwargs)
        assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    refused(truncated, "unreadable")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.randn(3), "epoch": 1}, foreign)
    refused(foreign, "not a stablenets-model-v1 file")
    foreign_list = tmp_path / "list.pt"
    torch.save([1, 2, 3], foreign_list)
    refused(foreign_list, "not a stablenets-model-v1 file")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    refused(garbage, "unreadable")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    refused(empty, "unreadable")
    refused(tmp_path / "missing.pt", "does not exist")
    refused(tmp_path, "does not exist")  # a folder is not a checkpoint
    refused(good, "expected 'dncnn'", expect_name="dncnn")
    ckpt = torch.load(good, weights_only=True)  # weights that do not fit their own kwargs
    ckpt["kwargs"]["width"] = 8
    mismatched = tmp_path / "mismatched.pt"
    torch.save(ckpt, mismatched)
    refused(mismatched, "does not fit")
    ckpt["kwargs"].update(width=6, block="aol", kernel_size=4)  # what older code took
    refused_kernel = tmp_path / "even_kernel.pt"
    torch.save(ckpt, refused_kernel)
    refused(refused_kernel, "block 'aol' needs an odd kernel_size to keep the image size; got 4")
    for key in ("name", "kwargs", "state_dict"):  # a training run's checkpoint has none
        torch.save({k: v for k, v in ckpt.items() if k != key}, partial := tmp_path / key)
        refused(partial, "holds no model")
    for value in (float("nan"), float("inf")):  # a diverged training's weights
        ckpt = torch.load(good, weights_only=True)
        name = next(name for name, _ in model.named_parameters())
        ckpt["state_dict"][name].view(-1)[-1] = value
        torch.save(ckpt, diverged := tmp_path / "diverged.pt")
        refused(diverged, f"{re.escape(name)} holds NaN or infinite values")
    assert not list(tmp_path.glob(".*.tmp"))
    assert isinstance(load_model(good), type(model))


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_load_weights_only_and_never_run_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    model = _model("dncnn", width=6, depth=4, input_size=8)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "name": "dncnn",
            "kwargs": {"width": 6, "depth": 4, "input_size": 8},
            "state_dict": model.state_dict(),
            "extra": {"payload": _RunsCode(marker)},
        },
        evil,
    )
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(evil)
    assert not marker.exists()
    calls = [
        m.group(0)
        for path in (ROOT / "src/stablenets").rglob("*.py")
        for m in re.finditer(r"torch\.load\([^)]*\)", path.read_text())
    ]
    assert calls and all("weights_only=True" in call for call in calls), calls


def test_a_checkpoint_for_another_model_fails_the_job_naming_both(tmp_path, capsys):
    """An evaluation or PnP job given a checkpoint of the wrong kind of model, or of another
    variant or noise level, fails with one line instead of attacking a denoiser or evaluating
    the wrong network."""
    trained = {"task": "denoising", "variant": "euler", "sigma": 0.05, "seed": 0}
    path = tmp_path / "model.pt"
    model = _model("nonexpansive_denoiser", width=6, depth=3, input_size=(8, 10))
    save_model(model, path, **provenance(trained, 0))
    spec = {"variant": "nonexpansive", "seed": 0, "device": "cpu", "threads": 1, "evaluate": {}}
    argv = ["--spec", json.dumps(spec), "--model", str(path), "--data", str(tmp_path / "d.h5")]
    assert (
        cli.main(
            [
                "evaluate-classifier",
                *argv,
                "--out",
                str(tmp_path / "a.h5"),
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 1
    )
    one_error_line(
        capsys.readouterr().err,
        str(path),
        "holds model 'nonexpansive_denoiser', not a classification model; expected one of",
    )
    spec.update(variant="heun", sigma=0.05)
    argv[1] = json.dumps(spec)
    out = ["--out", str(tmp_path / "b.h5"), "--workdir", str(tmp_path / "w")]
    assert cli.main(["evaluate-denoiser", *argv, *out]) == 1
    one_error_line(
        capsys.readouterr().err, str(path), "trained for variant 'euler', this job expects 'heun'"
    )
    spec.update(variant="euler", sigma=0.1)
    argv[1] = json.dumps(spec)
    out = ["--out", str(tmp_path / "c.h5"), "--workdir", str(tmp_path / "w")]
    assert cli.main(["evaluate-denoiser", *argv, *out]) == 1
    one_error_line(capsys.readouterr().err, "trained for sigma 0.05, this job expects 0.1")
    # PnP plugs in the denoisers of its rule's noise level, and checks it too
    pnp = Jobs(validate_config(smoke_config(), SCHEMA)).pnp_spec("euler", 0, "0.1")
    argv[1] = pnp.replace('"device": "auto"', '"device": "cpu"')
    out = ["--out", str(tmp_path / "d.h5"), "--workdir", str(tmp_path / "w")]
    assert cli.main(["pnp", *argv, *out]) == 1
    one_error_line(capsys.readouterr().err, "trained for sigma 0.05, this job expects 0.1")
    assert not list(tmp_path.glob("[abcd].h5"))


EVIL_TAR_MEMBERS = {
    "absolute": (lambda t: add_bytes(t, "/tmp/evil.txt", b"x"), "absolute path"),
    "dotdot": (lambda t: add_bytes(t, "ok/../../evil.txt", b"x"), "'..' component"),
    "symlink_out": (lambda t: add_special(t, "lnk", tarfile.SYMTYPE, "../outside"), "outside"),
    "symlink_abs": (lambda t: add_special(t, "lnk", tarfile.SYMTYPE, "/etc/passwd"), "absolute"),
    # 'a' -> '.', then 'z' -> 'a/..' looks inside lexically but resolves to the parent.
    "symlink_chain": (
        lambda t: (
            add_special(t, "a", tarfile.SYMTYPE, "."),
            add_special(t, "z", tarfile.SYMTYPE, "a/.."),
        ),
        "'z' -> 'a/..' points outside",
    ),
    "hardlink_out": (lambda t: add_special(t, "h", tarfile.LNKTYPE, "../../etc/passwd"), "outside"),
    "device": (lambda t: add_special(t, "dev", tarfile.CHRTYPE), "device"),
}


@pytest.mark.parametrize("case", sorted(EVIL_TAR_MEMBERS))
def test_safe_extract_refuses_unsafe_tar_members(tmp_path, case):
    build, expected = EVIL_TAR_MEMBERS[case]
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_bytes(tar, "fine.txt", b"fine")
        build(tar)
    with pytest.raises(data.DataError, match=expected):
        data.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == [] and not (tmp_path.parent / "evil.txt").exists()


def test_safe_extract_refuses_unsafe_zip_members(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", b"fine")
        zf.writestr(zipfile.ZipInfo("../evil.txt"), b"x")
    with pytest.raises(data.DataError, match="'../evil.txt'"):
        data.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ============================================================================================
# Determinism and provenance
# ============================================================================================

TIMING_OR_PROVENANCE = {
    "train_time_s",
    "startup_s",
    "validation_s",
    "checkpoint_s",
    "epoch_time_s",
    "peak_memory_mb",
    "images_per_s",
    "denoising_s_run",
    "train_time_s_run",
    "startup_s_run",
    "validation_s_run",
    "checkpoint_s_run",
    "seconds_clean_run",
    "seconds_attacks_run",
    "git_commit",
    "versions",
    "inputs",  # the models' sha256: their files hold their training times
}


# What a run did rather than what it computed: a run killed and resumed has two start-ups, and
# its rerun evaluates only the test images the killed one left.
RUN_HISTORY = {"startup_steps", "test_images_run", "steps_run", "startup_steps_run",
               "validations_run", "checkpoints_run"}  # fmt: skip


def assert_same_h5(a: Path, b: Path) -> None:
    """Every dataset and attribute bit-identical, timing and code provenance aside."""
    attrs_a, sets_a = read_results(a)
    attrs_b, sets_b = read_results(b)
    assert attrs_a.keys() == attrs_b.keys() and sets_a.keys() == sets_b.keys()
    for key in attrs_a.keys() - TIMING_OR_PROVENANCE - RUN_HISTORY:
        np.testing.assert_array_equal(attrs_a[key], attrs_b[key], err_msg=f"{a.name}: {key}")
    for key in sets_a:
        np.testing.assert_array_equal(sets_a[key], sets_b[key], err_msg=f"{a.name}: {key}")


def assert_same_model(a: Path, b: Path) -> None:
    """A model folder's weights, metadata and training log bit-identical, timings and code
    provenance aside."""
    ckpt_a, ckpt_b = (read_checkpoint(root / "model.pt") for root in (a, b))
    assert ckpt_a["state_dict"].keys() == ckpt_b["state_dict"].keys()
    for key, value in ckpt_a["state_dict"].items():
        assert torch.equal(value, ckpt_b["state_dict"][key]), (a, key)
    for key in ckpt_a["extra"].keys() - TIMING_OR_PROVENANCE - RUN_HISTORY:
        assert ckpt_a["extra"][key] == ckpt_b["extra"][key], (a, key)
    logs = [pd.read_csv(root / "train_log.csv") for root in (a, b)]
    pd.testing.assert_frame_equal(*(log.drop(columns="images_per_s") for log in logs))


@pytest.mark.slow
def test_every_smoke_output_carries_config_hash_seed_versions_and_commit(smoke_run):
    """HDF5 files in their attributes, models in their metadata, CSV / Markdown / LaTeX /
    figures in a ``<stem>.provenance.json`` sidecar; and no temporary file is left anywhere."""
    results = smoke_run / "results" / "smoke"
    kinds: dict[str, int] = {}
    for path in sorted(results.rglob("*")):
        rel = path.relative_to(results)
        assert not any(part.startswith(".") for part in rel.parts), rel  # no temporaries
        if not path.is_file() or rel.parts[0] == "checkpoints":
            continue
        if path.name.endswith(".provenance.json"):
            continue
        if path.suffix == ".h5":  # data files hold their strings as bytes: decoded
            record = read_results(path, ())[0]
        elif path.suffix == ".pt":
            record = read_checkpoint(path)["extra"]
        else:
            assert sidecar_path(path).is_file(), rel
            record = json.loads(sidecar_path(path).read_text())
        missing = [key for key in PROVENANCE_KEYS if key not in record]
        assert not missing, (rel, missing)
        assert re.fullmatch(r"[0-9a-f]{16}", str(record["config_hash"])), rel
        assert re.fullmatch(r"[0-9a-f]{40}", str(record["git_commit"])), rel
        assert "torch" in json.loads(record["versions"]), rel
        assert int(record["seed"]) >= -1
        kinds[path.suffix] = kinds.get(path.suffix, 0) + 1
    assert {".h5", ".pt", ".csv", ".md", ".tex", ".pdf", ".png"} <= set(kinds), kinds
    assert kinds[".csv"] >= 3 + 8  # three tables and every training log


@pytest.mark.slow
def test_every_job_output_names_the_sha256_of_the_files_it_was_made_from(smoke_run):
    """A result file or model says which data and model files it came from, so a user holding
    one can tell whether it matches the model beside it; evaluation, PnP and TV read the very
    files they name."""
    results = smoke_run / "results" / "smoke"
    outputs = [*results.glob("eval/**/*.h5"), *results.glob("pnp/**/*.h5")]
    outputs += results.glob("models/**/model.pt")
    assert len(outputs) >= 18, outputs
    for path in outputs:
        if path.suffix == ".pt":
            inputs = read_checkpoint(path)["extra"]["inputs"]
        else:
            inputs = json.loads(read_results(path, ())[0]["inputs"])
        named = {Path(record["path"]).name for record in inputs}
        dataset = "cifar10.h5" if "classification" in path.parts else "bsds500.h5"
        trained = path.suffix == ".h5" and path.stem != "tv"
        assert named == ({"model.pt"} if trained else set()) | {dataset}, (path, named)
        for record in inputs:
            file = smoke_run / record["path"]
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            assert record["sha256"] == digest, (path, record["path"])
            if file.name == "model.pt":  # this variant's and seed's model
                assert (file.parent.parent.name, file.parent.name) == (path.parent.name, path.stem)


def test_a_result_says_whether_the_code_it_came_from_differed_from_its_commit(
    tmp_path, monkeypatch
):
    """``git_dirty``: false in a clean checkout, true once a tracked file is edited, unknown
    (NaN in HDF5) outside a repository; a new file the commit lacks does not count."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = functools.partial(subprocess.run, cwd=repo, check=True, capture_output=True)
    git(["git", "init", "-q"])
    (repo / "code.py").write_text("x = 1\n")
    git(["git", "add", "code.py"])
    git(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"])
    head = git(["git", "rev-parse", "HEAD"], text=True).stdout.strip()

    def state(folder: Path) -> tuple[str, bool | None]:
        monkeypatch.setattr(runtime, "_PACKAGE_DIR", folder)
        runtime._git_state.cache_clear()
        record = provenance({}, 0)
        return record["git_commit"], record["git_dirty"]

    try:
        (repo / "new.py").write_text("")
        assert state(repo) == (head, False)
        (repo / "code.py").write_text("x = 2\n")
        assert state(repo) == (head, True)
        assert state(tmp_path) == ("unknown", None)
    finally:
        runtime._git_state.cache_clear()


def test_an_input_digest_follows_the_file_when_it_is_replaced(tmp_path):
    """Digests are computed once per file version: a file replaced (same size, atomically) is
    hashed again, never answered from the cache."""
    path = tmp_path / "model.pt"
    atomic.atomic_write(path, "a" * 100)
    first = runtime.file_sha256(path)
    atomic.atomic_write(path, "b" * 100)
    assert runtime.file_sha256(path) == hashlib.sha256(b"b" * 100).hexdigest() != first
    assert runtime.input_record(path) == {"path": str(path), "sha256": runtime.file_sha256(path)}


# ============================================================================================
# Concurrency
# ============================================================================================

CONCURRENT = {
    "scale": "conc",
    "seeds": [0, 1],
    "data": {
        "cifar10": {
            "synthetic": {"n_train": 200, "n_val": 50, "n_test": 50, "image_size": 16},
        }
    },
    "classification": {
        "select": ["nonexpansive"],  # the only one built for these 16x16 images
        "train": {
            "steps": 12,
            "batch_size": 16,
            "val_every": 6,
            "checkpoint_every": 3,
            "log_every": 3,
        },
        "variants": {
            "nonexpansive": {
                "kwargs": {"base_width": 4, "stages": 2, "blocks_per_stage": 1, "input_size": 16}
            }
        },
    },
}
CONCURRENT_JOBS = [("nonexpansive", 0), ("nonexpansive", 1)]  # neighbours in one folder


def test_parallel_training_jobs_share_nothing_and_match_sequential_runs(tmp_path):
    """Two training jobs at once under ``snakemake --cores 2`` in one results tree: each has its own
    log, checkpoint and training log, and the same weights as the job run alone."""
    work = copy_workflow(tmp_path / "wf")
    (work / "config" / "conc.yaml").write_text(yaml.safe_dump(CONCURRENT))
    models = [f"results/conc/models/classification/{v}/seed{s}" for v, s in CONCURRENT_JOBS]
    done = snakemake(
        work,
        *(f"{m}/model.pt" for m in models),
        "--cores", "2",
        "--configfile", "config.yaml", "config/smoke.yaml", "config/conc.yaml",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # Two training jobs were running at the same time (Snakemake reports starts and ends).
    running = peak = 0
    pattern = r"^(?:local)?rule (\w+):|^Finished jobid: \d+ \(Rule: (\w+)\)"
    for event in re.finditer(pattern, done.stderr, re.M):
        running += (event.group(1) == "train_classifier") - (event.group(2) == "train_classifier")
        peak = max(peak, running)
    assert peak == 2, done.stderr[-3000:]

    jobs = Jobs(validate_config(smoke_config(**CONCURRENT), SCHEMA))
    data_path = work / "results/conc/data/cifar10.h5"
    for (variant, seed), model in zip(CONCURRENT_JOBS, models, strict=True):
        spec = json.loads(jobs.train_spec("classification", variant, seed))
        log = (work / f"logs/conc/train_classifier/{variant}/seed{seed}.log").read_text()
        resume = pipeline_jobs._training_hash(spec, data_path)  # without run-only settings
        assert re.findall(r"^training .*", log, re.M) == [
            f"training {variant} seed {seed} on cpu (config {resume})"
        ]
        workdir = work / f"results/conc/checkpoints/classification/{variant}/seed{seed}"
        ckpt = read_checkpoint(workdir / "checkpoint.pt")
        assert ckpt["config_hash"] == resume and ckpt["run"]["step"] == 12
        extra = read_checkpoint(work / model / "model.pt")["extra"]
        assert extra["config_hash"] == config_hash(spec)
        alone = tmp_path / "alone" / f"{variant}{seed}"
        pipeline_jobs.train_model(
            spec, data_path, alone / "model.pt", alone / "log.csv", alone / "work", log=str
        )
        assert_same_training(alone, work / model, log_b="train_log.csv")


class ThrottledHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a file only once two clients are downloading it, slowly: the downloads overlap."""

    barrier: threading.Barrier
    requests: list[str]

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        payload = Path(self.directory, self.path.lstrip("/")).read_bytes()
        self.barrier.wait()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        for i in range(0, len(payload), 16384):
            self.wfile.write(payload[i : i + 16384])
            self.wfile.flush()
            time.sleep(0.05)


def test_two_jobs_downloading_into_one_cache_at_once_both_get_the_verified_archive(tmp_path):
    archive, _, _ = make_cifar_archive(tmp_path / "srv", n_per_batch=40)
    cache = tmp_path / "cache"
    handler = functools.partial(ThrottledHandler, directory=str(archive.parent))
    ThrottledHandler.barrier, ThrottledHandler.requests = threading.Barrier(2, timeout=300), []
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        spec = {
            "dataset": "cifar10",
            "source": "download",
            "archive": archive.name,
            "md5": md5_of(archive),
            "val_fraction": 0.2,
            "split_seed": 0,
        }
        urls = [f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"]
        argv = [sys.executable, "-m", "stablenets", "prepare-data", "--spec", json.dumps(spec),
                "--cache", str(cache), "--urls", json.dumps(urls)]  # fmt: skip
        procs = [
            subprocess.Popen(
                [*argv, "--out", str(tmp_path / f"out{i}" / "cifar10.h5")],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in range(2)
        ]
        outcomes = [proc.communicate(timeout=600) for proc in procs]
        server.shutdown()
    assert [p.returncode for p in procs] == [0, 0], outcomes
    assert len(ThrottledHandler.requests) == 2  # both really downloaded, at the same time
    history = f"cifar10.{cli.ATTEMPTS_LOG}"  # both jobs' attempts, each begun by its line
    assert sorted(p.name for p in cache.iterdir()) == [archive.name, history]  # no temporaries
    assert (cache / history).read_text().count("stablenets prepare-data: started ") == 2
    assert md5_of(cache / archive.name) == md5_of(archive)
    first, second = (tmp_path / f"out{i}" / "cifar10.h5" for i in range(2))
    assert_same_h5(first, second)


def test_a_hand_written_spec_with_a_wrong_type_or_unknown_key_fails_in_one_line(tmp_path, capsys):
    """Where the config schema describes a spec's section (``config.SPEC_SECTIONS``), a
    hand-written spec is checked as the config is: a string for a number, a float for an
    integer and a misspelt key, each named in one line, before the job reads anything."""
    pnp = {"n_images": 2, "noise": "0.01", "blur": {"size": 3.0, "sigma": 1.0}, "sed": 7}
    spec = {"seed": 0, "device": "cpu", "variant": "tv", "pnp": pnp}
    args = ["--data", str(tmp_path / "absent.h5"), "--out", str(tmp_path / "tv.h5"),
            "--workdir", str(tmp_path)]  # fmt: skip
    assert cli.main(["tv-deblur", "--spec", json.dumps(spec), *args]) == 1
    one_error_line(
        capsys.readouterr().err,
        "--spec pnp.sed: unknown key; allowed: ",
        "--spec pnp.blur.size: 3.0 is not of type 'integer'",
        "--spec pnp.noise: '0.01' is not of type 'number'",
    )
    assert not (tmp_path / "tv.h5").exists()


def test_every_attempt_of_a_job_appends_its_lines_to_its_workdirs_attempts_log(tmp_path, capsys):
    """Snakemake empties a rule's log before each attempt: a killed attempt's last lines (an
    out-of-memory kill's) were gone with it. The work folder keeps every attempt's."""
    spec = {"seed": 0, "device": "cpu", "variant": "tv", "pnp": {"sed": 7}}
    args = ["--data", str(tmp_path / "absent.h5"), "--out", str(tmp_path / "tv.h5"),
            "--workdir", str(tmp_path / "work")]  # fmt: skip
    for _ in range(2):
        assert cli.main(["tv-deblur", "--spec", json.dumps(spec), *args]) == 1
    out, err = capsys.readouterr()
    history = (tmp_path / "work" / cli.ATTEMPTS_LOG).read_text().splitlines()
    assert len(history) == 4, history  # each attempt: its start line, then its error line
    assert history[0::2] == out.splitlines() and history[1::2] == err.splitlines()
    assert all(line.startswith("stablenets tv-deblur: started ") for line in history[0::2])
    assert "--spec pnp.sed: unknown key" in history[1]
    with pytest.raises(ValueError):  # --debug: the traceback, which the rule's log gets too
        cli.main(["--debug", "tv-deblur", "--spec", json.dumps(spec), *args])
    again = (tmp_path / "work" / cli.ATTEMPTS_LOG).read_text()
    assert again.startswith("\n".join(history)) and "Traceback (most recent call last)" in again
    assert not isinstance(sys.stdout, cli._Tee) and not isinstance(sys.stderr, cli._Tee)
    full = tmp_path / "full"  # a history that cannot be written (a full disk) fails no job
    full.mkdir()
    (full / cli.ATTEMPTS_LOG).symlink_to("/dev/full")
    capsys.readouterr()
    assert cli.main(["tv-deblur", "--spec", json.dumps(spec), *args[:-1], str(full)]) == 1
    one_error_line(capsys.readouterr().err, "--spec pnp.sed: unknown key")


def test_the_attempts_log_fails_no_job_on_an_undecodable_path_a_closed_stdout_or_after_its_end(
    tmp_path,
):
    """A data path with a Latin-1 byte (a surrogate in Python) made the strict UTF-8 history
    raise in the middle of the job's one-line error, twice chained; a job whose stdout is closed
    (``>&-``: ``sys.stdout`` is None) died at its first line; a logging handler made during the
    job keeps the tee, whose history is closed after it."""
    spec = json.dumps({"device": "cpu", "seed": 0, "evaluate": {}, "tv": {}})
    bad = os.fsdecode(b"caf\xe9.h5")
    for close_stdout in (False, True):
        work = tmp_path / f"work{int(close_stdout)}"
        run = subprocess.run(
            [sys.executable, "-m", "stablenets", "evaluate-tv", "--spec", spec, "--data", bad,
             "--out", "out.h5", "--workdir", str(work)],  # fmt: skip
            cwd=tmp_path, capture_output=True, timeout=300,
            preexec_fn=(lambda: os.close(1)) if close_stdout else None,
        )  # fmt: skip
        err = run.stderr.decode(errors="replace")
        assert run.returncode == 1 and "Traceback" not in err, err
        assert err.count("\n") == 1 and "no such dataset file" in err, err
        history = (work / cli.ATTEMPTS_LOG).read_text()
        assert "caf\\udce9.h5" in history and "no such dataset file" in history, history
    closed = open(tmp_path / "closed.log", "a")  # noqa: SIM115
    closed.close()
    tee = cli._Tee(io.StringIO(), closed)
    assert tee.write("after the job\n") == len("after the job\n") and tee.history is None


def test_a_job_prints_a_path_it_cannot_decode_escaped_on_a_strict_stdout(tmp_path):
    """Under a UTF-8 locale stdout is strict: a mirror's URL with a Latin-1 byte, logged as it
    failed, ended the data job in a ``UnicodeEncodeError`` traceback instead of its error line."""
    spec = {"dataset": "cifar10", "source": "download", "archive": "x.tgz", "md5": "0" * 32,
            "val_fraction": 0.2, "split_seed": 0}  # fmt: skip
    url = os.fsencode("file:///absent/caf") + b"\xe9.tgz"
    run = subprocess.run(
        [sys.executable, "-m", "stablenets", "prepare-data", "--spec", json.dumps(spec),
         "--cache", "c", "--urls", b'["' + url + b'"]', "--out", "d.h5"],  # fmt: skip
        cwd=tmp_path, capture_output=True, timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )  # fmt: skip
    out, err = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 1 and "Traceback" not in err, err
    assert "failed file:///absent/caf\\udce9.tgz" in out, out
    assert err.startswith("stablenets prepare-data: error: x.tgz: every URL failed"), err


def test_a_hand_written_specs_own_keys_are_checked_as_what_the_config_derives_them_from(
    tmp_path, capsys
):
    """``seed``, ``sigma``, ``task``, ``kwargs``... are no config section's: a null sigma or
    kwargs gave a traceback, a seed of 1.5 trained as seed 1, a negative sigma ran."""
    spec = {"seed": 1.5, "device": "cpu", "task": "denoising", "variant": "euler",
            "model": "nonexpansive_denoiser", "kwargs": None, "sigma": -0.1}  # fmt: skip
    args = ["--data", str(tmp_path / "absent.h5"), "--model", str(tmp_path / "m.pt"),
            "--log", str(tmp_path / "l.csv"), "--workdir", str(tmp_path)]  # fmt: skip
    assert cli.main(["train", "--spec", json.dumps(spec), *args]) == 1
    one_error_line(
        capsys.readouterr().err,
        "--spec kwargs: None is not of type 'object'",
        "--spec seed: 1.5 is not of type 'integer'",
        "--spec sigma: -0.1 is less than or equal to the minimum of 0",
    )
    assert cli.main(["train", "--spec", json.dumps({**spec, "task": "denoise"}), *args]) == 1
    assert "--spec task: 'denoise' is not allowed; allowed: " in capsys.readouterr().err


@pytest.mark.parametrize("overlay", [None, "smoke", "rehearsal"])
def test_every_spec_the_pipeline_writes_passes_the_check_of_hand_written_specs(overlay):
    """The check must never refuse what the Snakefile writes (its sections are subsets of
    validated config sections, a variant's training settings merged in)."""
    files = [ROOT / "config.yaml"] + ([ROOT / "config" / f"{overlay}.yaml"] if overlay else [])
    jobs = Jobs(load_config(files, ROOT / "workflow/schemas/config.schema.yaml"))
    schema = load_schema(ROOT / "workflow/schemas/config.schema.yaml")
    sigma = str(jobs.config["denoising"]["noise_levels"][0])
    specs = [("evaluate-tv", jobs.tv_spec(sigma)), ("tv-deblur", jobs.pnp_spec("tv", 0))]
    specs.append(("pnp", jobs.pnp_spec("averaged", 0, str(jobs.config["pnp"]["noise_level"]))))
    for task, job in (
        ("classification", "evaluate-classifier"),
        ("denoising", "evaluate-denoiser"),
    ):
        s = None if task == "classification" else sigma
        for v in jobs.variants(task):
            specs += [
                ("train", jobs.train_spec(task, v, 0, s)),
                (job, jobs.eval_spec(task, v, 0, s)),
            ]
    for job, text in specs:
        check_spec(job, json.loads(text), schema)
    assert len(specs) > 10


def test_the_config_check_validates_the_files_snakemake_would_read_as_the_workflow_does(
    tmp_path, capsys, monkeypatch
):
    """The README's check before a long run passed a misspelt key, a wrong type and an empty
    file (exit 0, silent), which Snakemake then refused; it read the YAML alone."""
    from stablenets.pipeline import config as pipeline_config

    monkeypatch.chdir(ROOT)
    typo, empty = tmp_path / "typo.yaml", tmp_path / "empty.yaml"
    typo.write_text("classification:\n  train: {stpes: 10, batch_size: '64'}\n")
    empty.write_text("# nothing yet\n")
    assert pipeline_config.main(["--configfile", "config.yaml", str(typo)]) == 1
    said = capsys.readouterr().err
    assert f"{typo}: classification.train.stpes: unknown key" in said
    assert pipeline_config.main(["--configfile", str(empty)]) == 1  # after config.yaml
    assert capsys.readouterr().err.strip() == (
        f"config: {empty}: holds no settings (Snakemake refuses an empty config file)"
    )
    assert pipeline_config.main(["--configfile", "config.yaml", "config/smoke.yaml"]) == 0
    assert pipeline_config.main([]) == 0  # the workflow's config.yaml alone
    monkeypatch.chdir(tmp_path)
    assert pipeline_config.main([]) == 1
    assert "run from the workflow's folder" in capsys.readouterr().err


def test_a_yaml_error_in_a_file_the_profile_passes_is_one_line_naming_it(
    tmp_path, capsys, monkeypatch
):
    """``make smoke``'s profile passes ``config.yaml`` and ``config/smoke.yaml`` as
    ``--configfile``, which Snakemake reads before the Snakefile: a YAML error there was its
    "not valid JSON or YAML" without file or line. ``make smoke`` now reads them first."""
    from stablenets.pipeline import config as pipeline_config
    from stablenets.pipeline.snakemake_args import config_files

    profile = tmp_path / "profile"
    profile.mkdir()
    broken = tmp_path / "broken.yaml"
    broken.write_text("pnp:\n  eta: [1.0\n")
    (profile / "config.yaml").write_text(yaml.safe_dump({"configfile": [str(broken)]}))
    args = ["--workflow-profile", str(profile), "--cores", "2"]
    assert config_files(args, tmp_path) == [str(broken)]
    assert pipeline_config.main(args) == 1
    said = capsys.readouterr().err.strip()
    assert said.startswith(f"config: {broken}: not valid YAML: line 3") and "\n" not in said
    # the command line's --configfile replaces the profile's, as in Snakemake
    assert config_files([*args, "--configfile", "a.yaml"], tmp_path) == ["a.yaml"]
    monkeypatch.chdir(ROOT)  # the profile's paths: relative to where Snakemake runs
    assert pipeline_config.main(["--workflow-profile", "workflow/profiles/smoke"]) == 0
    makefile = (ROOT / "Makefile").read_text()
    for target in ("smoke", "smoke-slurm", "rehearsal"):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.M)[1]
        assert recipe.index("-m stablenets.pipeline.config") < recipe.index("/snakemake "), recipe
