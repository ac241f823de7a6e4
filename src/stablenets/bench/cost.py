"""What each job of a run cost, and what the paper-scale DAG will cost (issue 21: the rehearsal).

``write_cost`` (rule ``cost``, ``python -m stablenets cost``) reads, for every job of a run that
has a ``benchmark:`` directive, Snakemake's benchmark TSV (wall seconds ``s``, ``max_rss``) and
what the job recorded itself, and writes ``cost.csv`` and ``cost.md`` beside the run's results:

* one ``rehearsal`` row per job of the run: its unit of work, how many it did, seconds per unit,
  the fixed seconds (wall minus the seconds that scale with the units), sub-steps and learning
  rate of training, seconds per point of each attack pass, peak memory, and the projected hours
  of the same job at paper scale with the runtime limit of its resource kind and ``fits``
  (``submissions``: within the limit less the stop lead of the SLURM profile, ``stop_lead_s``);
* one ``paper`` row per job of the paper DAG (``cost.paper_config``: every variant, seed and
  noise level), with ``basis``, the measured job its projection rests on;
* ``total`` rows: the GPU jobs (train + evaluate + PnP: resource kinds with ``gpu`` > 0), all jobs.

A paper job ``p`` is projected from the measured job ``m`` of the same rule, preferably of the
same variant, else of the same model, else the rule's first measured job:

    seconds(p) = fixed(m) + f * sum over parts of  rate(m, part) * paper_units(p, part)
    fixed(m)   = max(wall(m) - variable(m, this run), 0)

The rates are those of every run of ``m`` (a resumed job's clocks total them); the fixed seconds
are those of the run that wrote its result, whose wall time its benchmark has: the seconds that
scale with the units of that run alone (training's and the sweep's ``*_run`` attributes, the
solver jobs' own). A result written before training and the classifier evaluation recorded
them takes every run's, which leaves a resumed job too few fixed seconds (said in ``basis``).

* training: three parts, from the loop's own clocks (``RunState``): steps (rate =
  ``train_time_s`` / steps run, each process's first step re-timed at the others' rate, its
  start-up fixed: ``_steady_time``; paper units = the variant's ``train.steps``), validations
  and checkpoint writes (rate = seconds per validation or write; paper counts =
  ``ceil(steps / val_every)`` and ``ceil(steps / checkpoint_every)``: both happen at the last
  step too). A rehearsal validates 3 times in 1,000 steps, the paper 108 times in 40,000, so
  these are not fixed costs. With ``budget_minutes``: the fixed seconds plus that budget plus
  the validations and checkpoint writes at the steps it buys at the projected step rate
  (``budget.budget_steps``: the job's own rule; paper units those steps; a resumed
  rehearsal job's fixed seconds leave out the budget's calibration, run by its first run only);
* classifier evaluation: its clean pass (the logits and margins of the ``n`` test points, which
  its clean accuracy and certificates come from; ``seconds_clean_run``: rate per test point,
  paper units ``N``; the device's first forward pass, start-up included, scales with it: an
  upper estimate), and one part per pass of the radius sweep (``radius_sweep.PASSES``), rate =
  the pass's seconds per attacked point (the job's ``seconds_per_point_*`` and
  ``attacked_points_*``), points scaled to the paper's settings: pgd and strong by
  ``N / n`` (test points) and by their radii, bisect by ``N / n`` and its ``ceil(log2(num))``
  attacks per point; the audit is the rate per point audited times the paper's slots (radii x
  ``audit_certified``: at most that many certified points per radius, whatever ``N``; an upper
  estimate). The points a measured pass attacked are those of the rehearsal's partially trained
  model (correct, uncertified, unbroken), scaled by ``N / n``: the paper model's may be more
  (``ATTACK_NOTE``, in cost.md). A pass the paper runs that attacked no point here (not run, or
  nothing left to attack) is estimated at an upper bound, every test point (``N``, not the
  rehearsal model's clean accuracy times ``N``) at each of its radii (the bisection: its
  attacks per point; the audit: its slots), at the rate of the first of: this job's pass (the
  bisection: its own, then the strong pass's), another
  evaluation's same pass times ``f`` of the two variants; where none attacked a point, the
  pass is left out and the projection marked incomplete (``fits`` empty, the totals name it).
  With the paper's attack settings and a run not resumed this is ``fixed + (wall - fixed) *
  N / n`` (audit aside);
* denoiser evaluation: rate = the seconds it denoised test images for per image
  (``denoising_s_run``, ``test_images_run``), fixed = the rest (loading, the Lipschitz search,
  whose settings the rehearsal keeps at the paper's); paper units = the paper's test images;
* PnP and TV deblurring (unit: image iteration, images x their iterations, the choice of
  PnP's strength and TV's weight included): rate = the seconds of its solves (``deblur_s_run``; its whole wall time
  where a result predates it), fixed = the rest (start-up, loading, PnP's model and Lipschitz
  bound); TV denoising (unit: image solve, its test images plus its validation images per
  candidate weight) likewise, its solves' seconds ``denoising_s_run``; paper units = the
  paper's test images, TV denoising's plus its ``tv.val_images`` (the whole validation split
  if null) x candidate weights, and images x ``max_iter`` (PnP) or ``tv.iters`` (TV) for
  deblurring, whose images include ``pnp.val_images`` per candidate (PnP's strengths, TV's
  weights), as its measured units do;
* each of these counts its units as the job ran them (``test_images_run``,
  ``image_solves_run``, ``image_iterations_run``): a rerun that resumed a killed job's saved
  groups and scores counts only its own, and one that computed none is no basis for a
  projection;
* data: the stand-in's generation as measured (not the paper's download).

``N`` is the paper's ``n_test``, or the test split of the run's data file (the rehearsal's
stand-ins have the real sizes). ``f`` is 1 for the same variant; else the ratio of the two
variants' benchmarked training-step times (``cost.bench``: ``ours`` rows run with each variant's
own options, ``rows.bench_key``, at its width) times their integrators' stages per sub-step
(the benchmark runs Euler) and, for two non-expansive blocks, theta of the basis over theta of
the job (``rows.substep_theta``: at the same norms, sub-steps scale with ``1 / theta``; the
``averaged`` denoiser, theta 0.5, takes twice Euler's); a variant without a row is assumed to
cost the same, said in ``basis``.
For a paper variant of another model (a layer family projected from the paper classifier),
``f`` also brings the basis's measured rate to the sub-steps of its benchmark row (row
``substeps_total`` / the basis's mean measured sub-steps: its training log's, or the evaluated
model's ``total_substeps``): the family's blocks cost the same at every step, where the paper
classifier's rate covers the sub-steps it ran, which grow with the learning rate (15 -> about 51
over the rehearsal). The paper classifier's own projection keeps its measured sub-steps: a lower
bound, as they keep growing past the rehearsal's steps. So do the jobs of every variant with
adaptive sub-steps (the non-expansive denoisers' too): their rows say so in ``basis``
(``SUBSTEP_BOUND``: their ``fits`` rests on a lower bound) and the totals count them; ``fits``
stays a bool (or empty: unknown), which ``_total``, ``projected_by_rule`` and cost.csv's readers
compare as such.
Per-point rates measured on batches smaller than the paper's are upper estimates on a GPU, whose
small attack batches are launch-bound.

``fits`` assumes the SLURM profile (``SLURM_PROFILE``), which stops a job of a rule it signals
(``--signal=TERM@<seconds>``) that long before its runtime limit, to save its progress and be
resubmitted; the local executor stops nothing early (and sets no runtime limit).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

from stablenets.pipeline.labels import sigma_label
from stablenets.pipeline.specs import RULE_KINDS, Jobs

__all__ = [
    "Job",
    "dag_jobs",
    "benchmark_files",
    "project",
    "read_paper_config",
    "write_cost",
    "projected_by_rule",
    "stop_lead_s",
    "submissions",
]

#: The rules whose jobs are measured and projected: every rule of the paper DAG but the reports.
RULES = [rule for rule, kind in RULE_KINDS.items() if kind != "report"]
COLUMNS = [
    "row", "rule", "variant", "sigma", "seed", "device", "wall_s", "max_rss_mb", "unit", "units",
    "seconds_per_unit", "fixed_s", "s_per_validation", "s_per_checkpoint", "s_per_point_pgd",
    "s_per_point_strong", "s_per_point_audit", "s_per_point_bisect", "substeps_first", "substeps_last", "substeps_max", "lr_last",
    "peak_memory_mb", "paper_units", "projected_h", "runtime_min", "fits", "gpu", "basis",
]  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One job of the DAG: its rule and wildcards (empty where the rule has none)."""

    rule: str
    variant: str = ""
    sigma: str = ""
    seed: int | None = None
    dataset: str = ""

    @property
    def stem(self) -> str:
        """The wildcard part of its benchmark, log and result paths (workflow/rules/*.smk)."""
        if self.rule == "prepare_data":
            return self.dataset
        if self.rule.endswith("_classifier"):
            return f"{self.variant}/seed{self.seed}"
        if self.rule == "evaluate_tv_denoising":
            return f"sigma{self.sigma}"
        if self.rule == "tv_deblur":
            return "tv"
        return f"sigma{self.sigma}/{self.variant}/seed{self.seed}"

    @property
    def task(self) -> str:
        return "classification" if self.rule.endswith("_classifier") else "denoising"

    def results(self, root: Path) -> Path:
        """Its main result file under ``results/<scale>/``."""
        where = {
            "prepare_data": f"data/{self.stem}.h5",
            "train_classifier": f"models/classification/{self.stem}/model.pt",
            "train_denoiser": f"models/denoising/{self.stem}/model.pt",
            "evaluate_classifier": f"eval/classification/{self.stem}.h5",
            "evaluate_denoiser": f"eval/denoising/{self.stem}.h5",
            "evaluate_tv_denoising": f"eval/denoising/{self.stem}/tv.h5",
            "pnp_deblur": f"pnp/{self.stem}.h5",
            "tv_deblur": "pnp/tv.h5",
        }
        return root / where[self.rule]

    def label(self) -> str:
        return f"{self.rule}/{self.stem}"


