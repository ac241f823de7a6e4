"""One training loop for every model: SGD + one-cycle, validation, best checkpoint, resume.

The loop is deterministic given ``(seed, step)``: each step takes its slice of a seeded epoch
permutation and draws its augmentation and noise from a generator seeded with ``seed`` and the
step number (``tasks.step_batch``), so a run killed and resumed from its checkpoint ends with
the same weights as an uninterrupted one (on the CPU).

Checkpoints (``<workdir>/checkpoint.pt``) are written atomically every ``checkpoint_every`` steps
and when SIGUSR1/SIGTERM arrives (SLURM sends one before the time limit), after which the run
stops (``Interrupted``) unless that step was its last; one from a different
configuration (another ``config_hash``) is ignored with a log line, never silently resumed.
A non-finite loss or an exploding norm estimate stops the run with ``DivergenceError``; a forward
pass whose integrator sub-steps would not fit in memory with ``SubstepLimitError``, before it
starts: more than ``max_substeps`` sub-steps in total, or (``auto``) activations, as
``memory.ActivationCost`` predicts them, above ``memory_fraction`` of the free memory. Both
name the last good checkpoint. Every ``log_every`` steps a progress line reports the step,
loss, learning rate, sub-steps, time per step, peak memory and the time left, so a job never
dies without a line.
``stop_after`` ends the loop early on the full schedule: the learning rate of every step run is
the ``steps``-step schedule's (a rehearsal of the first steps, not a compressed schedule).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import torch

from stablenets.atomic import atomic_path, remove_stale_temporaries
from stablenets.interrupt import Interrupted, StopFlag
from stablenets.nn.losses import build_loss
from stablenets.nn.models import (
    StableModel,
)
from stablenets.nn.operators import fused_power_iteration, remember_estimates
from stablenets.train import budget
from stablenets.train.checkpoints import RunState, last_good, resume, save, scheduled_steps
from stablenets.train.cuda_graphs import StepGraphs
from stablenets.train.memory import (
    MAX_MEMORY_FRACTION,
    ActivationCost,
    activation_cost,
    device_label,
    free_memory,
    heap_free,
    peak_memory_mb,
)
from stablenets.train.tasks import (
    ClassificationTask,
    DenoisingTask,
    Task,
    step_batch,
)

__all__ = [
    "TrainConfig",
    "ClassificationTask",
    "DenoisingTask",
    "DivergenceError",
    "SubstepLimitError",
    "Interrupted",
    "train",
    "schedule_problems",
]


class DivergenceError(RuntimeError):
    """The loss or a norm estimate became non-finite or exploded."""


class SubstepLimitError(DivergenceError):
    """The next forward pass would take more sub-steps than ``max_substeps`` allows (a count,
    or with ``auto`` activations above ``memory_fraction`` of the free memory): they would
    exhaust the memory (the count grows with the square of a block's norm)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop settings (all from ``config.yaml``)."""

    steps: int
    batch_size: int
    lr_max: float = 1.0
    lr_initial: float = 1e-5
    final_div_factor: float = 1e4
    warmup: float = 0.5
    # SGD momentum: a number held, or (at the start and end, at the lr peak) cycled by the
    # one-cycle schedule as OneCycleLR does by default, and so the authors' scripts: the 0.9 they
    # pass to SGD is overridden by that cycle, 0.95 -> 0.85 -> 0.95
    momentum: float | tuple[float, float] = (0.95, 0.85)
    weight_decay: float = 1e-4
    val_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    power_iters: int = 1
    max_norm: float = 1e4
    # Sub-steps of one forward pass, all blocks together: each keeps its activations for the
    # backward pass. "auto": as many as fit in ``memory_fraction`` of the free memory.
    max_substeps: int | Literal["auto"] = "auto"
    memory_fraction: float = 0.8
    seed: int = 0
    loss: dict | None = None  # None: the task's loss; {name: margin, offset, temperature}
    budget_minutes: float | None = None  # when set, ``steps`` is derived from it (budget.py)
    amp: bool = False  # CUDA: forward/backward under bf16 autocast
    channels_last: bool = False  # NHWC model and batches
    cudnn_benchmark: bool = False  # CUDA: cuDNN picks algorithms by timing them
    # sub-step activation checkpointing: auto (with max_substeps auto: a pass that would not fit
    # unchecked; else large inputs) | bool
    remat: str | bool = "auto"
    cuda_graphs: bool = False  # CUDA: forward/backward replayed from graphs (graphs.py)
    cuda_graph_cache: int = 8  # graphs kept (one per tuple of sub-step counts)
    # None: run all ``steps``; N: stop after N steps of the ``steps``-step schedule (validated at
    # the last step run, best model saved as usual)
    stop_after: int | None = None

    @property
    def momenta(self) -> tuple[float, float]:
        """The momentum at the start and end, and at the learning rate's peak."""
        if isinstance(self.momentum, tuple):
            return self.momentum
        return (self.momentum, self.momentum)

    def __post_init__(self) -> None:
        if isinstance(self.momentum, (list, tuple)):  # a JSON spec gives a list
            if len(self.momentum) != 2:
                raise ValueError(f"momentum must be a number or a pair, got {self.momentum!r}")
            object.__setattr__(self, "momentum", tuple(float(m) for m in self.momentum))
        if not (self.max_substeps == "auto" or self.max_substeps >= 1):
            raise ValueError(f"max_substeps must be 'auto' or >= 1, got {self.max_substeps!r}")
        if not 0 < self.memory_fraction <= MAX_MEMORY_FRACTION:
            raise ValueError(
                f"memory_fraction must be in (0, {MAX_MEMORY_FRACTION}], got "
                f"{self.memory_fraction} (the rest holds what the activation estimate leaves out)"
            )
        if not (self.remat == "auto" or isinstance(self.remat, bool)):  # "off" would be true
            raise ValueError(f"remat must be 'auto', true or false, got {self.remat!r}")
        steps = None if self.budget_minutes is not None else self.steps  # derived later
        problems = schedule_problems(steps, self.warmup, self.lr_initial, self.lr_max)
        if problems:
            raise ValueError("; ".join(problems))


def schedule_problems(
    steps: int | None, warmup: float, lr_initial: float, lr_max: float, steps_key: str = "steps"
) -> list[str]:
    """What keeps ``make_optimizer``'s one-cycle schedule from running as meant: ``OneCycleLR``
    divides by its warm-up's length ``warmup * steps - 1`` (a warm-up of exactly one step
    divides by zero, a shorter one makes the first step one of the anneal, at about the peak
    rate, with no warm-up at all; ``steps`` ``None``: not known yet, as before a
    ``budget_minutes`` calibration) and by its anneal's (none at ``warmup`` 1: every step trained, then a
    division by zero before the last checkpoint), and a start at or above the peak would warm
    up downward. ``steps_key`` names the setting the steps come from (``budget_minutes`` where
    they were derived from it)."""
    problems = []
    if not 0.0 < warmup < 1.0:
        problems.append(
            f"warmup {warmup} must lie strictly between 0 and 1 (a fraction of the steps, the "
            "rest annealing)"
        )
    elif steps is not None and warmup * steps <= 1.0:
        length = "one warm-up step" if warmup * steps == 1.0 else "under one warm-up step"
        problems.append(
            f"warmup {warmup} x steps {steps} is {length}, which the one-cycle schedule cannot take (it divides by the warm-up's length - 1, "
            f"and below one step starts on its anneal, near the peak rate): change {steps_key} "
            "or warmup"
        )
    if not lr_initial < lr_max:
        problems.append(
            f"lr_initial {lr_initial} must be below lr_max {lr_max} (the warm-up rises to it)"
        )
    return problems


Log = Callable[[str], None]


def make_optimizer(
    model: StableModel, cfg: TrainConfig
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.OneCycleLR]:
    """SGD with momentum and weight decay, one-cycle schedule with linear annealing; the momentum
    held, or cycled inversely to the learning rate (``TrainConfig.momentum``). The schedule's
    steps are final here (a ``budget_minutes`` run's derived ones): its warm-up is checked."""
    problems = schedule_problems(cfg.steps, cfg.warmup, cfg.lr_initial, cfg.lr_max)
    if problems:
        raise ValueError("; ".join(problems))
    outer, peak = cfg.momenta
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr_max, momentum=outer, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.lr_max,
        total_steps=cfg.steps,
        pct_start=cfg.warmup,
        anneal_strategy="linear",
        cycle_momentum=isinstance(cfg.momentum, tuple),
        base_momentum=peak,
        max_momentum=outer,
        div_factor=cfg.lr_max / cfg.lr_initial,
        final_div_factor=cfg.final_div_factor,
    )
    return opt, sched


