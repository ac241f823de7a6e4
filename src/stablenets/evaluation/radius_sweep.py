"""The evaluation of a classifier as one resumable sweep over the radius grid.

Each point is attacked only where it can change a number: PGD at every radius on the correct,
uncertified points (the paper's protocol: its curve is PGD's own at each radius); the strong
attack (AutoAttack) at the standard radii on what nothing broke, and over the grid by bisection
between each point's certified radius and the smallest radius an attack broke it at; a sample of
certified points audited, each near its own certified radius. The state
(:class:`SweepState`) is saved between radii, so a killed evaluation resumes where it stopped.
The attacks may search on a faster model (:class:`SearchModel`: bf16, CUDA graphs from
:mod:`stablenets.evaluation.attack_graphs`), the float32 eager model judging every example
(:func:`fast_search`). The attacks and certificates themselves are in
:mod:`stablenets.evaluation.robustness`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from stablenets.errors import InvariantError
from stablenets.evaluation.attack_graphs import GraphedModel
from stablenets.evaluation.robustness import (
    BALL_REL_TOL,
    Autocast,
    autoattack_l2,
    ball_tolerance,
    check_eps,
    check_in_ball,
    eval_mode,
    flat_norm,
    model_device,
    pgd_l2,
    predict,
)
from stablenets.interrupt import stop_asked
from stablenets.nn.operators import full_float32

if TYPE_CHECKING:  # the pipeline extra; imported where AutoAttack runs (autoattack_l2)
    pass


SeededAttack = Callable[..., Tensor]
"""``attack(model, x, y, eps, seed=s) -> x_adv`` (``pgd_l2`` and ``autoattack_l2`` with their other
options bound), with ``||x_adv - x||_2 <= eps`` per sample; ``seed`` makes each batch reproducible."""

PASSES = ("pgd", "strong", "audit", "bisect")
"""What a sweep runs at each radius, in order: the cheap attack on every correct, uncertified
point, the strong attack on every point no attack has broken yet, and the certificate audit (a
sample of the points certified there, each attacked near its own certified radius); then the strong
attack's bisection over ``SweepPlan.bisect_radii``."""

STATE_VERSION = 4
"""The layout and meaning of a saved :class:`SweepState` (2: PGD's breaks kept per radius; 3: the
audit attacks each point near its own certified radius, in groups of close radii, and the
job's certificates allow for the margin's rounding; 4: a point is audited once, its sample
drawn from the points no radius audited yet); saved progress of another version is not
resumed."""

RADIUS_DECIMALS = 12
"""Radii are attacked, recorded and read at this many decimals (:func:`radius_key`)."""


def radius_key(eps: float) -> float:
    """A radius as the sweep attacks, records and reports it: rounded to ``RADIUS_DECIMALS``
    (correctly rounded, idempotent), so that one radius computed two ways (``36/255`` in the
    config, ``k/39`` on a grid) is one radius, and a curve read at a radius reads the very radius
    that was attacked. That matters: an attack puts its example on the sphere, so a break radius
    equals the attacked radius, and the point counts as broken only when read there
    (``break_radius > eps`` is false), not at a value a rounding error below it."""
    return round(float(eps), RADIUS_DECIMALS)


def canonical_radii(eps: Sequence[float] | np.ndarray) -> np.ndarray:
    """:func:`radius_key` of every radius, as a float64 array."""
    return np.array([radius_key(e) for e in np.asarray(eps, dtype=np.float64).ravel()])