def dag_jobs(config: dict[str, Any]) -> list[Job]:
    """Every job with a ``benchmark:`` directive of a validated config's DAG."""
    jobs = Jobs(config)
    out = [Job("prepare_data", dataset=d) for d in ("cifar10", "bsds500")]
    for v in jobs.variants("classification"):
        out += [Job(r, v, seed=s) for s in jobs.seeds for r in RULES if r.endswith("_classifier")]
    for sg in jobs.sigmas:
        for v in jobs.variants("denoising"):
            out += [Job(r, v, sg, s) for s in jobs.seeds for r in RULES if r.endswith("_denoiser")]
        out.append(Job("evaluate_tv_denoising", sigma=sg))
    sg = sigma_label(config["pnp"]["noise_level"])
    out += [Job("pnp_deblur", v, sg, s) for v in config["pnp"]["denoisers"] for s in jobs.seeds]
    return out + [Job("tv_deblur")]


def benchmark_files(config: dict[str, Any], B: Callable[[str], str]) -> list[str]:
    """The benchmark TSV of every job of ``dag_jobs`` (``B``: the benchmark path of a scale)."""
    return [B(f"{job.rule}/{job.stem}.tsv") for job in dag_jobs(config)]


# --------------------------------------------------------------------------------------------
# what a job measured


@dataclass
class Measured:
    """A run's job: wall time, its unit of work and the seconds that scale with it."""

    job: Job
    wall_s: float
    max_rss_mb: float
    unit: str
    units: float
    variable_s: float
    spec: dict[str, Any]  # the job's own specification (its outputs' ``config``)
    parts: dict[str, tuple[float, float]] = field(default_factory=dict)  # pass -> (s, points)
    stats: dict[str, Any] = field(default_factory=dict)
    device: str = ""  # what the job computed on (its outputs' ``device``; "" if unrecorded)
    substeps: float = 0.0  # its model's mean total sub-steps over the work measured (0: none)
    # the run that wrote the result: its seconds that scale with the units, where variable_s
    # totals every run of a resumed job (None: variable_s is this run's); what its basis says
    # of a result recorded without them
    run_variable_s: float | None = None
    caveat: str = ""

    @property
    def fixed_s(self) -> float:
        """The wall time of the run that wrote the result less its own variable seconds."""
        own = self.variable_s if self.run_variable_s is None else self.run_variable_s
        return max(self.wall_s - own, 0.0)


def _benchmark(path: Path) -> tuple[float, float]:
    import pandas as pd

    row = pd.read_csv(path, sep="\t").iloc[0]
    rss = pd.to_numeric(row.get("max_rss"), errors="coerce")
    return float(row["s"]), float(rss)


def _ratio(a: float, b: float) -> float:
    """``a / b``, NaN for nothing measured (``b`` 0)."""
    return a / b if b else math.nan