def _check_finite(
    step: int, loss: float | None, model: StableModel, cfg: TrainConfig, ckpt: Path
) -> None:
    """Stop on a non-finite loss or a norm estimate that is non-finite or above ``max_norm``.

    Called with ``loss=None`` right after the power iteration, before the forward pass: the
    sub-step count grows with the norm squared, so an exploded norm must stop the run before
    the forward pass tries to take millions of sub-steps."""
    norms = [b.operator.sigma_value() for b in model.constrained_blocks()]  # no device sync
    bad = (loss is not None and not math.isfinite(loss)) or any(
        not (math.isfinite(n) and n <= cfg.max_norm) for n in norms
    )
    if bad:
        largest = f"{max(norms):.4g}" if norms else "n/a"
        raise DivergenceError(
            f"training diverged at step {step}: loss={'not computed' if loss is None else loss}, "
            f"largest norm estimate={largest} "
            f"(limit {cfg.max_norm}); last good checkpoint: {last_good(ckpt)}"
        )


@dataclass
class _Passes:
    """The most bytes a pass kept (``ActivationCost.bytes``) among those a limit let run: the
    largest of the holes their freed activations leave in this process's heap, which its next
    pass reuses. Shared by every ``SubstepLimit.now()`` of one limit."""

    largest: int = 0