@dataclass
class SweepPlan:
    """What to run: the radii (any order; swept increasing), the attacks and the audit.

    ``strong_radii`` are the radii at which the strong attack runs (the standard radii, or every
    radius); ``audit_radii`` those at which ``audit_size`` points certified there (a fixed,
    seeded sample) are attacked by both attacks, each near its own certified radius
    (``audit_radius``): a certified point flipped proves the certificate wrong. The attacks take
    one radius per call, so the sample is attacked in groups of points whose certified radii lie
    within ``audit_group_ratio`` of the group's smallest, at that smallest radius: every point
    is attacked at least at ``1 / audit_group_ratio`` of its certified radius, in a few calls
    (one per point would cost a call of AutoAttack's, seconds on a GPU, each). ``ball_rel_tol``
    is the ball check's relative slack (``robustness.ball_tolerance``).
    ``bisect_radii`` are the radii the strong attack covers by bisection afterwards (``bisect``),
    with ``grid`` where given (a cheaper attack than at the standard radii, ``grid_attacks``).
    ``search`` is the search model the attacks share (``from_config``; its ``summary`` goes to
    the job's log), or ``None`` for attacks that search on the model itself.
    """

    radii: np.ndarray
    pgd: SeededAttack
    strong: SeededAttack | None
    strong_radii: frozenset[float]
    audit_radii: frozenset[float]
    audit_size: int
    batch_size: int
    seed: int = 0
    audit_group_ratio: float = 1.2
    ball_rel_tol: float = BALL_REL_TOL
    bisect_radii: np.ndarray = field(default_factory=lambda: np.zeros(0))
    search: SearchModel | None = None
    grid: SeededAttack | None = None

    @property
    def bisect_attack(self) -> SeededAttack | None:
        """The attack of the bisection: ``grid``, else ``strong``."""
        return self.grid if self.grid is not None else self.strong

    def __post_init__(self) -> None:
        self.radii = np.unique(canonical_radii(self.radii))
        for e in self.radii:
            check_eps(float(e))
        self.strong_radii = frozenset(map(radius_key, self.strong_radii))
        self.audit_radii = frozenset(map(radius_key, self.audit_radii))
        self.bisect_radii = np.unique(canonical_radii(self.bisect_radii))
        if not self.audit_group_ratio >= 1.0:
            raise ValueError(f"audit_group_ratio must be at least 1, got {self.audit_group_ratio}")

    @classmethod
    def from_config(
        cls, ev: dict[str, Any], seed: int, log: Callable[[str], None] = print
    ) -> SweepPlan:
        """The plan of an evaluation config (``classification.evaluate``): PGD at every radius,
        the strong attack at the standard radii and over the grid (``on_grid``, by bisection or
        sweep, ``grid_search``; the bisection with ``grid_attacks`` where given), the audit of
        ``audit_certified`` points at the standard radii; the attacks searching on one
        ``SearchModel`` (``precision``, ``cuda_graphs``; ``log`` gets its line if graphs go
        off)."""
        eps, std_eps = evaluation_radii(ev)
        strong = ev["strong"]
        sweep_grid = strong["on_grid"] and strong["grid_search"] == "sweep"
        bisect_grid = strong["on_grid"] and not sweep_grid
        search = SearchModel(ev["precision"], ev["cuda_graphs"], ev["cuda_graph_max_batch"], log)
        cheaper = runs_grid_attacks(strong)
        return cls(
            radii=np.concatenate([eps, std_eps]),
            pgd=fast_search(functools.partial(pgd_l2, **ev["pgd"]), search),
            strong=fast_search(strong_attack(strong, ev["batch_size"]), search),
            strong_radii=frozenset(std_eps) | (frozenset(eps) if sweep_grid else frozenset()),
            audit_radii=frozenset(std_eps),
            audit_size=ev["audit_certified"],
            batch_size=ev["batch_size"],
            seed=seed,
            audit_group_ratio=ev["audit_group_ratio"],
            bisect_radii=eps if bisect_grid else np.zeros(0),
            search=search,
            grid=fast_search(grid_attack(strong, ev["batch_size"]), search) if cheaper else None,
        )

    def passes(self, k: int) -> list[str]:
        """The passes run at ``radii[k]`` (none at radius 0: nothing can move a point there)."""
        e = radius_key(self.radii[k])
        if e == 0:
            return []
        run = {"pgd": True, "strong": self.strong is not None and e in self.strong_radii}
        run["audit"] = self.audit_size > 0 and e in self.audit_radii
        return [name for name in ("pgd", "strong", "audit") if run[name]]


@dataclass
class SweepState:
    """A sweep's progress: per-point bounds and where it stands (radius, pass, batch).

    ``certified_radius`` (lower bound of each point's robust radius, float64) is fixed;
    ``break_radius`` (upper bound: the smallest radius at which any attack found an adversarial
    example, 0 for a misclassified point, inf while none was found) and ``pgd_break_radius`` (the
    same for the cheap attack alone) shrink as the sweep goes. ``pgd_broken`` holds, per radius
    swept, the points the cheap attack broke at that radius: its curve is read there and not from
    ``pgd_break_radius``, because the paper's PGD curve is the attack run at each radius on its
    own (a 10-step PGD at a small radius may miss an example that it finds, closer, when run at
    a larger one: the envelope's curve is lower than the paper's). ``todo`` holds the points of the
    current pass, fixed when the pass starts, and ``done`` how many of them were attacked, so a
    resumed sweep attacks exactly the batches an uninterrupted one would.
    """

    correct: Tensor
    certified_radius: Tensor
    break_radius: Tensor
    pgd_break_radius: Tensor
    audit_order: Tensor
    audited_points: Tensor
    radius_index: int = 0
    pass_index: int = 0
    todo: Tensor | None = None
    done: int = 0
    audited: dict[float, int] = field(default_factory=dict)
    pgd_broken: dict[float, Tensor] = field(default_factory=dict)
    strong_survived: Tensor | None = None
    lo: Tensor | None = None
    hi: Tensor | None = None
    round: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PASSES, 0.0))
    points: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASSES, 0))

    @classmethod
    def start(cls, correct: Tensor, certified_radius: Tensor, seed: int) -> SweepState:
        correct = correct.detach().cpu().bool()
        n = len(correct)
        unbroken = torch.full((n,), math.inf, dtype=torch.float64)
        unbroken[~correct] = 0.0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        certified = certified_radius.detach().cpu().double().clone()  # the sweep may lower it
        audited = torch.zeros(n, dtype=torch.bool)
        return cls(correct, certified, unbroken, unbroken.clone(), order, audited)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def accuracies(self, eps: Sequence[float] | np.ndarray) -> dict[str, np.ndarray]:
        """Certified, PGD and empirical (every attack) robust accuracy at each ``eps``.

        Certified and empirical: ``mean_i [correct_i and r_i > eps]`` with ``r`` the certified and
        the break radius, exact at the swept radii (monotone: a point broken at ε is broken at
        every larger one). PGD: ``mean_i [correct_i and not broken by PGD run at eps]``, read at
        the radii PGD ran at (a ``ValueError`` elsewhere, 0 aside). ``eps`` is read as
        :func:`canonical_radii`, the radii the sweep attacked."""
        radii = canonical_radii(eps)
        e = torch.as_tensor(radii)[:, None]
        curves = {
            name: (self.correct[None, :] & (r[None, :] > e)).double().mean(dim=1).numpy()
            for name, r in (("certified", self.certified_radius), ("empirical", self.break_radius))
        }
        curves["pgd"] = np.array([self._pgd_accuracy(float(r)) for r in radii])
        return curves

    def _pgd_accuracy(self, eps: float) -> float:
        if eps == 0:
            return float(self.correct.double().mean())
        if eps not in self.pgd_broken:
            raise ValueError(f"PGD did not run at eps {eps:.6g}: its curve has no value there")
        return float((self.correct & ~self.pgd_broken[eps]).double().mean())