def _measure_training(job: Job, path: Path, wall: float, rss: float) -> Measured:
    import pandas as pd

    from stablenets.nn.models import read_checkpoint

    extra = read_checkpoint(path)["extra"]
    log = pd.read_csv(path.with_name("train_log.csv"))
    # casts: pandas ships no annotations (a boolean row mask gives a frame, a column a series)
    train = cast(pd.DataFrame, log[log["kind"] == "train"])
    steps = int(log.loc[log["kind"] == "val", "step"].max())  # validated at the last step run
    substeps = cast(pd.Series, train["substeps"].astype(int))
    parts: dict[str, tuple[float, float]] = {
        "step": (_steady_time(extra, steps), steps),
        **{p: (float(extra.get(f"{p}_s", 0.0)), float(extra.get(f"{p}s", 0))) for p in _OCCASIONAL},
    }
    stats: dict[str, Any] = {
        "substeps_first": int(substeps.iloc[0]),
        "substeps_last": int(substeps.iloc[-1]),
        "substeps_max": int(substeps.max()),
        "lr_last": float(train["lr"].iloc[-1]),
        "peak_memory_mb": float(extra["peak_memory_mb"]),
        **{f"s_per_{p}": _ratio(s, n) for p, (s, n) in parts.items() if p != "step"},
    }
    spec = json.loads(extra["config"])
    variable = sum(s for s, _ in parts.values())
    run = _training_run_s(extra, _ratio(*parts["step"]))
    return Measured(job, wall, rss, "step", steps, variable, spec, parts, stats,
                    str(extra.get("device", "")), float(substeps.mean()), run,
                    "" if run is not None else UNRECORDED_RUN)  # fmt: skip


def _training_run_s(extra: dict[str, Any], step_s: float) -> float | None:
    """The variable seconds of the run that saved the model (its ``<clock>_run``:
    ``RunState.run_clocks``): its steps' (``_steady_time``: its start-up stays fixed; a run
    whose steps were all start-up has them at ``step_s``, every run's steady rate), its
    validations' and checkpoint writes'; None where it predates them."""
    if "steps_run" not in extra:
        return None
    run = {k: extra[f"{k}_run"] for k in ("train_time_s", "startup_s", "startup_steps")}
    steps = int(extra["steps_run"])
    own = steps > int(run["startup_steps"])  # a steady step of its own to time the others by
    step_seconds = _steady_time(run, steps) if own else steps * step_s if steps else 0.0
    return step_seconds + sum(float(extra[f"{p}_s_run"]) for p in _OCCASIONAL)


UNRECORDED_RUN = (
    "; recorded without its last run's own seconds: fixed = wall less every run's (too few after "
    "a resume)"
)
"""What a measured job's ``basis`` says where it did not record its last run's seconds."""


_OCCASIONAL = {"validation": "val_every", "checkpoint": "checkpoint_every"}
"""The training loop's occasional work (``RunState``'s clocks) and the key of its interval."""


def _steady_time(extra: dict[str, Any], steps: int) -> float:
    """``train_time_s`` less the start-up the loop recorded (``startup_s``): the first step of
    each process (``startup_steps`` of them: CUDA context, cuDNN autotuning), re-timed at the
    rate of the others, and the seconds of every CUDA graph capture (``StepGraphs.capture_s``;
    a key is captured on its second sighting, in a later step, whose replay stays a step). Over
    a short run (the rehearsal's ResNet: 50 steps) these would weigh on the projected 40,000;
    so they stay fixed, the captures of the rehearsal's sub-step counts only (a paper run's
    later counts are captured too: a lower bound). Unrecorded, or no other step:
    ``train_time_s`` as is."""
    total, first = float(extra["train_time_s"]), int(extra.get("startup_steps", 0))
    if not first or steps <= first:
        return total
    return (total - min(float(extra["startup_s"]), total)) * steps / (steps - first)


def _train_seconds(
    m: Measured, train: dict[str, Any], steps: float, parts: Sequence[str] = ("step", *_OCCASIONAL)
) -> float:
    """Step, validation and checkpoint seconds of ``steps`` paper steps (module docstring), of
    ``parts`` of them."""
    seconds = 0.0
    for p, (s, n) in m.parts.items():
        if p in parts:
            count = steps if p == "step" else math.ceil(steps / train[_OCCASIONAL[p]])
            seconds += s / n * count if n else 0.0
    return seconds


