"""Resumable training checkpoints: what a run saves and how a rerun picks it up.

``<workdir>/checkpoint.pt`` holds the model, optimiser, scheduler and :class:`RunState`, tagged
with the configuration's hash; :func:`resume` restores only a checkpoint of the same
configuration and otherwise starts afresh with a log line saying why. Written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stablenets.errors import first_line
from stablenets.nn.models import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    StableModel,
    atomic_torch_save,
    read_checkpoint,
)

# v2 (session 17): batches by epochs and erasing first; v3 (session 30): each step's and epoch's
# draws seeded through SeedSequence. A checkpoint of an earlier version would resume a run that
# drew otherwise, so it is ignored with a log line
RESUME_FORMAT = "stablenets-resume-v3"
Log = Callable[[str], None]


@dataclass
class RunState:
    """Where a run stands: the step, the best validation metric so far and its weights, the
    log rows and the time spent, saved in every checkpoint. ``elapsed`` counts the training
    steps, of which ``startup_s`` is one-off start-up: the whole first step of each process
    (the CUDA context, cuDNN tuning; ``startup_steps`` counts these steps), plus the seconds
    that later steps spent capturing CUDA graphs (``StepGraphs.capture_s``: the power
    iteration's and each step graph's, captured at their second call, failed captures
    included; at most the step's own time, the step itself staying one of the run, not
    counted in ``startup_steps``); validations and checkpoint writes are counted apart, as
    their number per step differs between runs (``bench.cost``).
    ``stop_metric``: the validation at a ``stop_after`` stop off the validation grid, kept out
    of the best so far (a later run past the stop drops it, as the uninterrupted run never
    had it). ``peak_memory_mb`` and ``device``: the largest peak memory of the runs that trained
    steps and the device (``train.memory.device_label``) of the last of them, so that a rerun
    that trains none (its checkpoint already at the end) does not record its own."""

    step: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    best_state: dict | None = None
    rows: list[dict] = field(default_factory=list)
    elapsed: float = 0.0
    startup_s: float = 0.0
    startup_steps: int = 0
    validation_s: float = 0.0
    validations: int = 0
    checkpoint_s: float = 0.0
    checkpoints: int = 0
    stop_metric: float | None = None
    peak_memory_mb: float = 0.0
    device: str = ""
    # the clocks this process resumed at (``resume``; not saved: each run has its own)
    resumed_at: dict[str, float] = field(default_factory=dict)

    def time_split(self) -> dict[str, float]:
        """Start-up, validation and checkpoint seconds and counts, for the model's record."""
        keys = ("startup_s", "startup_steps", "validation_s", "validations", "checkpoint_s",
                "checkpoints")  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    def clocks(self) -> dict[str, float]:
        """Steps, training seconds and the time split: totals over every run of a job."""
        return {"steps": self.step, "train_time_s": self.elapsed, **self.time_split()}

    def run_clocks(self) -> dict[str, float]:
        """This run's own clocks (``<clock>_run``): the totals less those it resumed at. A
        benchmark's wall time is one run's, and ``bench.cost`` takes this run's seconds from it
        to leave its fixed seconds."""
        return {f"{k}_run": v - self.resumed_at.get(k, 0) for k, v in self.clocks().items()}


def resume(
    path: Path,
    config_hash: str,
    model: StableModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    log: Log,
) -> RunState:
    """Restore a compatible checkpoint, or start afresh with a log line saying why: one of
    another configuration or format, or a damaged or foreign file (``CheckpointError``). A
    read that fails on the machine's side (an I/O error of a network file system, permissions,
    memory) raises (``read_checkpoint``): the file may be intact, and starting afresh would
    overwrite it at the first save."""
    if not path.exists():
        return RunState()
    try:
        ckpt = read_checkpoint(path, map_location="cpu")
    except CheckpointError as err:
        log(f"ignoring unreadable checkpoint: {err}")
        return RunState()
    if ckpt.get("kind") != RESUME_FORMAT:
        log(f"ignoring checkpoint {path}: written in format {ckpt.get('kind')!r}, this code "
            f"resumes {RESUME_FORMAT!r}")  # fmt: skip
        return RunState()
    if ckpt.get("config_hash") != config_hash:
        log(
            f"ignoring checkpoint {path}: written for config {ckpt.get('config_hash')}, "
            f"this run is {config_hash}"
        )
        return RunState()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    state = RunState(**ckpt["run"])
    state.resumed_at = state.clocks()
    log(f"resumed from {path} at step {state.step}")
    return state


def scheduled_steps(path: Path, config_hash: str) -> int | None:
    """The length of the learning-rate schedule of the checkpoint at ``path`` that :func:`resume`
    would restore (``None``: none there, or one it would not restore). A ``budget_minutes`` run
    whose derived step count was lost (``budget.json``) takes it back from here: measured again,
    it would differ from the schedule the checkpoint resumes, and the run would stop at that
    schedule's end with a traceback, or end before its learning rate has annealed."""
    try:
        ckpt = read_checkpoint(path, map_location="cpu")
    except CheckpointError:
        return None
    if ckpt.get("kind") != RESUME_FORMAT or ckpt.get("config_hash") != config_hash:
        return None
    total = ckpt.get("scheduler", {}).get("total_steps")
    return int(total) if isinstance(total, int) else None


def save(
    path: Path,
    config_hash: str,
    model: StableModel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    state: RunState,
) -> None:
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "kind": RESUME_FORMAT,
            "config_hash": config_hash,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "run": {k: v for k, v in state.__dict__.items() if k != "resumed_at"},
        },
        path,
    )


def last_good(ckpt: Path) -> str:
    """``ckpt`` and its step, for an error that stops the run (``none`` before the first)."""
    if not ckpt.exists():
        return "none"
    try:
        return f"{ckpt} (step {read_checkpoint(ckpt)['run']['step']})"
    except (CheckpointError, KeyError, TypeError):
        return f"{ckpt} (unreadable)"
    except (OSError, MemoryError, RuntimeError) as err:  # the machine's, not the file's: named
        return f"{ckpt} (not read now: {first_line(err)})"