@dataclass(frozen=True)
class SubstepLimit:
    """What ``train.max_substeps`` allows a forward pass: ``count`` sub-steps in total, or
    (``auto``) ``budget`` bytes of the activations ``cost`` predicts, ``budget`` being
    ``fraction`` of the memory found free (``free`` bytes, ``where``) at the start, or less
    before a pass (``now``). ``remat``: each block's checkpointing, fixed; ``None``
    (``remat: auto`` under ``auto``): chosen before each pass, off while the pass fits without,
    else the cheapest that fits (``ActivationCost.cheapest_remat``). ``passes``: what the passes
    run so far kept (``_check_substeps`` records each)."""

    count: int | None
    cost: ActivationCost | None = None
    budget: int = 0
    free: int = 0
    where: str = ""
    remat: tuple[bool, ...] | None = None
    fraction: float = 0.8
    device: torch.device | None = None  # None: the budget is fixed
    passes: _Passes = field(default_factory=_Passes, compare=False, repr=False)

    def now(self) -> SubstepLimit:
        """The limit before a pass: the start's budget, or the smaller one that the memory
        free now allows (another process may have taken some), never a larger one.

        Free now counts, as CUDA's ``free_memory`` does with what its caching allocator holds
        unused, the memory this process's own heap holds free for it on the CPU
        (``memory.heap_free``), up to what its largest pass so far kept: the kernel counts the
        activations a pass freed as taken (the resident set, ``ulimit -v``, the cgroup), but
        the next pass reuses them, so a pass that fit before still fits at the same counts
        while only its own freed memory is missing (``free`` is then what this process can
        still allocate ``where`` the limit is: its heap's free part included). What other
        processes take, or memory the allocator gave back to the kernel and someone took,
        lowers the budget still."""
        if self.device is None:
            return self
        free, where = free_memory(self.device)
        if int(self.fraction * free) >= self.budget:
            return self
        if self.device.type == "cpu" and self.passes.largest > 0:
            free += min(heap_free(), self.passes.largest)
            if int(self.fraction * free) >= self.budget:
                return self
        return dataclasses.replace(self, budget=int(self.fraction * free), free=free, where=where)


def substep_limit(
    model: StableModel, task: Task, cfg: TrainConfig, device: torch.device
) -> SubstepLimit:
    """``cfg.max_substeps`` as a ``SubstepLimit``; ``auto`` measures the model's activation
    cost on one training image (``memory.activation_cost``) and the free memory."""
    if cfg.max_substeps != "auto" or next(model.constrained_blocks(), None) is None:
        return SubstepLimit(count=None if cfg.max_substeps == "auto" else int(cfg.max_substeps))
    first = torch.zeros(1, dtype=torch.long, device=task.images.device)
    inputs, _ = task.batch(first, torch.Generator(device=device).manual_seed(cfg.seed))
    if cfg.channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    cost = activation_cost(model, inputs, cfg.batch_size, lambda: _autocast(cfg, device))
    free, where = free_memory(device)
    blocks = model.constrained_blocks()
    remat = None
    if cfg.remat != "auto":
        remat = tuple(
            b.checkpoints(cfg.batch_size * n) for b, n in zip(blocks, cost.inputs, strict=True)
        )
    budget = int(cfg.memory_fraction * free)
    return SubstepLimit(None, cost, budget, free, where, remat, cfg.memory_fraction, device)


def _log_limit(model: StableModel, limit: SubstepLimit, log: Log) -> None:
    """What ``auto`` allows, and what a pass at the current counts keeps (after a resume)."""
    if limit.cost is not None:
        _, counts = _counts(model.train())
        need = limit.cost.bytes(counts, _remat(limit, counts))
        log(
            f"sub-step limit (train.max_substeps=auto): activations up to "
            f"{_size(limit.budget)}, {limit.fraction:.0%} of the {_size(limit.free)} "
            f"{limit.where}; a pass keeps {_size(need)} at the current {sum(counts)} sub-steps"
        )


def _counts(model: StableModel) -> tuple[list[float], list[int]]:
    """Each constrained block's norm estimate and the sub-steps of its next forward pass."""
    norms = [b.current_norm() for b in model.constrained_blocks()]
    blocks = model.constrained_blocks()
    return norms, [b.substeps(n) for b, n in zip(blocks, norms, strict=True)]