def _attrs(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Attributes of a result file and the job specification it records."""
    from stablenets.pipeline.runtime import read_results

    attrs = read_results(path, ())[0]
    return attrs, json.loads(attrs["config"])


def _measure_classifier_eval(job: Job, path: Path, wall: float, rss: float) -> Measured:
    """Seconds and attacked points per pass of the radius sweep, from the job's result file
    (``seconds_per_point_<pass>`` and ``attacked_points_<pass>``: every run's), and the seconds
    of its clean pass over its ``n_test`` points and of its attacks in the run that wrote it
    (``seconds_clean_run``, ``seconds_attacks_run``)."""
    from stablenets.evaluation.radius_sweep import PASSES

    attrs, spec = _attrs(path)
    n = int(attrs["n_test"])
    parts = {}
    for p in PASSES:
        points = float(attrs[f"attacked_points_{p}"])
        rate = float(attrs[f"seconds_per_point_{p}"])
        parts[p] = (rate * points if points else 0.0, points)
    stats = {f"s_per_point_{p}": float(attrs[f"seconds_per_point_{p}"]) for p in PASSES}
    stats["clean_accuracy"] = float(attrs["clean_accuracy"])
    run, caveat = None, UNRECORDED_RUN + ", its clean pass among them (not scaled to N)"
    if "seconds_clean_run" in attrs:  # the clean pass: a part, per test point
        parts["clean"] = (float(attrs["seconds_clean_run"]), n)
        run, caveat = float(attrs["seconds_attacks_run"]) + parts["clean"][0], ""
    variable = sum(s for s, _ in parts.values())
    return Measured(job, wall, rss, "test point", n, variable, spec, parts, stats,
                    str(attrs.get("device", "")), float(attrs.get("total_substeps", 0)), run,
                    caveat)  # fmt: skip


def measure(job: Job, tsv: Path, root: Path) -> Measured:
    """What one job of the run cost (``root``: its ``results/<scale>/`` folder)."""
    wall, rss = _benchmark(tsv)
    path = job.results(root)
    if job.rule.startswith("train_"):
        return _measure_training(job, path, wall, rss)
    if job.rule == "evaluate_classifier":
        return _measure_classifier_eval(job, path, wall, rss)
    if job.rule == "prepare_data":
        return Measured(job, wall, rss, "dataset", 1, wall, {})
    attrs, spec = _attrs(path)
    device = str(attrs.get("device", ""))
    # units: what this run computed (its wall time's), not what a killed run before it saved
    if job.rule == "evaluate_denoiser":
        units, seconds = int(attrs["test_images_run"]), float(attrs["denoising_s_run"])
        return Measured(job, wall, rss, "test image", units, min(seconds, wall), spec,
                        device=device)  # fmt: skip
    if job.rule == "evaluate_tv_denoising":  # its choice of weight included
        units = int(attrs["image_solves_run"])
        seconds = min(float(attrs.get("denoising_s_run", wall)), wall)  # all where unrecorded
        return Measured(job, wall, rss, "image solve", units, seconds, spec, device=device)
    units = int(attrs["image_iterations_run"])  # TV's choice of its weight included
    # the seconds of its solves (``deblur_s_run``); a result written before it was recorded: all
    seconds = min(float(attrs.get("deblur_s_run", wall)), wall)
    return Measured(job, wall, rss, "image-iteration", units, seconds, spec, device=device)


# --------------------------------------------------------------------------------------------
# projection


def _pass_counts(ev: dict[str, Any]) -> dict[str, int]:
    """What each pass of an evaluation config runs per point: radii (pgd, strong), radii x
    ``audit_certified`` slots (audit), attacks per point (bisect: ``ceil(log2(num))``)."""
    import numpy as np

    grid = np.linspace(ev["eps"]["start"], ev["eps"]["stop"], ev["eps"]["num"])
    std = np.asarray(ev["standard_eps"], dtype=np.float64)
    strong = ev["strong"]
    sweep_grid = strong["on_grid"] and strong["grid_search"] == "sweep"
    bisect = strong["on_grid"] and not sweep_grid

    def radii(r: np.ndarray) -> int:
        return int(np.count_nonzero(np.unique(np.round(r, 12))))

    return {
        "pgd": radii(np.concatenate([grid, std])),
        "strong": radii(np.concatenate([grid, std]) if sweep_grid else std),
        "audit": radii(std) * ev["audit_certified"],
        "bisect": math.ceil(math.log2(ev["eps"]["num"])) if bisect else 0,
    }


def _eval_seconds(
    m: Measured, paper: Paper, n_paper: float, others: Sequence[Measured]
) -> tuple[float, list[str], bool]:
    """Seconds of a classifier evaluation's clean pass and attacks at paper scale, per pass
    (module docstring), a note per pass not projected from its own measured points (and always
    one for the strong pass), and whether every pass the paper runs has a rate (else the
    seconds are a lower bound: a pass that attacked no point in any evaluation is left out)."""
    from stablenets.evaluation.radius_sweep import PASSES

    run = _pass_counts(m.spec["evaluate"])
    want = _pass_counts(paper.config["classification"]["evaluate"])
    clean_s, n = m.parts.get("clean", (0.0, 0))  # none recorded: among the fixed seconds
    seconds, notes, complete = (clean_s / n * n_paper if n else 0.0), [], True
    for p in (p for p in PASSES if want[p]):
        s, points = m.parts[p]
        if points and run[p]:  # the audit: at most its slots, whatever N; the others: N / n
            scale = 1 / points if p == "audit" else n_paper / m.units / run[p]
            seconds += s * scale * want[p]
            if p == "strong":
                notes.append(f"strong pass: {points:.0f} points at {run[p]} radii, "
                             f"{s / points:.3g} s each, scaled to {want[p]} radii and N / n")  # fmt: skip
            continue
        found = _pass_rate(m, _STAND_INS.get(p, (p,)), others, paper)
        if found is None:
            complete = False
            notes.append(f"pass {p} attacked no point in any evaluation: not projected "
                         "(incomplete, a lower bound)")  # fmt: skip
            continue
        rate, source = found
        count = want[p] if p == "audit" else n_paper * want[p]  # every test point: a bound
        seconds += rate * count
        notes.append(_estimate_note(p, source, paper))
    return seconds, notes, complete


def _pass_rate(
    m: Measured, passes: tuple[str, ...], others: Sequence[Measured], paper: Paper
) -> tuple[float, str] | None:
    """Seconds per attacked point of the first of ``passes`` with points, for ``m``'s model: its
    own, else that of the first other classifier evaluation that attacked points in it, times
    ``factor`` (``m``'s variant's cost over that one's); with the pass and job it came from.
    None where no evaluation attacked a point in any of them."""
    for p in passes:
        for o in (m, *(o for o in others if o is not m and o.job.rule == m.job.rule)):
            s, n = o.parts.get(p, (0.0, 0))
            if n:
                f = 1.0 if o is m else paper.factor(m.job, o)[0] * paper.to_measured(m, o)
                source = "" if o is m else f" of {o.job.label()} x {f:.3g}"
                return s / n * f, f"the {p} pass's rate{source}"
    return None


_STAND_INS = {"strong": ("strong", "audit"), "bisect": ("bisect", "strong", "audit")}
"""The passes whose rate stands in for a pass that attacked no point, in order: the audit runs
PGD and the strong attack on certified points, which survive it (its most expensive case): an
upper bound of the strong attack's rate."""


def _estimate_note(p: str, source: str, paper: Paper) -> str:
    """How a pass with no measured point of its own was estimated (``_eval_seconds``)."""
    if p == "bisect":
        from stablenets.evaluation.radius_sweep import runs_grid_attacks

        cheaper = runs_grid_attacks(paper.config["classification"]["evaluate"]["strong"])
        return (f"bisection estimated at {source}"
                + (" (an upper bound: its grid_attacks cost less)" if cheaper else ""))  # fmt: skip
    points = "slots" if p == "audit" else "test points x radii"
    return (f"{p} pass: no point attacked here, estimated as every one of the paper's {points} at "
            f"{source} (an upper bound: it attacks only the correct, uncertified, unbroken "
            "ones)")  # fmt: skip


@dataclass
class Paper:
    """The paper-scale configuration and what the projection needs from the run."""

    config: dict[str, Any]
    bench: dict[tuple[str, Any, str], BenchRow]  # (bench model, width, options) -> its row

    def variant(self, task: str, name: str) -> dict[str, Any] | None:
        return self.config[task]["variants"].get(name)

    def train(self, task: str, name: str) -> dict[str, Any]:
        section = self.config[task]
        return {**section["train"], **section["variants"][name].get("train", {})}

    def units(self, job: Job) -> float:
        """The paper job's units of work (module docstring)."""
        cfg = self.config
        if job.rule.startswith("train_"):
            return self.train(job.task, job.variant)["steps"]
        if job.rule == "evaluate_classifier":
            n_test, size = cfg["classification"]["evaluate"]["n_test"], self.test_size("cifar10")
            return min(n_test or size, size)
        if job.rule == "evaluate_denoiser":
            n_test, size = cfg["denoising"]["evaluate"]["n_test"], self.test_size("bsds500")
            return min(n_test or size, size)
        if job.rule == "evaluate_tv_denoising":
            n_test, size = cfg["denoising"]["evaluate"]["n_test"], self.test_size("bsds500")
            tv = cfg["denoising"]["tv"]
            chosen_on = self.val_images(tv["val_images"]) * len(tv["weights"])
            return min(n_test or size, size) + chosen_on
        if job.rule in ("pnp_deblur", "tv_deblur"):  # the test images, then each candidate's
            p = cfg["pnp"]
            images = min(p["n_images"], self.test_size("bsds500"))
            candidates, iters = (
                (p["strengths"], p["max_iter"])
                if job.rule == "pnp_deblur"
                else (p["tv"]["weights"], p["tv"]["iters"])
            )
            return (images + self.val_images(p["val_images"]) * len(candidates)) * iters
        return 1

    def test_size(self, dataset: str) -> int:
        """The test split of ``dataset`` in the paper configuration's ``data`` (the official
        archive's, or its stand-in's): not the run's, whose stand-ins may be smaller."""
        from stablenets.data.shapes import bsds500_shape, cifar10_shape

        shape = {"cifar10": cifar10_shape, "bsds500": bsds500_shape}[dataset]
        return shape(self.config["data"][dataset]).n_test

    def val_images(self, asked: int | None) -> int:
        """The validation images a TV weight or PnP strength is chosen on: ``asked`` of the
        BSDS500 validation split, the whole split where null or more (the jobs take
        ``val[:asked]``)."""
        from stablenets.data.shapes import bsds500_shape

        n_val = bsds500_shape(self.config["data"]["bsds500"]).n_val
        return min(asked or n_val, n_val)

    def resources(self, job: Job) -> dict[str, Any]:
        return self.config["resources"][RULE_KINDS[job.rule]]

    def bench_key(self, task: str, name: str, v: dict[str, Any]) -> tuple[tuple, bool]:
        """The benchmark row key of variant ``name`` (``v``) and whether it fell back to an
        eager row (``rows.bench_key``)."""
        from stablenets.bench.rows import BENCH_NAME, bench_key, variant_width

        width = variant_width(task, v, self.config)
        return bench_key(self.bench, BENCH_NAME.get(v["model"]), width, self.train(task, name))

    def to_measured(self, m: Measured, other: Measured) -> float:
        """What brings a rate that ``factor(m.job, other)`` carried over from another model
        (at ``m``'s benchmark row's sub-steps) to the sub-steps ``m`` ran, as ``m``'s own
        measured rates are: the inverse of ``_at_row_substeps`` for ``m``; 1 for one model."""
        v = self.variant(m.job.task, m.job.variant)
        if v is None or v["model"] == _model(self, other):
            return 1.0
        key, _ = self.bench_key(m.job.task, m.job.variant, v)
        return 1.0 / _at_row_substeps(m, self.bench[key])[0] if key in self.bench else 1.0

    def factor(self, job: Job, basis: Measured) -> tuple[float, str]:
        """``f``: the paper variant's cost over the basis variant's (module docstring)."""
        from stablenets.bench.rows import STAGES, substep_theta

        if job.variant == basis.job.variant:
            return 1.0, ""
        task = job.task
        keys, stages, eager, models, thetas = [], [], [], [], []
        for name in (job.variant, basis.job.variant):
            v = self.variant(task, name)
            if v is None:
                return 1.0, f" ({name} is not a paper variant: same cost assumed)"
            key, fallback = self.bench_key(task, name, v)
            keys.append(key)
            models.append(v["model"])
            eager += [name] if fallback else []
            kwargs = v.get("kwargs", {})
            stages.append(STAGES[kwargs.get("integrator", "euler")])
            thetas.append(substep_theta(v))
        f = stages[0] / stages[1]
        block = (self.variant(task, job.variant) or {}).get("kwargs", {}).get("block")
        note = f", block {block}: Euler block's time assumed" if block else ""
        # a block of fixed cost (CPL, SLL, ...) on a sub-stepping basis of its model (one
        # benchmark row, an Euler model at theta 1): the row's sub-steps, not the growth the
        # basis ran into (``_at_row_substeps`` below; the row's theta is the Euler block's)
        fixed = block is not None and thetas[0] is None and thetas[1] is not None
        rows = keys[0] in self.bench and keys[1] in self.bench
        if fixed and not rows:  # no row to bring it to: an Euler block at theta 1
            thetas[0] = 1.0
        if thetas[0] and thetas[1] and thetas[0] != thetas[1]:  # sub-steps ~ 1 / theta
            more = thetas[1] / thetas[0]
            f *= more
            note += f", theta {thetas[0]:g} for {thetas[1]:g}: x {more:.3g} sub-steps"
        note += f", {' and '.join(eager)}: eager row, no graphed one" if eager else ""
        losses = [
            f"{name} loss" if name else "the task's loss"
            for name in ((self.train(task, n).get("loss") or {}).get("name")
                         for n in (job.variant, basis.job.variant))
        ]  # fmt: skip
        if losses[0] != losses[1]:  # the benchmark rows time the task's own loss
            note += f", {losses[0]} for {losses[1]}: same step time assumed"
        if rows:
            f *= self.bench[keys[0]].step_ms / self.bench[keys[1]].step_ms
            if models[0] != models[1] or fixed:
                scale, how = _at_row_substeps(basis, self.bench[keys[1]])
                f, note = f * scale, note + how
            return f, f" x {f:.3g} (benchmarked step {keys[0][:2]} / {keys[1][:2]}{note})"
        return f, f" x {f:.3g} (stages and theta only: not benchmarked{note})"


class BenchRow(NamedTuple):
    """What the projection reads of a benchmark row: its step time and the total sub-steps its
    model took (0: a model without them)."""

    step_ms: float
    substeps: int


def _model(paper: Paper, m: Measured) -> str | None:
    return (paper.variant(m.job.task, m.job.variant) or {}).get("model")


def _at_row_substeps(basis: Measured, row: BenchRow) -> tuple[float, str]:
    """The factor that brings ``basis``'s measured rate to its benchmark ``row``'s sub-steps,
    for a paper job of another model: a layer family's blocks cost the same at every step,
    where the measured rate of a non-expansive classifier covers the sub-steps it ran (15 ->
    about 51 over the rehearsal), which the ``row``'s time (at 15) does not. 1 where either
    has no sub-steps."""
    if not (basis.substeps and row.substeps):
        return 1.0, ""
    return row.substeps / basis.substeps, (
        f", at the row's {row.substeps} sub-steps, not the {basis.substeps:.3g} measured"
    )


def _basis(job: Job, measured: list[Measured], paper: Paper) -> Measured | None:
    """The measured job a paper job rests on: same rule and variant, else same model, else the
    rule's first measured job; only jobs that computed something (a rerun that read back all
    its work from saved progress measured no rate)."""
    same_rule = [m for m in measured if m.job.rule == job.rule and m.units > 0]
    for m in same_rule:
        if (m.job.variant, m.job.dataset) == (job.variant, job.dataset):
            return m
    model = (paper.variant(job.task, job.variant) or {}).get("model")
    for m in same_rule:
        if model and (paper.variant(job.task, m.job.variant) or {}).get("model") == model:
            return m
    return same_rule[0] if same_rule else None


SUBSTEP_BOUND = "at the rehearsal's sub-steps, which keep growing: fits rests on a lower bound"
"""What the ``basis`` of a job of a model with adaptive sub-steps says (``SUBSTEP_NOTE``)."""


def _substep_bound(job: Job, paper: Paper) -> str:
    """``SUBSTEP_BOUND`` for a paper job of a variant whose blocks take adaptive sub-steps
    (``rows.substep_theta``), whose training, evaluation or PnP is projected at the sub-steps
    the rehearsal's model ran (or its benchmark row's): fewer than the paper model's. Not for
    a ``budget_minutes`` training job, whose steps are its budget's whatever they cost."""
    from stablenets.bench.rows import substep_theta

    v = paper.variant(job.task, job.variant)
    if v is None or substep_theta(v) is None:
        return ""
    if job.rule.startswith("train_") and paper.train(job.task, job.variant).get("budget_minutes"):
        return ""
    return f"; {SUBSTEP_BOUND}"


class Projection(NamedTuple):
    """A paper job's units of work, projected seconds and basis text; ``complete``: false where
    part of its work had no measured rate (the seconds a lower bound, whether it fits unknown)."""

    units: float
    seconds: float
    basis: str
    complete: bool = True


def _budget_projection(basis: Measured, train: dict[str, Any], f: float, text: str) -> Projection:
    """A training job with ``budget_minutes``: the steps that budget buys at the projected step
    rate (``f`` times the basis's; ``budget.budget_steps``, as the job derives them), their
    minutes, and the validations and checkpoint writes at that many steps, which the budget
    leaves out (``train/budget.py``), plus the fixed seconds."""
    from stablenets.train.budget import budget_steps

    s, n = basis.parts.get("step", (basis.variable_s, basis.units))
    steps = budget_steps(train["budget_minutes"], f * s / n)
    occasional = f * _train_seconds(basis, train, steps, parts=tuple(_OCCASIONAL))
    seconds = basis.fixed_s + 60 * train["budget_minutes"] + occasional
    return Projection(
        steps, seconds, f"{text}: budget_minutes, {steps} steps at the projected rate"
    )


def project(job: Job, basis: Measured, paper: Paper, others: Sequence[Measured] = ()) -> Projection:
    """A paper job's projection from a measured job (``others``: the run's measured jobs, whose
    attack rates stand in for a pass ``basis`` attacked no point in)."""
    f, how = paper.factor(job, basis)
    units = paper.units(job)
    text = f"{basis.job.label()}{how}{basis.caveat}{_substep_bound(job, paper)}"
    train = paper.train(job.task, job.variant) if job.rule.startswith("train_") else {}
    if train.get("budget_minutes"):
        return _budget_projection(basis, train, f, text)
    if train:
        return Projection(units, basis.fixed_s + f * _train_seconds(basis, train, units), text)
    if job.rule == "evaluate_classifier":
        seconds, notes, complete = _eval_seconds(basis, paper, units, others)
        text += "".join(f"; {note}" for note in notes)
        return Projection(units, basis.fixed_s + f * seconds, text, complete)
    if job.rule == "prepare_data":
        text += " (as measured: the run's data source)"
    elif basis.fixed_s == 0:
        text += " (fixed costs included: upper estimate)"
    return Projection(units, basis.fixed_s + f * basis.variable_s / basis.units * units, text)


# --------------------------------------------------------------------------------------------
# the report


SLURM_PROFILE = Path("workflow/profiles/slurm/config.yaml")  # relative to the repository root
"""The cluster profile whose ``slurm_extra`` says, per rule, when SLURM stops a job."""

SLURM_SIGNAL = re.compile(r"--signal=(?:[RB]+:)?\w+(?:@(\d+))?")
"""sbatch's ``--signal=[{R|B}:]<sig>[@<seconds before the time limit>]``."""

SLURM_SIGNAL_DEFAULT_S = 60
"""sbatch's lead where ``--signal`` gives no ``@<seconds>``."""


@functools.cache
def _stop_leads(profile: Path) -> dict[str, int]:
    """The stop lead of each rule of ``set-resources`` in a Snakemake SLURM profile (its
    ``slurm_extra``, else ``default-resources``'s), and of every other rule (key ``""``)."""
    import yaml

    if not profile.is_file():
        raise ValueError(
            f"cost: {profile} does not exist (the SLURM profile that says when jobs stop)"
        )
    settings = yaml.safe_load(profile.read_text()) or {}
    default = settings.get("default-resources") or {}

    def lead(extra: str) -> int:
        signal = SLURM_SIGNAL.search(extra)
        return 0 if signal is None else int(signal[1] or SLURM_SIGNAL_DEFAULT_S)

    leads = {"": lead(str(default.get("slurm_extra", "")))}
    for rule, res in (settings.get("set-resources") or {}).items():
        leads[rule] = lead(str({**default, **res}.get("slurm_extra", "")))
    return leads


def stop_lead_s(rule: str, profile: Path = SLURM_PROFILE) -> int:
    """Seconds before its runtime limit at which the SLURM ``profile`` stops a job of ``rule``
    (``--signal=TERM@<seconds>``: the job saves its progress, exits 75 and is resubmitted); 0
    where the profile signals none (the job runs to its limit)."""
    leads = _stop_leads(profile)
    return leads.get(rule, leads[""])


def submissions(hours: float, runtime_min: float, lead_s: float) -> int:
    """How many submissions a job of ``hours`` needs with a runtime limit of ``runtime_min``
    minutes, each stopped ``lead_s`` seconds before that limit (``stop_lead_s``) and resumed by
    the next: 1 where it fits; 0 where none can (the stop comes before the job's start)."""
    usable_min = runtime_min - lead_s / 60
    if usable_min <= 0:
        return 0
    return max(1, math.ceil(60 * hours / usable_min))


def _row(
    kind: str,
    job: Job,
    paper: Paper,
    units: float,
    seconds: float,
    basis: str,
    complete: bool = True,
) -> dict:
    """A job's projection against its runtime limit less its stop lead (``submissions``;
    ``fits`` None where ``complete`` is false: unknown)."""
    res = paper.resources(job)
    hours = seconds / 3600
    fits = submissions(hours, res["runtime"], stop_lead_s(job.rule)) == 1 if complete else None
    return {
        "row": kind,
        "rule": job.rule,
        "variant": job.variant or job.dataset,
        "sigma": job.sigma,
        "seed": "" if job.seed is None else job.seed,
        "paper_units": units,
        "projected_h": hours,
        "runtime_min": res["runtime"],
        "fits": fits,
        "gpu": res.get("gpu", 0),
        "basis": basis,
    }


def _measured_row(m: Measured, paper: Paper, others: Sequence[Measured]) -> dict[str, Any]:
    row: dict[str, Any] = {"row": "rehearsal", "rule": m.job.rule, "basis": "measured"}
    if m.job.variant and paper.variant(m.job.task, m.job.variant) is None:
        row.update(projected_h=math.nan)  # not a paper variant
    elif not m.units:  # a rerun that read back all its work: no rate measured
        row.update(projected_h=math.nan, basis="measured nothing: resumed its saved work")
    else:
        units, seconds, _, complete = project(m.job, m, paper, others)
        basis = f"measured{m.caveat}{_substep_bound(m.job, paper)}"
        row.update(_row("rehearsal", m.job, paper, units, seconds, basis, complete))
    row.update(
        variant=m.job.variant or m.job.dataset,
        sigma=m.job.sigma,
        seed="" if m.job.seed is None else m.job.seed,
        device=m.device,
        wall_s=m.wall_s,
        max_rss_mb=m.max_rss_mb,
        unit=m.unit,
        units=m.units,
        seconds_per_unit=_ratio(m.parts.get("step", (m.variable_s, m.units))[0], m.units),
        fixed_s=m.fixed_s,
        **{k: v for k, v in m.stats.items() if k in COLUMNS},
    )
    return row


def cost_rows(measured: list[Measured], paper: Paper) -> list[dict[str, Any]]:
    """The rows of ``cost.csv``: the run's jobs, the paper DAG's jobs and the totals."""
    rows = [_measured_row(m, paper, measured) for m in measured]
    dag = []
    for job in dag_jobs(paper.config):
        basis = _basis(job, measured, paper)
        if basis is None:
            raise ValueError(f"cost: no measured {job.rule} job to project {job.label()} from")
        dag.append(_row("paper", job, paper, *project(job, basis, paper, measured)))
    for label, chosen in (
        ("GPU jobs (train + evaluate + PnP)", [r for r in dag if r["gpu"]]),
        ("all jobs", dag),
    ):
        rows.append({"row": "total", "rule": label, **_total(chosen)})
    return rows + dag


def _total(chosen: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of projected jobs, whether all fit, naming those over their runtime and those
    projected incomplete (then the sum is a lower bound and, none over, ``fits`` unknown), and
    counting those whose ``fits`` rests on a lower bound (``SUBSTEP_BOUND``)."""
    named = [f"{r['rule']}/{r['variant']}" for r in chosen]
    late = [n for n, r in zip(named, chosen, strict=True) if r["fits"] is False]
    unknown = [n for n, r in zip(named, chosen, strict=True) if r["fits"] is None]
    basis = "over their runtime: " + (", ".join(late) if late else "none")
    if unknown:
        basis += "; projected incomplete (the total a lower bound): " + ", ".join(unknown)
    bounded = sum(SUBSTEP_BOUND in r["basis"] for r in chosen)
    if bounded:
        basis += f"; {bounded} projected at the rehearsal's sub-steps (a lower bound)"
    return {
        "units": len(chosen),
        "projected_h": sum(r["projected_h"] for r in chosen),
        "fits": False if late else None if unknown else True,
        "basis": basis,
    }


def _bench_rates(paths: list[Path]) -> dict[tuple[str, Any, str], BenchRow]:
    """ms per step and total sub-steps of the ``ours`` rows of benchmark CSVs (a later file's
    row replaces)."""
    import csv

    rates = {}
    for path in paths:
        if not path.is_file():
            raise ValueError(f"cost.bench: {path} does not exist")
        with path.open() as fh:
            for r in csv.DictReader(fh):
                if r["impl"] == "ours":
                    width = int(r["base_width"]) if r["base_width"] else ""
                    row = BenchRow(float(r["step_ms"]), int(r["substeps_total"] or 0))
                    rates[(r["model"], width, r["options"])] = row
    return rates


def _unlike_the_paper(run: dict[str, Any], paper: dict[str, Any]) -> list[str]:
    """The run's variants whose model or training settings (``stop_after`` aside) are not the
    paper's: projections resting on them are no paper-scale figures."""
    out = []
    for task in ("classification", "denoising"):
        for name, ours in run[task]["variants"].items():
            theirs = paper[task]["variants"].get(name, {})
            settings = [
                {**cfg[task]["train"], **v.get("train", {}), "stop_after": None}
                for cfg, v in ((run, ours), (paper, theirs))
            ]
            model = [(v.get("model"), v.get("kwargs", {})) for v in (ours, theirs)]
            if model[0] != model[1] or settings[0] != settings[1]:
                out.append(f"{task}/{name}")
    return out


SUBSTEP_NOTE = (
    "A model with adaptive sub-steps is projected at the mean sub-steps it ran here: a lower "
    "bound for its own jobs, as its sub-steps keep growing past the rehearsal's steps with the "
    "learning rate; their fits rests on it (their basis in cost.csv says so). A layer family "
    "projected from it is brought to its benchmark row's sub-steps first (its blocks cost the "
    "same at every step)."
)
"""cost.md's note on the sub-steps behind the projections (``factor``)."""

ATTACK_NOTE = (
    "An attack pass is projected from the points it attacked here, those of the rehearsal's "
    "partially trained model (correct, not certified, not yet broken), times N / n: a paper "
    "model with more such points attacks more. A pass that attacked no point here is projected "
    "at every test point (an upper bound)."
)
"""cost.md's note on the points behind the attack passes' projections (``_eval_seconds``)."""


def _markdown(
    rows: list[dict[str, Any]], scale: str, paper_path: str, seeds: int, unlike: list[str]
) -> str:
    import pandas as pd

    df = pd.DataFrame(rows, columns=COLUMNS)
    totals = df[df["row"] == "total"]
    gpu = totals.iloc[0]
    gpu_jobs = df[(df["row"] == "rehearsal") & (df["gpu"] > 0)]  # what the GPU total rests on
    on = ", ".join(sorted({d for d in gpu_jobs["device"] if d})) or "?"
    hours = "GPU-hours" if on.startswith("cuda") and "," not in on else f"hours on {on}"
    lines = [
        f"# Cost of the {scale} run and the projected paper-scale DAG",
        "",
        f"Projected paper-scale DAG ({paper_path}, {seeds} seed(s)): **{gpu['projected_h']:.1f} "
        f"{hours}** for {gpu['units']:.0f} GPU jobs (train + evaluate + PnP), measured on "
        f"{on}; "
        f"{totals.iloc[1]['projected_h']:.1f} h for all {totals.iloc[1]['units']:.0f} jobs. "
        f"Jobs {gpu['basis']}.",
        "",
        "Measured on the paper's models and training settings."
        if not unlike
        else "Measured on models or training settings other than the paper's "
        f"({', '.join(unlike)}): the projections resting on them are no paper-scale figures.",
        "",
    ]
    dag = df[df["row"] == "paper"]
    for rule, group in dag.groupby("rule", sort=False):
        lines.append(f"- {rule}: {group['projected_h'].sum():.2f} h over {len(group)} jobs")
    trained = df[(df["row"] == "rehearsal") & df["rule"].str.startswith("train_")]
    lines += ["", "## The paper's learning rate, tried", ""]
    for _, r in trained.iterrows():
        lines.append(
            f"- {r['rule']}/{r['variant']}: {r['units']:.0f} steps of the paper schedule, lr "
            f"{r['lr_last']:.3g} at the last logged step; sub-steps {r['substeps_first']:.0f} "
            f"first, {r['substeps_last']:.0f} last, {r['substeps_max']:.0f} at most"
        )
    lines += ["", SUBSTEP_NOTE, "", ATTACK_NOTE]
    shown = {
        "rehearsal": ["rule", "variant", "wall_s", "unit", "units", "seconds_per_unit", "fixed_s",
                      "s_per_validation", "peak_memory_mb", "projected_h", "runtime_min", "fits"],
        "paper": ["rule", "variant", "sigma", "seed", "paper_units", "projected_h", "runtime_min",
                  "fits", "basis"],
    }  # fmt: skip
    for kind, title in (("rehearsal", "Measured jobs"), ("paper", "Paper DAG, projected")):
        table = cast(pd.DataFrame, df[df["row"] == kind][shown[kind]])  # (no pandas annotations)
        lines += ["", f"## {title}", "", table.to_markdown(index=False, floatfmt=".4g")]
    return "\n".join(lines) + "\n"


def read_paper_config(path: str | Path, schema: Path) -> dict[str, Any]:
    """``cost.paper_config`` read and validated as a whole configuration; a ``ValueError`` (one
    line naming the key and file) where it is not, e.g. an overlay given for it. The workflow
    reads it when it starts (``cost.smk``), not only the last job."""
    from stablenets.pipeline.config import ConfigError, load_config

    try:
        return load_config(path, schema)
    except ConfigError as err:
        raise ValueError(
            f"cost.paper_config: {path} is not a valid whole configuration: "
            + "; ".join(err.problems)
        ) from None


def write_cost(
    spec: dict[str, Any], inputs: list[Path], out: Path, log: Callable[[str], None] = print
) -> None:
    """``cost.csv`` and ``cost.md`` of a run (rule ``cost``); ``inputs``: its jobs' benchmark
    TSVs, ``spec``: the run's validated ``config``, ``results`` and ``benchmarks`` (its folders)
    and ``schema`` (to validate ``cost.paper_config``)."""
    import pandas as pd

    from stablenets.atomic import atomic_write
    from stablenets.pipeline.runtime import write_sidecar

    run, root, bench = spec["config"], Path(spec["results"]), Path(spec["benchmarks"])
    by_tsv = {bench / f"{job.rule}/{job.stem}.tsv": job for job in dag_jobs(run)}
    unknown = [str(p) for p in inputs if Path(p) not in by_tsv]
    if unknown:
        raise ValueError(f"cost: {unknown} are not benchmark files of this run's jobs")
    measured = [measure(by_tsv[Path(p)], Path(p), root) for p in inputs]
    paper_path = run["cost"]["paper_config"]
    paper_config = read_paper_config(paper_path, Path(spec["schema"]))
    paper = Paper(paper_config, _bench_rates([Path(p) for p in run["cost"]["bench"]]))
    rows = cost_rows(measured, paper)
    write_sidecar(out, spec, -1, [m.job.results(root) for m in measured])
    atomic_write(Path(out), pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))
    unlike = _unlike_the_paper(run, paper_config)
    md = _markdown(rows, run["scale"], paper_path, len(paper_config["seeds"]), unlike)
    atomic_write(Path(out).with_suffix(".md"), md)
    log(md.split("\n\n")[1])


def projected_by_rule(cost_csv: Path, rules: set[str]) -> list[dict[str, Any]]:
    """The paper DAG's jobs of ``rules`` in a run's ``cost.csv`` (its ``paper`` rows), by rule:
    ``rule``, ``jobs``, ``projected_h`` (summed), ``each_h`` (the longest job), ``runtime_min``,
    ``over`` (the jobs projected past their runtime) and ``lower_bound`` (whether any rests on
    the rehearsal's sub-steps: ``SUBSTEP_BOUND`` in its ``basis``, a column a file may lack).
    For ``bench.training --project``, which projects the training jobs itself from step
    benchmarks."""
    import csv

    if not cost_csv.is_file():
        raise ValueError(f"cost: {cost_csv} does not exist (make rehearsal writes it)")
    with cost_csv.open() as fh:
        reader = csv.DictReader(fh)
        missing = {"row", "rule", "variant", "sigma", "projected_h", "runtime_min", "fits"}
        missing -= set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"cost: {cost_csv} lacks the columns {sorted(missing)}")
        rows = [r for r in reader if r["row"] == "paper" and r["rule"] in rules]
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        hours = float(r["projected_h"])
        by = out.setdefault(
            r["rule"],
            {"rule": r["rule"], "jobs": 0, "projected_h": 0.0, "each_h": 0.0, "over": [],
             "lower_bound": False},
        )  # fmt: skip
        by["jobs"] += 1
        by["projected_h"] += hours
        by["each_h"] = max(by["each_h"], hours)
        by["runtime_min"] = float(r["runtime_min"])
        by["lower_bound"] |= SUBSTEP_BOUND in (r.get("basis") or "")
        if r["fits"] != "True":  # "" where a pass had no rate: unknown
            name = "/".join(x for x in (r["variant"], r["sigma"]) if x)
            by["over"].append(name + (" (fits unknown)" if not r["fits"] else ""))
    return list(out.values())
