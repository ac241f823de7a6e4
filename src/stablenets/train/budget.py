"""A training budget in minutes, turned into a fixed step count once per run.

Stopping at a wall-clock deadline would make results depend on the machine's load. Instead a short
calibration measures the time of one training step (after warm-up steps, on a copy of the model),
and ``steps = floor(60 * minutes / seconds_per_step)`` replaces the configured step count, so the
one-cycle schedule spans exactly the run. The derived count is written to ``budget.json`` in the
run's working folder (with the config hash and the measurement) before the first step, and a
resumed run reads it back instead of measuring again: one run, one step count. The budget covers
training steps only (validation and checkpoints come on top).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from stablenets.atomic import atomic_write

__all__ = ["budget_steps", "seconds_per_step", "resolve_steps"]

WARMUP_STEPS = 2
TIMED_STEPS = 8


def budget_steps(minutes: float, step_seconds: float) -> int:
    """Whole steps that fit in ``minutes`` at ``step_seconds`` each (at least 1)."""
    if not minutes > 0:
        raise ValueError(f"budget_minutes={minutes} must be > 0")
    if not step_seconds > 0:
        raise ValueError(f"measured time per step {step_seconds} must be > 0")
    return max(1, math.floor(60.0 * minutes / step_seconds))


def seconds_per_step(
    step: Callable[[], None],
    warmup: int = WARMUP_STEPS,
    timed: int = TIMED_STEPS,
    sync: Callable[[], None] = lambda: None,
) -> float:
    """Mean wall time of ``timed`` calls of ``step`` after ``warmup`` untimed ones (``sync``
    waits for an accelerator's queued work before each clock reading)."""
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(timed):
        step()
    sync()
    return (time.perf_counter() - t0) / timed


def resolve_steps(
    path: Path,
    config_hash: str,
    minutes: float,
    measure: Callable[[], float],
    log: Callable[[str], None] = print,
    resumed: Callable[[], int | None] = lambda: None,
) -> int:
    """The step count of this run: read from ``path`` when it was derived for the same config
    and budget, else the one of the checkpoint the run resumes (``resumed()``, ``None`` where
    there is none), else measured (``measure()`` returns seconds per step); written there."""
    path = Path(path)
    if path.exists():
        try:
            record = json.loads(path.read_text())
            if record["config_hash"] == config_hash and record["budget_minutes"] == minutes:
                log(f"budget {minutes} min: {record['steps']} steps (from {path})")
                return int(record["steps"])
            log(f"ignoring {path}: written for another config or budget")
        except (ValueError, KeyError, TypeError):
            log(f"ignoring unreadable {path}")
    steps = resumed()
    if steps is not None:
        record = {"config_hash": config_hash, "budget_minutes": minutes, "steps": steps}
        atomic_write(path, json.dumps(record, indent=1))
        log(
            f"budget {minutes} min: {steps} steps, the schedule of the checkpoint resumed (-> {path})"
        )
        return steps
    step_seconds = measure()
    steps = budget_steps(minutes, step_seconds)
    record = {
        "config_hash": config_hash,
        "budget_minutes": minutes,
        "seconds_per_step": step_seconds,
        "steps": steps,
    }
    atomic_write(path, json.dumps(record, indent=1))
    log(f"budget {minutes} min at {step_seconds * 1e3:.1f} ms/step: {steps} steps (-> {path})")
    return steps