def _batch_seed(seed: int, k: int, pass_name: str, b: int) -> int:
    """An independent seed per (radius, pass, batch): the same batches get the same draws on
    resume."""
    words = [seed, k, PASSES.index(pass_name), b]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _todo(plan: SweepPlan, state: SweepState, pass_name: str, e: float) -> Tensor:
    live = state.correct & ~(state.certified_radius > e)
    if pass_name == "pgd":  # at every radius on its own: the paper's protocol
        return torch.nonzero(live).squeeze(1)
    if pass_name == "strong":
        return torch.nonzero(live & (state.break_radius > e)).squeeze(1)
    # The audit: each point once (at its own certified radius, whichever standard radius drew
    # it: a second audit would repeat the first), in increasing certified radius (_audit_group).
    order = state.audit_order
    certified = state.correct[order] & (state.certified_radius[order] > e)
    sample = order[certified & ~state.audited_points[order]][: plan.audit_size]
    return sample[torch.argsort(state.certified_radius[sample], stable=True)]


def _attack_batch(
    model: nn.Module,
    attack: SeededAttack,
    x: Tensor,
    y: Tensor,
    e: float,
    seed: int,
    rel_tol: float,
) -> Tensor:
    """Distances of the adversarial examples ``attack`` found (inf where it found none); every
    example is checked to lie in the ε-ball, up to its float32 rounding
    (``robustness.ball_tolerance``: far below any radius read), and in [0, 1] first. A distance
    is clamped to ε within that rounding alone, so that an example the attack put on the sphere
    counts at ε. Distance 0: the point is misclassified at its clean input in this batch."""
    x_adv = attack(model, x, y, e, seed=seed).to(x.device)
    check_in_ball(x_adv, x, e, rel_tol)
    fooled = predict(model, x_adv) != y
    dist = flat_norm(x_adv.double() - x.double()).clamp(max=e)
    return torch.where(fooled, dist, torch.full_like(dist, math.inf)).cpu()


CERTIFICATE_SLACK = 1e-3
"""How far (relatively) inside its certified radius an adversarial example proves the
certificate unsound; one within it lowers the certificate to its distance, with a log line
(``_overstated_by_rounding``). The audit attacks a point this far inside (``audit_radius``).
Far below anything the curves resolve (their grid's step is 0.026: a bound wrong by more than
0.1 % is caught), and well above the rounding of the certificate itself: on a tight 3x32x32
linear model whose logits cancel (sums of terms 100x larger than the logits), certified radii
exceeded the exact (float64) distance by up to 3.7e-4 of it, net of
``robustness.MARGIN_ROUNDING`` too (which scales with the logits, not with the terms that
cancel): a minimal-norm attack finds such examples."""


def _audit_group(plan: SweepPlan, state: SweepState) -> Tensor:
    """The audit's next group: from the next point of its sample (sorted by certified radius,
    ``_todo``), the points whose certified radius is within ``plan.audit_group_ratio`` of it, at
    most ``plan.batch_size``. A function of the state alone, so a resumed sweep groups alike."""
    assert state.todo is not None
    rest = state.todo[state.done : state.done + plan.batch_size]
    radii = state.certified_radius[rest]
    return rest[: int((radii <= radii[0] * plan.audit_group_ratio).sum())]


def audit_radius(certified: float, x: Tensor, rel_tol: float = BALL_REL_TOL) -> float:
    """The radius an audited point certified to radius ``r`` (a group's smallest; ``x``: its
    samples, whose size sets the rounding allowance) is attacked at: ``r (1 -
    CERTIFICATE_SLACK)``, less the ball check's rounding allowance (``robustness.ball_tolerance``)
    so that every example it accepts lies that far inside, where a flip proves the bound wrong.
    Why: the certificate claims ``r``, so it is tested there; an attack limited to the standard
    radius ``e`` it was sampled at can only flip a point whose true radius is below ``e``, and
    the certificate of a point certified at ``e`` is least often wrong there. (Not floored at
    ``e``: for ``r`` within the slack of ``e`` an example at ``e`` would be rounding.)"""
    tolerance = ball_tolerance(0.0, x, rel_tol)
    return (certified * (1 - CERTIFICATE_SLACK) - tolerance) / (1 + rel_tol)


HEARTBEAT_POLL_S = 1.0
"""How often the heartbeat looks for a stop signal (``interrupt.stop_asked``) between its lines."""