def _remat(limit: SubstepLimit, counts: list[int]) -> list[bool]:
    """Each block's checkpointing for a pass at ``counts``: ``limit.remat``, or (chosen) the
    cheapest that fits the budget (``ActivationCost.cheapest_remat``: none while the pass fits
    unchecked), or every block that can where nothing fits."""
    cost = cast(ActivationCost, limit.cost)
    if limit.remat is not None:
        return list(limit.remat)
    chosen = cost.cheapest_remat(counts, limit.budget)
    return list(cost.checkpointable) if chosen is None else chosen


def _size(n: int) -> str:
    """``2.36 GiB`` or, below 1 GiB, ``24.0 MiB``."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_substeps(
    step: int,
    model: StableModel,
    limit: SubstepLimit,
    ckpt: Path,
    graphs: StepGraphs | None,
    log: Log,
) -> None:
    """Stop before a forward pass that takes more sub-steps than ``limit`` allows.

    Called after ``_check_finite``, with the counts the forward pass will use (each block's
    ``substeps`` at its current norm, as ``schedule`` computes them), all on the host: no device
    synchronisation, and nothing a CUDA graph has to capture. A norm below ``max_norm`` can
    still ask for 10,000x the initial count; without this check the activations of those
    sub-steps exhaust the memory and the job dies in the allocator. Under ``auto`` it also
    sets each block's checkpointing for the pass (``_remat``), and a pass that fits alone but
    not beside the CUDA graphs' memory pool (it is not replayed: it runs eagerly or is
    captured) turns the graphs off instead."""
    norms, counts = _counts(model)
    if (cost := limit.cost) is not None:
        limit = limit.now()
        remat = _remat(limit, counts)
        need = cost.bytes(counts, remat)
        if need <= limit.budget:
            limit.passes.largest = max(limit.passes.largest, need)
            if _set_remat(model, remat) and limit.remat is None:
                log(f"remat: {sum(remat)} of {len(remat)} blocks checkpointed from step {step}, "
                    f"where the pass takes {sum(counts)} sub-steps: {_size(need)} of the "
                    f"{_size(limit.budget)} allowed (train.remat=auto)")  # fmt: skip
            _make_room(graphs, counts, remat, need, limit)
            return
        weight = [
            cost.block_bytes(i, n, r) for i, (n, r) in enumerate(zip(counts, remat, strict=True))
        ]
        excess = (
            f" keeping {_size(need)} of activations, above the {_size(limit.budget)} that "
            f"train.max_substeps=auto allows ({limit.fraction:.0%} of the "
            f"{_size(limit.free)} {limit.where})"
        )
    elif limit.count is None or sum(counts) <= limit.count:
        return
    else:
        weight = counts
        excess = (
            f", above train.max_substeps={limit.count} (their activations would not fit in memory)"
        )
    blocks = list(model.constrained_blocks())
    worst = max(range(len(blocks)), key=weight.__getitem__)
    name = next(n for n, m in model.named_modules() if m is blocks[worst])
    raise SubstepLimitError(
        f"training stopped at step {step}: the forward pass would take {sum(counts)} sub-steps"
        f"{excess}; block {name} needs {counts[worst]} at norm estimate {norms[worst]:.4g}; "
        f"last good checkpoint: {last_good(ckpt)}"
    )


def _set_remat(model: StableModel, remat: list[bool]) -> bool:
    """Give each block its checkpointing for the next pass (the gradients are the same either
    way, to the bit on the CPU); whether any block checkpoints where it did not before, or the
    other way round (unset counts as not)."""
    blocks = list(model.constrained_blocks())
    changed = any(bool(b.checkpoint_substeps) != r for b, r in zip(blocks, remat, strict=True))
    for block, r in zip(blocks, remat, strict=True):
        block.checkpoint_substeps = r
    return changed


def _make_room(
    graphs: StepGraphs | None,
    counts: list[int],
    remat: list[bool],
    need: int,
    limit: SubstepLimit,
) -> None:
    """Turn ``graphs`` off when a pass they do not replay would not fit beside their pool: as
    large as the largest pass ever captured into it (``StepGraphs.pool_peak``), also one since
    evicted."""
    if graphs is None or not graphs.enabled or limit.cost is None:
        return
    captured = graphs.captured_passes()
    held = max((limit.cost.bytes(c, r) for c, r in captured), default=0)
    held = graphs.pool_peak = max(held, graphs.pool_peak)
    if (tuple(counts), tuple(remat)) in captured:
        return
    if need + held > limit.budget:
        graphs.turn_off(
            f"the pass at {sum(counts)} sub-steps ({_size(need)}) would not fit beside the "
            f"graphs' memory pool ({_size(held)}) in {_size(limit.budget)}",
            "memory",
        )


def _check_weights(step: int, model: StableModel, ckpt: Path) -> None:
    """Stop on non-finite weights before a validation or a checkpoint reads them. A NaN or inf
    gradient under a finite loss (an overflow in the backward pass) reaches the weights through
    the update, and the next step's norm estimate would catch it only after a checkpoint of
    NaNs had become the "last good" one. One host synchronisation, at these steps only."""
    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
    if not bool(finite):
        raise DivergenceError(
            f"training diverged at step {step}: non-finite weights after the update (a NaN or "
            f"inf gradient); last good checkpoint: {last_good(ckpt)}"
        )


def _timed(state: RunState, what: str, work: Callable[[], None]) -> None:
    """Run ``work``, counting it in ``state.<what>s`` (before: a checkpoint write saves its own
    count) and adding its seconds to ``state.<what>_s`` (after)."""
    setattr(state, f"{what}s", getattr(state, f"{what}s") + 1)
    t0 = time.perf_counter()
    work()
    setattr(state, f"{what}_s", getattr(state, f"{what}_s") + time.perf_counter() - t0)


def _row(
    step: int, loss: float, metric: float, lr: float, model: StableModel, images_per_s: float
) -> dict:
    row = {"step": step, "kind": "train", "loss": loss, "metric": metric, "lr": lr}
    stats = model.block_stats()
    row["substeps"] = sum(n for n, _ in stats)
    row["images_per_s"] = images_per_s
    for i, (n, norm) in enumerate(stats):
        row[f"block{i}_substeps"], row[f"block{i}_norm"] = n, norm
    return row


def train(
    model: StableModel,
    task: ClassificationTask | DenoisingTask,
    cfg: TrainConfig,
    workdir: Path,
    config_hash: str,
    log: Callable[[str], None] = print,
) -> tuple[StableModel, RunState]:
    """Train ``model`` on ``task``; resumes from ``workdir/checkpoint.pt`` when compatible.

    Returns the model holding the best validation weights (in ``eval()``) and the run state
    (log rows, best metric and step, wall time).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "checkpoint.pt"
    for stale in remove_stale_temporaries(ckpt_path):  # a write killed mid-way (SIGKILL)
        log(f"removed {stale.name}, the temporary of an interrupted checkpoint write")
    # from the start: a stop signal during start-up (the budget's calibration, the resume, graph
    # set-up) stops the run after its first step, saved, instead of killing it
    with StopFlag() as stop:
        device = next(model.parameters()).device
        build_loss(cfg.loss, model)  # fail before any step on a bad loss
        prepare_for_speed(model, cfg)
        limit = substep_limit(model, task, cfg, device)
        cfg = _budgeted(model, task, cfg, workdir, config_hash, device, limit, log)
        opt, sched = make_optimizer(model, cfg)
        state = resume(ckpt_path, config_hash, model, opt, sched, log)
        _log_limit(model, limit, log)
        graphs = step_graphs(model, task, cfg, device, log)
        end = cfg.steps if cfg.stop_after is None else min(cfg.stop_after, cfg.steps)
        if end < cfg.steps:
            log(f"stopping after {end} steps of the {cfg.steps}-step schedule (stop_after)")
        checkpoint = functools.partial(save, ckpt_path, config_hash, model, opt, sched, state)
        _settle_resumed_stop(model, task, cfg, state, end, ckpt_path, checkpoint, device, log)
        if state.stop_metric is not None and state.step < end:  # going on past an earlier stop
            state.rows = [
                r for r in state.rows if not (r["kind"] == "val" and r["step"] == state.step)
            ]
            state.stop_metric = None
        progress = _Progress(end, state.step, device)
        start = state.step
        if state.step < end:  # this run trains: its steps run here
            state.device = device_label(device)
        while state.step < end:
            captured = graphs.capture_s if graphs is not None else 0.0
            t0 = time.perf_counter()
            _train_step(model, task, cfg, opt, sched, state, device, ckpt_path, limit, graphs, log)
            dt = time.perf_counter() - t0
            state.elapsed += dt
            if state.step == start:  # this process's start-up
                state.startup_s, state.startup_steps = state.startup_s + dt, state.startup_steps + 1
                progress.started(state.step + 1, state.startup_s)  # the pace leaves it out
            elif graphs is not None:  # a CUDA graph captured in this step (one-off): start-up too
                state.startup_s += min(graphs.capture_s - captured, dt)
            state.step += 1
            if (state.step - 1) % cfg.log_every == 0:  # the step just logged its row
                log(progress.line(state))
            last = state.step == end
            validate = _on_grid(cfg, state.step) or last
            if validate:
                _validate_at(model, task, cfg, state, ckpt_path, device, log)
            else:  # the step's, before any checkpoint records it
                state.peak_memory_mb = max(state.peak_memory_mb, peak_memory_mb(device))
            # after validating: a stop signal that arrived meanwhile gets its checkpoint too
            if state.step % cfg.checkpoint_every == 0 or last or stop.signum is not None:
                if not validate:
                    _check_weights(state.step, model, ckpt_path)
                _timed(
                    state,
                    "checkpoint",
                    lambda: save(ckpt_path, config_hash, model, opt, sched, state),
                )
            if stop.signum is not None and not last:  # at the last step: finish instead
                raise Interrupted(
                    f"signal {stop.signum} at step {state.step}: checkpoint {ckpt_path} written; "
                    "rerun to resume"
                )
    if graphs is not None:
        log(graphs.summary())
    if state.stop_metric is not None and state.stop_metric > state.best_metric:
        # stopped off the grid (stop_after) with the best weights: they are the model's
        state.best_metric, state.best_step = state.stop_metric, state.step
        return model.eval(), state
    if state.best_state is None:
        raise RuntimeError(f"training ended at step {state.step} without a validation to keep")
    model.load_state_dict(state.best_state)
    return model.eval(), state