@contextmanager
def _heartbeat(log: Callable[[str], None], every_s: float, what: str) -> Iterator[None]:
    """A line ``"<what>: running for N s"`` every ``every_s`` seconds while the body runs: one
    strong-attack call on a batch takes minutes at paper scale (AutoAttack standard pays about
    10^4 passes per point it cannot break), and a silent log cannot be told from a hung job.
    A stop signal that arrives meanwhile is acknowledged at once, in one line (the job stops
    after this call: SLURM's warning is 300 s). The thread only formats ``what`` and the time;
    it never reads the sweep's state."""
    done, t0 = threading.Event(), time.perf_counter()

    def beat() -> None:
        told, last = False, t0
        while not done.wait(min(every_s, HEARTBEAT_POLL_S)):
            now = time.perf_counter()
            if not told and (signum := stop_asked()) is not None:
                log(f"{what}: signal {signum} received; the job stops and saves after this call")
                told = True
            if now - last >= every_s:
                log(f"{what}: running for {now - t0:.0f} s")
                last = now

    thread = threading.Thread(target=beat, name="attack-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _expected(state: SweepState, pass_name: str, points: int) -> str:
    """``" (about N s at the rate so far)"``: what a batch of ``points`` should take at the pass's
    seconds per point measured so far (empty before the first batch), for the heartbeat."""
    if not state.points[pass_name]:
        return ""
    rate = state.seconds[pass_name] / state.points[pass_name]
    return f" (about {rate * points:.0f} s at the rate so far)"


def _record(
    state: SweepState,
    pass_name: str,
    idx: Tensor,
    dist: Tensor,
    e: float,
    name: str,
    log: Callable[[str], None],
) -> None:
    """Record a batch's break distances (``_attack_batch``): the break radii (and PGD's and the
    strong attack's own records); an audited point flipped, or a break below a certified radius,
    raises ``InvariantError``. A certified point broken at distance 0 is a disagreement about its
    clean label (``_clean_label_disagreements``), not a break of its certificate."""
    _clean_label_disagreements(state, idx, dist, name, log)
    _overstated_by_rounding(state, idx, dist, name, log)
    if pass_name == "audit":
        _check_audit(state, idx, dist, e, name)
        return
    state.break_radius[idx] = torch.minimum(state.break_radius[idx], dist)
    if pass_name == "strong":  # the bisection's lower bounds (fixed before it starts)
        survived = idx[~torch.isfinite(dist)]
        if state.strong_survived is None:
            state.strong_survived = torch.zeros_like(state.break_radius)
        state.strong_survived[survived] = state.strong_survived[survived].clamp(min=e)
    if pass_name == "pgd":
        state.pgd_break_radius[idx] = torch.minimum(state.pgd_break_radius[idx], dist)
        state.pgd_broken[e][idx] = torch.isfinite(dist)
    unsound = state.break_radius[idx] < state.certified_radius[idx]
    if unsound.any():
        i = int(idx[unsound][0])
        raise InvariantError(
            f"model {name!r}: point {i} has an adversarial example at distance "
            f"{float(state.break_radius[i]):.6g} inside its certified radius "
            f"{float(state.certified_radius[i]):.6g}: the Lipschitz certificate is unsound"
        )


def _clean_label_disagreements(
    state: SweepState, idx: Tensor, dist: Tensor, name: str, log: Callable[[str], None]
) -> None:
    """Certified points misclassified at their clean input in this batch (an "example" at
    distance 0: the attacks return such a point unchanged): their float32 logits, computed in
    another batch than the margins, rounded to another class. That is a disagreement about the
    clean label (a margin within rounding beyond ``robustness.MARGIN_ROUNDING``), not an unsound
    certificate: the points count as not certified and broken at radius 0 (robust nowhere;
    clean accuracy keeps them), with one log line."""
    zero = (dist == 0) & (state.certified_radius[idx] > 0)
    if not zero.any():
        return
    points = idx[zero]
    log(
        f"model {name!r}: {len(points)} certified point(s) misclassified at the clean input in an "
        f"attack batch (point {int(points[0])}, certified radius "
        f"{float(state.certified_radius[points[0]]):.3g}): the clean prediction depends on the "
        "batch's float rounding; counted not certified and broken at radius 0"
    )
    state.certified_radius[points] = 0.0
    state.break_radius[points] = 0.0


def _overstated_by_rounding(
    state: SweepState, idx: Tensor, dist: Tensor, name: str, log: Callable[[str], None]
) -> None:
    """Points with an adversarial example inside their certified radius by less than
    ``CERTIFICATE_SLACK`` of it: the float32 margin overstated the certificate by rounding
    (an attack of minimal norm reaches it), which is no proof of an unsound bound. Their
    certified radius becomes the example's distance (the example proves no more), their break
    radius at most that, with one log line."""
    cert = state.certified_radius[idx]
    close = (dist < cert) & (dist >= cert * (1 - CERTIFICATE_SLACK))
    if not close.any():
        return
    points, found = idx[close], dist[close]
    log(
        f"model {name!r}: {len(points)} point(s) broken within {CERTIFICATE_SLACK:g} of their "
        f"certified radius (point {int(points[0])}: {float(found[0]):.6g} against "
        f"{float(state.certified_radius[points[0]]):.6g}): float32 rounding of the margin; "
        "their certified radius lowered to the example's distance"
    )
    state.certified_radius[points] = found
    state.break_radius[points] = torch.minimum(state.break_radius[points], found)


def _check_audit(state: SweepState, idx: Tensor, dist: Tensor, e: float, name: str) -> None:
    """An audited point with an adversarial example inside its certified radius (the audit
    attacks it there: ``audit_radius``) proves the certificate wrong: ``InvariantError`` naming
    it."""
    flipped = dist < state.certified_radius[idx]
    if flipped.any():
        i, d = int(idx[flipped][0]), float(dist[flipped][0])
        raise InvariantError(
            f"model {name!r}: audited point {i}, certified at eps={e:.4g} to radius "
            f"{float(state.certified_radius[i]):.6g}, was flipped by an attack at distance "
            f"{d:.6g}: the Lipschitz certificate is unsound"
        )


def _rates(plan: SweepPlan, state: SweepState) -> dict[str, float | None]:
    """Seconds per point of each pass measured so far (``None`` before its first batch); the
    bisection's, before its own, is the strong attack's where it runs that attack
    (``plan.grid`` unset), and the audit's is PGD's plus the strong attack's (it runs both)."""
    rate = {p: state.seconds[p] / state.points[p] if state.points[p] else None for p in PASSES}
    if rate["bisect"] is None and plan.grid is None:
        rate["bisect"] = rate["strong"]
    if rate["audit"] is None and rate["pgd"] is not None:
        rate["audit"] = rate["pgd"] + (rate["strong"] or 0.0) * (plan.strong is not None)
    return rate


def _work_left(plan: SweepPlan, state: SweepState) -> dict[str, int]:
    """Points each pass still has to attack if every point live now stays live: the rest of the
    current pass, the sweep's passes to come at its later radii, and the bisection's attacks
    (at most ``ceil(log2(hi - lo + 1))`` for a point whose first broken grid index lies in
    ``[lo, hi)``: its bounds now, ``_bisection_bounds`` before the bisection starts)."""
    work: dict[str, int] = dict.fromkeys(PASSES, 0)
    if state.radius_index < len(plan.radii):
        passes = plan.passes(state.radius_index)
        if state.todo is not None:
            work[passes[state.pass_index]] += len(state.todo) - state.done
        for k in range(state.radius_index, len(plan.radii)):
            first = state.pass_index + (state.todo is not None) if k == state.radius_index else 0
            for p in plan.passes(k)[first:]:
                work[p] += len(_todo(plan, state, p, float(plan.radii[k])))
    if len(plan.bisect_radii) and plan.bisect_attack is not None:
        lo, hi = (state.lo, state.hi) if state.lo is not None else _bisection_bounds(plan, state)
        assert hi is not None
        width = (hi - lo)[hi > lo].double()
        work["bisect"] = int(torch.ceil(torch.log2(width + 1)).sum())
    return work


def _eta(plan: SweepPlan, state: SweepState) -> str:
    """``ETA 200 s``: the work left (``_work_left``) at each pass's seconds per point so far
    (``_rates``): with the rates exact, an upper estimate, since points broken meanwhile need no
    more attacks. Where a pass with work left has no rate yet (at paper scale the strong attack
    costs some hundred times PGD per point), ``ETA 200 s + strong attack (not timed yet)``: a
    count of it as free would read as the end of a job with hours to go."""
    rate, work = _rates(plan, state), _work_left(plan, state)
    untimed = [p for p in PASSES if work[p] and rate[p] is None]
    left = sum(work[p] * (rate[p] or 0.0) for p in PASSES)
    if not untimed:
        return f"ETA {left:.0f} s"
    names = {"pgd": "PGD", "strong": "strong attack", "audit": "audit", "bisect": "bisection"}
    return f"ETA {left:.0f} s + {', '.join(names[p] for p in untimed)} (not timed yet)"


def _progress_line(plan: SweepPlan, state: SweepState, e: float, started: float) -> str:
    robust = float((state.correct & (state.break_radius > e)).double().mean())
    live = int((state.correct & (state.break_radius > e) & ~(state.certified_radius > e)).sum())
    elapsed = time.perf_counter() - started
    within = ""  # a line between batches also says how far the pass is
    if state.todo is not None:
        pass_name = plan.passes(state.radius_index)[state.pass_index]
        within = f"{pass_name} attack on {state.done} of {len(state.todo)} points done, "
    return (
        f"eps {e:.4f} ({state.radius_index + 1}/{len(plan.radii)}): {within}{live} points neither "
        f"broken nor certified, robust {robust:.4f}, elapsed {elapsed:.0f} s, {_eta(plan, state)}"
    )


def position(plan: SweepPlan, state: SweepState) -> str:
    """Where a (saved) sweep stands, for the line of a resumed job: ``at radius 7 of 43 (eps
    0.1412)`` (``, strong attack on 80 of 105 points done`` within a pass), ``in bisection round
    2 (30 of 120 points attacked)``, or ``sweep and bisection finished``."""
    k = state.radius_index
    if k < len(plan.radii):
        where = f"at radius {k + 1} of {len(plan.radii)} (eps {float(plan.radii[k]):.4f})"
        if state.todo is None:
            return where
        pass_name = plan.passes(k)[state.pass_index]
        return f"{where}, {pass_name} attack on {state.done} of {len(state.todo)} points done"
    if state.todo is not None:
        return f"in bisection round {state.round + 1} ({state.done} of {len(state.todo)} points attacked)"
    if state.lo is not None and state.hi is not None and bool((state.lo < state.hi).any()):
        return f"before bisection round {state.round + 1}"
    if state.lo is None and len(plan.bisect_radii) and plan.bisect_attack is not None:
        return "after the sweep, before its bisection"
    return "sweep and bisection finished"


def _sweep_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    plan: SweepPlan,
    state: SweepState,
    pass_name: str,
    name: str,
    log: Callable[[str], None],
    log_every_s: float,
) -> None:
    """Attack the pass's next batch at the current radius with the pass's attacks (the audit:
    both), record what they found (``_record``) and count it done. A batch is
    ``plan.batch_size`` points; in the audit a group of points with close certified radii
    (``_audit_group``), attacked at the smallest's (``audit_radius``: the attacks take one
    radius per call)."""
    assert state.todo is not None
    k, e, audit = state.radius_index, float(plan.radii[state.radius_index]), pass_name == "audit"
    # the batch's seed key: its index, or in the audit its first point's place in the sample
    b = state.done if audit else state.done // plan.batch_size
    idx = (
        _audit_group(plan, state)
        if audit
        else state.todo[state.done : state.done + plan.batch_size]
    )
    device = model_device(model)
    xb, yb = x[idx].to(device), y[idx].to(device).long()
    at = e
    if audit:
        at = audit_radius(float(state.certified_radius[idx[0]]), xb, plan.ball_rel_tol)
    attacks = [plan.pgd, plan.strong] if audit else [
        plan.strong if pass_name == "strong" else plan.pgd]  # fmt: skip
    t0 = time.perf_counter()
    what = (
        f"eps {e:.4f} ({k + 1}/{len(plan.radii)}), {pass_name} attack on points "
        f"{state.done + 1}-{state.done + len(idx)} of {len(state.todo)}"
        f"{f' at their smallest certified radius {at:.4f}' if audit else ''}"
        f"{_expected(state, pass_name, len(idx))}"
    )
    for attack in filter(None, attacks):
        seed = _batch_seed(plan.seed, k, pass_name, b)
        with _heartbeat(log, log_every_s, what):
            dist = _attack_batch(model, attack, xb, yb, at, seed, plan.ball_rel_tol)
        _record(state, pass_name, idx, dist, radius_key(e), name, log)
    if audit:
        state.audited[radius_key(e)] = state.audited.get(radius_key(e), 0) + len(idx)
        state.audited_points[idx] = True
    state.seconds[pass_name] += time.perf_counter() - t0
    state.points[pass_name] += len(idx)
    state.done += len(idx)


def sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    plan: SweepPlan,
    state: SweepState,
    name: str = "model",
    save: Callable[[SweepState], None] = lambda state: None,
    stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = print,
    log_every_s: float = 60.0,
) -> SweepState:
    """Sweep the radii of ``plan`` in increasing order, attacking each point only where it can
    change a number, and return the final state (``state.accuracies(eps)`` gives the curves).

    At radius ε the strong attack needs no point that is misclassified, certified (``r_cert >
    ε``: no attack can move it, so the audit alone attacks a sample of such points, each at its
    own certified radius) or already broken (an adversarial example found at ε' <= ε lies in the
    ε-ball too). The cheap attack (PGD) runs on every correct, uncertified point at every radius,
    broken or not, on purpose: its curve is then that of the attack run at each radius on its
    own (the paper's PGD curve). A found example at distance d (checked <= ε up to its rounding)
    sets the point's break radius to min(current, d), so it counts at every radius >= d. A break
    radius below the certified radius, or an audited certified point flipped, raises
    ``InvariantError``; a certified point misclassified at its clean input in an attack batch
    (rounding) is logged and counted not certified and broken at 0 instead.

    Resumable: ``save(state)`` is called after every batch; rerunning with the saved state
    attacks exactly the batches an uninterrupted run would (seeds per radius, pass and batch).
    ``stop()`` is polled before every batch: when true, the state is returned as it stands, with
    that batch not begun (``state.radius_index < len(plan.radii)``); after the last batch it is
    not polled, so a stop asked during it lets the sweep finish. One log line per radius (and
    after a batch when ``log_every_s`` passed since the last): radius, points left, robust
    accuracy so far, elapsed time, ETA; and while one attack call runs longer, a line every
    ``log_every_s`` naming it.
    """
    started, last_line = time.perf_counter(), time.perf_counter()
    with eval_mode(model):
        while state.radius_index < len(plan.radii):
            k, passes = state.radius_index, plan.passes(state.radius_index)
            e = float(plan.radii[k])
            while state.pass_index < len(passes):
                pass_name = passes[state.pass_index]
                if state.todo is None:
                    state.todo, state.done = _todo(plan, state, pass_name, e), 0
                    if pass_name == "pgd":  # its curve has a value here, even with nothing to do
                        state.pgd_broken[radius_key(e)] = torch.zeros_like(state.correct)
                while state.done < len(state.todo):
                    if stop():
                        return state
                    _sweep_batch(model, x, y, plan, state, pass_name, name, log, log_every_s)
                    save(state)
                    # a pass's end: the next pass's first batch, or the radius's line, says more
                    pass_ends = state.done == len(state.todo)
                    if time.perf_counter() - last_line > log_every_s and not pass_ends:
                        log(_progress_line(plan, state, e, started))
                        last_line = time.perf_counter()
                state.pass_index, state.todo, state.done = state.pass_index + 1, None, 0
            log(_progress_line(plan, state, e, started))
            last_line = time.perf_counter()
            state.radius_index, state.pass_index = k + 1, 0
            save(state)
    return state