def _on_grid(cfg: TrainConfig, step: int) -> bool:
    """Whether ``step`` steps done fall on the validation grid (every ``val_every``, and the
    schedule's end); off it, a validation is a stop's (``_validate``)."""
    return step % cfg.val_every == 0 or step == cfg.steps


def _validate_at(
    model: StableModel,
    task: Task,
    cfg: TrainConfig,
    state: RunState,
    ckpt_path: Path,
    device: torch.device,
    log: Log,
) -> None:
    """Validate the weights after ``state.step`` steps (a grid step's or a stop's), then count
    the peak memory of the step and its validation, before any checkpoint records it."""
    _check_weights(state.step, model, ckpt_path)
    on_grid = _on_grid(cfg, state.step)
    _timed(state, "validation", functools.partial(_validate, model, task, state, log, on_grid))
    state.peak_memory_mb = max(state.peak_memory_mb, peak_memory_mb(device))


def _settle_resumed_stop(
    model: StableModel,
    task: Task,
    cfg: TrainConfig,
    state: RunState,
    end: int,
    ckpt_path: Path,
    checkpoint: Callable[[], None],
    device: torch.device,
    log: Log,
) -> None:
    """A run resumed at or past its stop (``stop_after`` lowered to the checkpoint's step or
    below it): at it, its last step is validated (its peak memory counted, then checkpointed)
    as a run stopping there validates it, unless it was; past it, the model kept is named as
    ``train`` returns it, and a checkpoint with no validation at all is refused naming ``stop_after``."""
    if (
        state.step == end
        and end > 0
        and not any(r["kind"] == "val" and r["step"] == end for r in state.rows)
    ):
        _validate_at(model, task, cfg, state, ckpt_path, device, log)
        _timed(state, "checkpoint", checkpoint)
    if state.step <= end:
        return
    if state.best_state is None and state.stop_metric is None:
        raise ValueError(
            f"checkpoint {ckpt_path} is at step {state.step}, past stop_after={end}, and holds "
            f"no validated model: set stop_after to at least {state.step}, or delete the "
            f"checkpoint to stop at {end}"
        )
    stopped = state.stop_metric is not None and state.stop_metric > state.best_metric
    log(
        f"checkpoint {ckpt_path} is at step {state.step}, past stop_after={end}: its best "
        f"model (step {state.step if stopped else state.best_step}) is kept; delete the "
        f"checkpoint to stop at {end}"
    )