@dataclass
class SearchModel:
    """The model the attacks of one evaluation search on: in ``precision`` ("float32", or
    "bfloat16" under autocast, ``robustness.Autocast``), its passes replayed from CUDA graphs
    with ``cuda_graphs`` on a CUDA model (``attack_graphs.GraphedModel``, batches up to
    ``graph_max_batch``: captured once per evaluation and shared by its attacks). The float32
    eager model stays the judge (``fast_search``). ``log`` gets the graphs' lines (off, or a
    bucket that does not fit)."""

    precision: str = "float32"
    cuda_graphs: bool = False
    graph_max_batch: int = 1024
    log: Callable[[str], None] = print
    _models: dict[int, tuple[nn.Module, nn.Module]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    GRAPH_TOL: ClassVar[dict[str, float]] = {"float32": 2e-2, "bfloat16": 5e-2}
    """How far a capture's logits and input gradient may be from the eager pass's, relative to
    their largest magnitude: far above rounding (TF32, bf16; other batch sizes may take other
    kernels), far below what a wrong graph or a model mixing samples gives."""

    def __call__(self, model: nn.Module) -> nn.Module:
        """The search model of ``model`` (the same object for every call on one model; the model
        itself where there is nothing to change: float32, and no graphs or no CUDA)."""
        entry = self._models.get(id(model))
        if entry is None:
            search = model
            graphs = self.cuda_graphs and model_device(model).type == "cuda"
            if self.precision != "float32":
                dtype = getattr(torch, self.precision)
                search = Autocast(model, dtype, cache=not graphs)  # no weight cache in a capture
                search.training = False  # its own flag alone (means nothing); not the model's
            if graphs:
                tol = self.GRAPH_TOL[self.precision]
                search = GraphedModel(search, self.graph_max_batch, tol, log=self.log)
            entry = self._models[id(model)] = (model, search)  # holds model: no id reuse
        return entry[1]

    def summary(self) -> str | None:
        """One line per graphed model (captures, replays, eager passes), for the job's log."""
        lines = [s.summary() for _, s in self._models.values() if isinstance(s, GraphedModel)]
        return "; ".join(lines) or None

    def release(self) -> None:
        """Drop the graphs and their memory (after the sweep: the rest of the job needs none)."""
        for _, search in self._models.values():
            if isinstance(search, GraphedModel):
                search.release()


def fast_search(attack: SeededAttack, search: SearchModel) -> SeededAttack:
    """``attack`` searching on ``search(model)`` (low precision, CUDA graphs, or the model
    itself in the device's float32: TF32 convolutions on a GPU), with the float32 eager model,
    at full precision, the judge.

    A faster search is not a looser count: the sweep counts only examples that fool the float32
    eager model (``_attack_batch``). Where the search's arithmetic is fooled but the judge is
    not (a point that bf16 or TF32 rounding misclassifies already, or an example on the
    boundary, as FAB's are: AutoAttack stops attacking a point it believes fooled, and the
    point then counted as surviving, which also lifted the bisection's lower bound), the attack
    runs again on those points on the float32 eager model at full precision, with the same seed
    (its random draws then differ from a float32 run of the whole batch). Two extra forward
    passes per call find them. The search can still be weaker than float32's:
    ``stablenets.bench.evaluation --precision`` (``--cuda-graphs``) measures it.
    """

    def run(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int = 0) -> Tensor:
        low = search(model)
        x_adv = attack(low, x, y, eps, seed=seed)
        with eval_mode(model), torch.no_grad():
            device = model_device(model)
            xa, yd = x_adv.to(device), y.to(device)
            seen = low(xa).argmax(dim=1) != yd  # as the search's own arithmetic saw it
            doubtful = seen & (predict(model, xa) == yd)
        idx = torch.nonzero(doubtful).squeeze(1).to(x.device)
        if idx.numel():
            with full_float32():
                x_adv[idx] = attack(model, x[idx], y[idx], eps, seed=seed).to(x_adv.device)
        return x_adv

    return run


def strong_attack(cfg: dict[str, Any], batch_size: int) -> SeededAttack:
    """The strongest attack of an evaluation config (``classification.evaluate.strong``):
    AutoAttack (``version``, ``attacks``, ``iterations``) or a PGD with more steps and restarts."""
    if cfg["method"] == "autoattack":
        return functools.partial(
            autoattack_l2,
            batch_size=batch_size,
            version=cfg["version"],
            attacks=cfg.get("attacks"),
            iterations=cfg.get("iterations"),
        )
    return functools.partial(
        pgd_l2, steps=cfg["steps"], rel_step=cfg["rel_step"], restarts=cfg["restarts"]
    )


def grid_attack(cfg: dict[str, Any], batch_size: int) -> SeededAttack:
    """The attack of the grid bisection: AutoAttack with ``grid_attacks`` (``version`` custom,
    the same ``iterations``) where given, else the strong attack (``strong_attack``)."""
    if cfg.get("grid_attacks") is None:
        return strong_attack(cfg, batch_size)
    return strong_attack({**cfg, "version": "custom", "attacks": cfg["grid_attacks"]}, batch_size)


def runs_grid_attacks(strong: dict[str, Any]) -> bool:
    """Whether an evaluation runs ``strong.grid_attacks``: given, with method ``autoattack``, and
    the grid is bisected; elsewhere they are ignored, as ``steps`` is with AutoAttack (a user
    switching ``method`` to ``pgd`` need not also clear them)."""
    return (
        strong.get("grid_attacks") is not None
        and strong["method"] == "autoattack"
        and strong["on_grid"]
        and strong["grid_search"] == "bisect"
    )


def check_settings(ev: dict[str, Any]) -> None:
    """Raise ``ValueError`` on evaluation settings (``classification.evaluate``) that would fail
    the job after training: each attack is called on no points at radius 0, which runs its own
    option checks and nothing else, and the radius grid must increase (its AUC needs that)."""
    if not ev["eps"]["start"] < ev["eps"]["stop"]:  # one radius: no curve, an AUC of 0
        raise ValueError(f"eps: start {ev['eps']['start']} must be below stop {ev['eps']['stop']}")
    strong = ev["strong"]
    for key, attack in (
        ("pgd", functools.partial(pgd_l2, **ev["pgd"])),
        ("strong", strong_attack(strong, ev["batch_size"])),
        ("strong.grid_attacks", grid_attack(strong, ev["batch_size"])),
    ):
        try:
            attack(nn.Identity(), torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), 0.0, seed=0)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None


def strong_label(cfg: dict[str, Any], precision: str = "float32") -> str:
    """What the strongest attack was, for tables: ``autoattack standard``, ``autoattack apgd-ce
    (10 iterations)``, ``pgd (100 steps x 5)``; ``...; grid: apgd-ce, apgd-t`` when the grid
    bisection ran other attacks (``grid_attacks``); ``..., bfloat16 search`` when it ran in low
    precision (``fast_search``)."""
    if cfg["method"] == "pgd":
        label = f"pgd ({cfg['steps']} steps x {cfg['restarts']})"
    else:
        label = "autoattack " + (
            ", ".join(cfg["attacks"]) if cfg["version"] == "custom" else "standard"
        )
        label += f" ({cfg['iterations']} iterations)" if cfg.get("iterations") else ""
    if runs_grid_attacks(cfg):
        label += f"; grid: {', '.join(cfg['grid_attacks'])}"
    return label if precision == "float32" else f"{label}, {precision} search"


def _bisection_bounds(plan: SweepPlan, state: SweepState) -> tuple[Tensor, Tensor]:
    """Per point, the grid indices ``[lo, hi)`` where its first broken radius may lie: below
    ``lo`` it is certified or the strong attack failed at a radius at least as large (the
    bisection's assumption), from ``hi`` on it is broken already."""
    grid = torch.as_tensor(plan.bisect_radii)[None, :]
    lo = (state.certified_radius[:, None] > grid).sum(dim=1)
    if state.strong_survived is not None:
        lo = torch.maximum(lo, (state.strong_survived[:, None] >= grid).sum(dim=1))
    hi = (state.break_radius[:, None] > grid).sum(dim=1)
    return torch.minimum(lo, hi), hi