class _Progress:
    """The progress line of a logged step: its row (step, loss, lr, total sub-steps), the wall
    time per step since the previous line (validation and checkpoints included), the peak
    memory so far and the time left at that pace. The pace leaves start-up out
    (``RunState.startup_s``): it starts at the end of this process's first step
    (``started``), whose start-up (the CUDA context, cuDNN's tuning) would make the first
    line's time left many times too long, and a later window's CUDA graph captures are not
    counted in it. The first line, with no step timed yet, gives ``ms/step n/a`` and
    ``eta n/a``."""

    def __init__(self, steps: int, step: int, device: torch.device) -> None:
        self.steps, self.step, self.device = steps, step, device
        self.time, self.startup = time.perf_counter(), 0.0

    def started(self, step: int, startup_s: float) -> None:
        """The first step of this process ended at ``step``, the run's start-up at
        ``startup_s`` seconds: time the pace from here."""
        self.time, self.step, self.startup = time.perf_counter(), step, startup_s

    def line(self, state: RunState) -> str:
        now = time.perf_counter()
        timed = state.step - self.step
        spent = max(now - self.time - (state.startup_s - self.startup), 0.0)
        per_step = spent / max(timed, 1)
        self.time, self.step, self.startup = now, state.step, state.startup_s
        row = state.rows[-1]
        pace, eta = (
            (f"{1000 * per_step:.1f}", _duration(per_step * (self.steps - state.step)))
            if timed > 0
            else ("n/a", "n/a")
        )
        return (
            f"step {row['step']}/{self.steps} loss {row['loss']:.4f} lr {row['lr']:.3g} "
            f"substeps {row['substeps']} ms/step {pace} "
            f"peak_mem {peak_memory_mb(self.device):.0f}MiB eta {eta}"
        )


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _budgeted(
    model: StableModel,
    task: Task,
    cfg: TrainConfig,
    workdir: Path,
    config_hash: str,
    device: torch.device,
    limit: SubstepLimit,
    log: Log,
) -> TrainConfig:
    """``cfg`` with ``steps`` derived from ``budget_minutes``: timed on a copy of the model once,
    then read back from ``workdir/budget.json`` on resume (see ``budget.py``). The copy steps
    at learning rate 0: every step costs what a step of the run costs, on the weights the run
    starts from (a schedule of the timed steps' own would reach its peak rate within them,
    grow the norms and so the sub-steps, and time a model the run never trains)."""
    if cfg.budget_minutes is None:
        return cfg

    def measure() -> float:
        probe = copy.deepcopy(model)
        calls = budget.WARMUP_STEPS + budget.TIMED_STEPS
        # a schedule the check takes, whatever the warm-up (its rate is replaced by 0 below)
        steps = max(calls + 1, math.floor(1 / cfg.warmup) + 1)
        opt, _ = make_optimizer(probe, dataclasses.replace(cfg, steps=steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 0.0)  # the weights stay
        state = RunState()
        graphs = step_graphs(probe, task, cfg, device, log)

        def step() -> None:
            ckpt = workdir / "calibration"
            _train_step(probe, task, cfg, opt, sched, state, device, ckpt, limit, graphs, log)
            state.step += 1

        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        return budget.seconds_per_step(step, sync=sync)

    path, ckpt = workdir / "budget.json", workdir / "checkpoint.pt"
    resumed = functools.partial(scheduled_steps, ckpt, config_hash)
    steps = budget.resolve_steps(path, config_hash, cfg.budget_minutes, measure, log, resumed)
    problems = schedule_problems(steps, cfg.warmup, cfg.lr_initial, cfg.lr_max, "budget_minutes")
    if problems:
        raise ValueError(
            f"budget_minutes {cfg.budget_minutes} gives {steps} steps: " + "; ".join(problems)
        )
    return dataclasses.replace(cfg, steps=steps)


def update_norms(model: StableModel, n_iters: int) -> None:
    """``model.update_norms`` with the fused power iteration (one grouped convolution per stage
    and one host synchronisation per step) unless the model overrides ``update_norms``."""
    start_norm_update(model, n_iters)()


def start_norm_update(
    model: StableModel, n_iters: int, graphs: StepGraphs | None = None
) -> Callable[[], object]:
    """Queue ``update_norms``'s device work (replayed from a CUDA graph with ``graphs``) and
    return what brings the estimates to the host (one synchronisation): a training step draws
    its batch in between, while the device iterates."""
    if type(model).update_norms is not StableModel.update_norms:
        model.update_norms(n_iters)
        return lambda: None
    ops = [b.operator for b in model.constrained_blocks()]
    run = fused_power_iteration if graphs is None else graphs.launch_power_iteration
    pending = run(ops, n_iters)
    return lambda: remember_estimates(*pending)


def prepare_for_speed(model: StableModel, cfg: TrainConfig) -> None:
    """The speed settings of ``cfg`` that act once: ``channels_last`` weights, cuDNN's algorithm
    search (``torch.backends.cudnn.benchmark``, process-wide) and sub-step activation
    checkpointing of every constrained block (``remat``)."""
    for block in model.constrained_blocks():
        block.checkpoint_substeps = None if cfg.remat == "auto" else bool(cfg.remat)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark


def _autocast(
    cfg: TrainConfig, device: torch.device, cache: bool = True
) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``cfg.amp``; power iterations inside turn it off themselves.
    ``cache=False`` while a CUDA graph is captured (cached casts would outlive the capture)."""
    if cfg.amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def _forward_loss(
    model: StableModel,
    task: Task,
    cfg: TrainConfig,
    device: torch.device,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    capturing: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, loss)`` of one batch; the loss in float32 whatever the autocast precision."""
    with _autocast(cfg, device, cache=not capturing):
        out = model(inputs)
    out = out.float()  # the loss (and the margin loss's Lipschitz estimate) in float32
    criterion = build_loss(cfg.loss)
    loss = task.loss(out, targets) if criterion is None else criterion(model, out, targets)
    return out, loss


def step_graphs(
    model: StableModel, task: Task, cfg: TrainConfig, device: torch.device, log: Log
) -> StepGraphs | None:
    """The CUDA graphs of ``cfg.cuda_graphs`` (``graphs.py``), or ``None`` on the CPU. A margin
    loss is captured with the step: its Lipschitz estimate (power iterations of the unconstrained
    layers, 1 for each block whose integrator has a contractivity radius) stays on the device;
    one that reads a norm on the host (an RK4 block) fails its capture, which turns graphs off
    with a log line."""
    if not cfg.cuda_graphs or device.type != "cuda":
        return None

    def forward_loss(
        inputs: torch.Tensor, targets: torch.Tensor, capturing: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward_loss(model, task, cfg, device, inputs, targets, capturing)

    return StepGraphs(model, forward_loss, cfg.cuda_graph_cache, log)


def _train_step(
    model: StableModel,
    task: Task,
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    state: RunState,
    device: torch.device,
    ckpt_path: Path,
    limit: SubstepLimit,
    graphs: StepGraphs | None = None,
    log: Log = print,
) -> None:
    """One step: batch, power iteration, forward/backward (eager or replayed from ``graphs``),
    SGD + schedule, divergence and sub-step checks, a log row every ``log_every`` steps."""
    model.train()
    finish_norm_update = start_norm_update(model, cfg.power_iters, graphs)
    inputs, targets = step_batch(task, cfg.batch_size, cfg.seed, state.step)
    if cfg.channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    finish_norm_update()
    _check_finite(state.step, None, model, cfg, ckpt_path)
    _check_substeps(state.step, model, limit, ckpt_path, graphs, log)
    t0 = time.perf_counter()
    if graphs is None:
        out, loss = _forward_loss(model, task, cfg, device, inputs, targets, capturing=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    else:
        out, loss = graphs(inputs, targets)
    opt.step()
    lr = float(sched.get_last_lr()[0])  # a float (the schedule's LRs are not tensors)
    sched.step()
    loss_value = float(loss.detach())
    _check_finite(state.step, loss_value, model, cfg, ckpt_path)
    if state.step % cfg.log_every == 0:
        speed = len(inputs) / max(time.perf_counter() - t0, 1e-9)
        state.rows.append(_row(state.step, loss_value, task.metric(out, targets), lr, model, speed))


def _validate(
    model: StableModel, task: Task, state: RunState, log: Log, on_grid: bool = True
) -> None:
    """Validate, log, and keep the weights when best. Off the grid (a ``stop_after`` stop) the
    metric is ``state.stop_metric``, compared with the best only when the run ends there: a
    later run past the stop then selects exactly as the uninterrupted one."""
    model.eval()
    metric = task.validate(model)
    state.rows.append({"step": state.step, "kind": "val", "metric": metric})
    last = next((r for r in reversed(state.rows) if r["kind"] == "train"), {})
    if not on_grid:
        state.stop_metric = metric
    elif metric > state.best_metric:
        state.best_metric, state.best_step = metric, state.step
        state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # loss, lr, sub-steps and speed are those of the last logged step, named when it is not the
    # step just run (``log_every`` apart, or before a resume)
    logged = "" if last.get("step", state.step - 1) == state.step - 1 else f" (step {last['step']})"
    best = f"best {state.best_metric:.4f} @ {state.best_step}" if state.best_step >= 0 else "first"
    if not on_grid:  # compared with the grid's best when the run ends here (``train``)
        best = "a stop off the validation grid" + (
            f"; the grid's best {state.best_metric:.4f} @ {state.best_step}"
            if state.best_step >= 0
            else ""
        )
    log(
        f"step {state.step} loss {last.get('loss', float('nan')):.4f}{logged} "
        f"val_{task.metric_name} {metric:.4f} ({best}) "
        f"lr {last.get('lr', float('nan')):.3g} substeps {last.get('substeps', 0)} "
        f"img/s {_rate(last.get('images_per_s', float('nan')))} elapsed {state.elapsed:.0f}s"
    )
    sys.stdout.flush()


def _rate(images_per_s: float) -> str:
    """Whole images per second, with two significant digits below 10 (a paper-size denoiser
    on a CPU trains at 0.1 images/s, which ``0`` would hide)."""
    return f"{images_per_s:.0f}" if images_per_s >= 10 else f"{images_per_s:.2g}"


def write_log(rows: list[dict], path: Path) -> None:
    """The per-step log as CSV (train and validation rows; blank where not applicable). A train
    row's ``step`` is the index of the step it logs (from 0: the one run with its ``lr``), a
    validation row's the number of steps done (its weights are those after train row
    ``step - 1``), as the divergence errors and checkpoints count them."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