def _next_group(plan: SweepPlan, state: SweepState) -> Tensor:
    """The next batch of the round: points that share one midpoint radius, in radius order."""
    assert state.todo is not None and state.lo is not None and state.hi is not None
    rest = state.todo[state.done : state.done + plan.batch_size]
    mid = (state.lo[rest] + state.hi[rest]) // 2
    return rest[mid == mid[0]]


def bisect(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    plan: SweepPlan,
    state: SweepState,
    name: str = "model",
    save: Callable[[SweepState], None] = lambda state: None,
    stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = print,
    log_every_s: float = 60.0,
) -> SweepState:
    """The strong attack on ``plan.bisect_radii`` by bisection between each point's bounds.

    After ``sweep``, a point's first broken grid radius lies in ``[lo, hi)``: below ``lo`` it is
    certified or the strong attack failed at a larger radius, from ``hi`` on an attack broke it.
    Each round attacks every point at the midpoint
    of its interval: fooled there, ``hi`` drops to the first radius >= the example's distance (a
    real example, counted at every larger radius); not fooled, ``lo = mid + 1``, assuming (as a
    bisection must) that the attack would fail at smaller radii too. About ``log2(hi - lo)``
    attacks per point instead of one per radius; ``tests/test_robustness.py`` and
    ``stablenets.bench.evaluation`` measure the strength against attacking every radius. Resumable and
    polled like ``sweep``; one log line per round (points attacked and left, elapsed, ETA), one
    after a group when ``log_every_s`` passed since the last (round k has up to 2^(k-1) groups
    of short calls), and one every ``log_every_s`` while an attack call runs longer.
    """
    attack = plan.bisect_attack
    if len(plan.bisect_radii) == 0 or attack is None:
        return state
    if state.radius_index < len(plan.radii):  # its bounds would miss the sweep's later breaks
        raise ValueError(
            f"model {name!r}: bisect needs a finished sweep, this one stopped at radius "
            f"{state.radius_index + 1} of {len(plan.radii)}; resume it with sweep first"
        )
    device, started = model_device(model), time.perf_counter()
    last_line = started
    if state.lo is None:
        state.lo, state.hi = _bisection_bounds(plan, state)
    if state.hi is None:
        raise ValueError(f"model {name!r}: a sweep state with bisection lower bounds but no upper")
    grid = torch.as_tensor(plan.bisect_radii)
    with eval_mode(model):
        while True:
            if state.todo is None:
                live = torch.nonzero(state.lo < state.hi).squeeze(1)
                if live.numel() == 0:
                    return state
                mid = (state.lo[live] + state.hi[live]) // 2
                state.todo, state.done = live[torch.argsort(mid, stable=True)], 0
            while state.done < len(state.todo):
                if stop():
                    return state
                idx = _next_group(plan, state)
                m = int((state.lo[idx[0]] + state.hi[idx[0]]) // 2)
                e = float(grid[m])
                xb, yb = x[idx].to(device), y[idx].to(device).long()
                t0 = time.perf_counter()
                seed = _batch_seed(plan.seed, state.round, "bisect", state.done)
                what = (
                    f"bisection round {state.round + 1}, eps {e:.4f}: points {state.done + 1}-"
                    f"{state.done + len(idx)} of {len(state.todo)}"
                    f"{_expected(state, 'bisect', len(idx))}"
                )
                with _heartbeat(log, log_every_s, what):
                    dist = _attack_batch(model, attack, xb, yb, e, seed, plan.ball_rel_tol)
                _record(state, "bisect", idx, dist, e, name, log)
                fooled = torch.isfinite(dist)
                first = torch.searchsorted(grid, dist[fooled].contiguous())
                state.hi[idx[fooled]] = torch.minimum(state.hi[idx[fooled]], first)
                state.lo[idx[~fooled]] = m + 1
                state.lo[idx] = torch.minimum(state.lo[idx], state.hi[idx])
                state.seconds["bisect"] += time.perf_counter() - t0
                state.points["bisect"] += len(idx)
                state.done += len(idx)
                save(state)
                if time.perf_counter() - last_line > log_every_s and state.done < len(state.todo):
                    log(_round_line(plan, state, started))
                    last_line = time.perf_counter()
            log(_round_line(plan, state, started))
            last_line = time.perf_counter()
            state.round, state.todo, state.done = state.round + 1, None, 0
            save(state)


def _round_line(plan: SweepPlan, state: SweepState, started: float) -> str:
    """``bisection round 2: 30 of 120 points attacked, 95 left, elapsed 40 s, ETA 300 s``:
    points left are those whose interval is not closed yet."""
    assert state.todo is not None and state.lo is not None and state.hi is not None
    left = int((state.lo < state.hi).sum())
    return (
        f"bisection round {state.round + 1}: {state.done} of {len(state.todo)} points attacked, "
        f"{left} left, elapsed {time.perf_counter() - started:.0f} s, {_eta(plan, state)}"
    )


def evaluation_radii(ev: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The radius grid ``linspace(start, stop, num)`` and the standard radii of an evaluation
    config, as the sweep attacks them (:func:`canonical_radii`)."""
    grid = np.linspace(ev["eps"]["start"], ev["eps"]["stop"], ev["eps"]["num"])
    return canonical_radii(grid), canonical_radii(ev["standard_eps"])
