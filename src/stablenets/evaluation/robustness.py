"""Adversarial robustness: L2 PGD, AutoAttack, Lipschitz certificates and their invariant.

Every function accepts any ``torch.nn.Module`` classifier that maps float32 images in [0, 1] of
shape (N, C, H, W) to logits of shape (N, K). Work runs on the model's device (that of its first
parameter or buffer, else the CPU) with the model temporarily in evaluation mode (its previous
train/eval flags are restored afterwards, so evaluation never updates training-time state such as
power-iteration vectors); results come back on the input's device. Randomness comes only from
explicitly seeded generators.

Three accuracies are measured on the same test points and must satisfy, at every radius ε,

    certified(ε) <= empirical(ε) <= clean,

because a certified point cannot be attacked and an attack only counts points that were correctly
classified to begin with. ``check_invariant`` enforces it: certified > empirical means the
Lipschitz bound used for the certificate is not an upper bound (or there is a bug).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # the pipeline extra; imported where AutoAttack runs (autoattack_l2)
    from pyautoattack import AutoAttack
    from pyautoattack.autoattack import AttackName

Attack = Callable[[nn.Module, Tensor, Tensor, float], Tensor]
"""``attack(model, x, y, eps) -> x_adv`` with ``||x_adv - x||_2 <= eps`` per sample."""

SQRT2 = math.sqrt(2.0)
_TINY = 1e-12  # guards divisions by a zero norm


class InvariantError(RuntimeError):
    """Raised when certified <= empirical <= clean fails at some radius."""


# --------------------------------------------------------------------------------------------
# helpers


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in evaluation mode, restoring each one's flag on exit."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def _flat_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm ``||t_i||_2`` over all but the first axis."""
    return t.flatten(1).norm(dim=1)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a (N,) vector to broadcast against ``like`` of shape (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(dim=1)


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Logits of all of ``x`` (computed batch by batch on the model's device), on the CPU."""
    device = model_device(model)
    with eval_mode(model):
        parts = [model(x[s].to(device)).cpu() for s in _batches(len(x), batch_size)]
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# clean accuracy and margins


def margins(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Logit margins and correctness, both (N,) on the CPU.

    ``margin_i = z_{y_i}(x_i) - max_{j != y_i} z_j(x_i)`` and ``correct_i = argmax_j z_j = y_i``.
    """
    logits = _logits(model, x, batch_size)
    labels = y.cpu().long()[:, None]
    true = logits.gather(1, labels).squeeze(1)
    other = logits.scatter(1, labels, float("-inf")).amax(dim=1)
    return true - other, logits.argmax(dim=1) == labels.squeeze(1)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Clean accuracy ``mean_i [argmax_j z_j(x_i) = y_i]``."""
    _, correct = margins(model, x, y, batch_size)
    return correct.double().mean().item()


# --------------------------------------------------------------------------------------------
# certificates


def _check_lipschitz(lipschitz: float) -> None:
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"lipschitz must be finite and > 0, got {lipschitz}")


def certified_radius(margins: Tensor, correct: Tensor, lipschitz: float) -> Tensor:
    """Certified L2 radius per sample (float64): ``margin / (sqrt(2) L)``, 0 if misclassified.

    Tsuzuku et al. (2018): if the logit map is L-Lipschitz in L2, each logit difference
    ``z_y - z_j`` is ``sqrt(2) L``-Lipschitz, so the prediction cannot change within that radius.
    ``lipschitz`` must be a certified *upper* bound of L.
    """
    _check_lipschitz(lipschitz)
    m = margins.detach().cpu().double()
    radius = m / (SQRT2 * lipschitz)
    return torch.where(correct.cpu() & (m > 0), radius, torch.zeros_like(radius))


def certified_accuracy(
    margins: Tensor, correct: Tensor, lipschitz: float, eps_grid: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Certified accuracy at each ε: ``mean_i [correct_i and margin_i > sqrt(2) L ε]``.

    ``lipschitz`` must be a certified upper bound of the L2 Lipschitz constant of the logit map
    (Tsuzuku et al. 2018); a lower estimate (e.g. a short power iteration) is unsound.
    """
    _check_lipschitz(lipschitz)
    m = margins.detach().cpu().double().numpy()
    ok = correct.detach().cpu().numpy().astype(bool)
    eps = np.asarray(eps_grid, dtype=np.float64)
    certified = ok[None, :] & (m[None, :] > SQRT2 * lipschitz * eps[:, None])
    return certified.mean(axis=1)


# --------------------------------------------------------------------------------------------
# L2 PGD


def uniform_l2_ball(shape: torch.Size, generator: torch.Generator) -> Tensor:
    """Samples uniform in the unit L2 ball of R^n, n = prod(shape[1:]), on the generator's device.

    The first n coordinates of a point uniform on the unit sphere of R^(n+2) are uniform in the
    unit ball of R^n (Voelker et al. 2017).
    """
    n = math.prod(shape[1:])
    g = torch.randn(shape[0], n + 2, generator=generator, device=generator.device)
    return (g / g.norm(dim=1, keepdim=True))[:, :n].reshape(shape)


def project_l2(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto {||x' - x||_2 <= eps} ∩ [0, 1]^n: shrink δ by min(1, ε/||δ||), then clip.

    Clipping to [0, 1] after the shrink keeps the ball constraint since x is in [0, 1]^n, so each
    |δ_i| can only decrease.
    """
    delta = x_adv - x
    factor = (eps / _flat_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta * _per_sample(factor, delta)).clamp(0.0, 1.0)


def _ce_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample gradient of the cross-entropy loss with respect to the input."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _pgd_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool,
    generator: torch.Generator,
) -> Tensor:
    """One PGD run: x_{k+1} = P(x_k + α g_k / ||g_k||_2), g_k = ∇_x CE(f(x_k), y)."""
    x_adv = x.clone()
    if random_start:
        noise = uniform_l2_ball(x.shape, generator).to(device=x.device, dtype=x.dtype)
        x_adv = (x + eps * noise).clamp(0.0, 1.0)
    for _ in range(steps):
        grad = _ce_gradient(model, x_adv, y)
        direction = grad / _per_sample(_flat_norm(grad).clamp_min(_TINY), grad)
        x_adv = project_l2(x_adv + step_size * direction, x, eps)
    return x_adv.detach()


def pgd_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 10,
    rel_step: float = 0.025,
    random_start: bool = True,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> Tensor:
    """L2 projected gradient ascent of the cross-entropy, as foolbox's ``L2PGD``.

    Each run starts at x (or uniformly at random in the ε-ball, then clipped to [0, 1]) and takes
    ``steps`` steps ``x <- P(x + α ∇CE / ||∇CE||_2)`` with α = rel_step · ε, where P projects onto
    the ε-ball around x and onto [0, 1]. Like foolbox it returns the last iterate of a run. With
    ``restarts > 1``, further runs (fresh random starts) are spent only on points no run has
    fooled yet, so a point keeps a misclassified example if any run found one. Points that are
    misclassified already are returned unchanged, so robust accuracy never exceeds clean
    accuracy. ``generator`` (CPU or the model's device) draws the random starts; when None a CPU
    generator seeded with ``seed`` is used. Returns x_adv on x's device with
    ``||x_adv - x||_2 <= eps`` per sample; ``eps = 0`` returns a copy of x.
    """
    _check_eps(eps)
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps} and {restarts}")
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 without random_start would repeat the same run")
    if eps == 0 or len(x) == 0:
        return x.clone()
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    device = model_device(model)
    x_dev, y_dev = x.to(device), y.to(device).long()
    best = x_dev.clone()
    with eval_mode(model):
        todo = torch.nonzero(_predict(model, x_dev) == y_dev).squeeze(1)
        for _ in range(restarts):
            if todo.numel() == 0:
                break
            x_sub, y_sub = x_dev[todo], y_dev[todo]
            adv = _pgd_run(model, x_sub, y_sub, eps, steps, rel_step * eps, random_start, gen)
            best[todo] = adv
            todo = todo[_predict(model, adv) == y_sub]
    return best.to(x.device)


# --------------------------------------------------------------------------------------------
# AutoAttack


def _limit_targets(adversary: AutoAttack, n_classes: int) -> None:
    """Use at most K - 1 target classes in APGD-T and FAB-T (AutoAttack assumes K >= 10)."""
    adversary.apgd_targeted.n_target_classes = min(
        adversary.apgd_targeted.n_target_classes, n_classes - 1
    )
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, n_classes - 1)


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Restore the global RNG state afterwards (AutoAttack reseeds the global generators)."""
    if device.type != "cuda":
        devices = []
    else:
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        yield


def autoattack_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    batch_size: int = 250,
    version: Literal["standard", "plus", "rand", "custom"] = "standard",
    seed: int = 0,
    attacks: Sequence[AttackName] | None = None,
    iterations: int | None = None,
) -> Tensor:
    """Adversarial examples from AutoAttack (Croce & Hein 2020) in L2 at radius ε.

    Returns x_adv on x's device (the same contract as ``pgd_l2``, so it can serve as the
    ``attack`` of ``robust_accuracy_curve``): points AutoAttack fooled carry their adversarial
    example, all others are returned unchanged; robust flags are ``argmax f(x_adv) == y``.
    ``version="standard"`` runs APGD-CE, APGD-T, FAB-T and Square; ``version="custom"`` runs
    ``attacks`` (e.g. ``["apgd-ce", "apgd-t"]``). ``iterations`` replaces the 100 iterations of
    every APGD and FAB run (a cheaper, weaker attack for smoke runs; Square's queries are kept).
    Runs on the model's device, silently, with
    ``seed``; the caller's global RNG state is left untouched. Progress output is off; the
    sanity-check warnings of AutoAttack (logger ``auto-attack``) still surface. Constraints of
    pyautoattack 0.2.0: float32 inputs; APGD-T and DLR losses need K >= 4 classes (with K < 10
    the targeted attacks use K - 1 targets); Square (standard) needs images of at least 5x5.
    """
    _check_eps(eps)
    if (version == "custom") != (attacks is not None):
        raise ValueError("give attacks exactly when version='custom'")
    if eps == 0 or len(x) == 0:
        return x.clone()
    from pyautoattack import AutoAttack  # the pipeline extra: the library runs without it

    device = model_device(model)
    with eval_mode(model), _forked_rng(device):
        n_classes = _logits(model, x[:1], 1).shape[1]
        adversary = AutoAttack(
            model,
            norm="L2",
            eps=eps,
            version=version,
            device=device,
            seed=seed,
            attacks=None if attacks is None else list(attacks),
        )
        adversary.verbose = False
        _limit_targets(adversary, n_classes)
        if iterations is not None:
            for attack in (adversary.apgd, adversary.apgd_targeted, adversary.fab):
                attack.n_iter = int(iterations)
        x_adv, _ = adversary.run_standard_evaluation(x, y.long(), batch_size=batch_size)
    return x_adv.to(x.device)


# --------------------------------------------------------------------------------------------
# curves and the invariant


def _check_in_ball(x_adv: Tensor, x: Tensor, eps: float, radius_tol: float) -> None:
    dist = _flat_norm(x_adv.double() - x.double())
    if dist.numel() and dist.max().item() > eps + radius_tol:
        raise ValueError(f"attack left the eps={eps} ball: distance {dist.max().item():.6g}")
    if x_adv.numel() and (x_adv.min().item() < 0 or x_adv.max().item() > 1):
        raise ValueError("attack left the image range [0, 1]")


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    attack: Attack,
    batch_size: int,
    radius_tol: float = 1e-5,
) -> float:
    """Empirical robust accuracy ``mean_i [f(x_i) = y_i and f(attack(x_i)) = y_i]``.

    Each batch's adversarial examples are checked to lie in the ε-ball (up to ``radius_tol``) and
    in [0, 1], so that a faulty attack cannot report a falsely low robust accuracy.
    """
    _check_eps(eps)
    device = model_device(model)
    robust = 0
    with eval_mode(model):
        for s in _batches(len(x), batch_size):
            xb, yb = x[s].to(device), y[s].to(device).long()
            x_adv = attack(model, xb, yb, eps).to(device)
            _check_in_ball(x_adv, xb, eps, radius_tol)
            ok = (_predict(model, xb) == yb) & (_predict(model, x_adv) == yb)
            robust += int(ok.sum().item())
    return robust / len(x)


def robust_accuracy_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_grid: Sequence[float] | np.ndarray,
    attack: Attack,
    batch_size: int,
) -> np.ndarray:
    """Robust accuracy under ``attack`` at each ε of ``eps_grid`` (see ``robust_accuracy``).

    ``attack(model, x, y, eps) -> x_adv``; bind other options with ``functools.partial``, e.g.
    ``partial(pgd_l2, steps=10, rel_step=0.025)`` or ``partial(autoattack_l2, batch_size=500)``.
    """
    eps_values = np.asarray(eps_grid, dtype=np.float64)
    return np.array(
        [robust_accuracy(model, x, y, float(e), attack, batch_size) for e in eps_values]
    )


def auc(eps_grid: Sequence[float] | np.ndarray, acc: Sequence[float] | np.ndarray) -> float:
    """Area under the curve (trapezoid rule): ``Σ_k (ε_{k+1} - ε_k)(a_k + a_{k+1}) / 2``."""
    eps = np.asarray(eps_grid, dtype=np.float64)
    values = np.asarray(acc, dtype=np.float64)
    if eps.shape != values.shape or eps.ndim != 1:
        raise ValueError(f"eps_grid and acc must be 1-D of one length: {eps.shape}, {values.shape}")
    if np.any(np.diff(eps) < 0):
        raise ValueError("eps_grid must be non-decreasing")
    return float(np.trapezoid(values, eps))


def _violations(
    eps: np.ndarray, cert: np.ndarray, emp: np.ndarray, clean: np.ndarray, atol: float
) -> list[str]:
    found = []
    for e, c, m, k in zip(eps, cert, emp, clean, strict=True):
        if not np.all(np.isfinite([c, m, k])):
            found.append(
                f"eps={e:.6g}: non-finite accuracy (certified {c}, empirical {m}, clean {k})"
            )
        elif c > m + atol:
            found.append(
                f"eps={e:.6g}: certified accuracy {c:.6g} > empirical robust accuracy {m:.6g}"
                " (unsound certificate: the Lipschitz bound is too small, or a bug)"
            )
        elif m > k + atol:
            found.append(
                f"eps={e:.6g}: empirical robust accuracy {m:.6g} > clean accuracy {k:.6g}"
                " (the attack evaluation counts points that are misclassified when clean)"
            )
    return found


def check_invariant(
    eps_grid: Sequence[float] | np.ndarray,
    certified: Sequence[float] | np.ndarray,
    empirical: Sequence[float] | np.ndarray,
    clean: float | Sequence[float] | np.ndarray,
    model_name: str,
    atol: float = 0.0,
) -> None:
    """Check ``certified(ε) <= empirical(ε) <= clean`` (within ``atol``) at every ε.

    All three must be measured on the same test points. ``clean`` is a scalar or one value per ε.
    Raises ``InvariantError`` naming the model, the first offending ε and its numbers.
    """
    eps = np.asarray(eps_grid, dtype=np.float64)
    cert = np.asarray(certified, dtype=np.float64)
    emp = np.asarray(empirical, dtype=np.float64)
    if not (eps.ndim == 1 and cert.shape == eps.shape and emp.shape == eps.shape):
        raise ValueError(f"shapes differ: eps {eps.shape}, certified {cert.shape}, {emp.shape}")
    cl = np.broadcast_to(np.asarray(clean, dtype=np.float64), eps.shape)
    found = _violations(eps, cert, emp, cl, atol)
    if found:
        more = f" (and {len(found) - 1} more eps)" if len(found) > 1 else ""
        raise InvariantError(
            f"model {model_name!r}: certified <= empirical <= clean violated at {found[0]}{more}"
        )


def lipschitz_lower_bound(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    steps: int = 50,
    lr: float = 1e-2,
    delta_scale: float = 1e-2,
    seed: int = 0,
) -> float:
    """Empirical lower bound of the L2 Lipschitz constant of ``f`` near the inputs ``x``.

    Gradient ascent (Adam) on ``||f(x') - f(x' + d)|| / ||d||`` per sample over both the base
    point ``x'`` (started at ``x``) and the offset ``d`` (started at random, ``||d|| =
    delta_scale ||x||``); returns the largest ratio seen. Any value is a true lower bound, so it
    must never exceed a certified upper bound.
    """
    g = torch.Generator(device=x.device).manual_seed(seed)
    base = x.detach().clone().requires_grad_(True)
    d = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    d = d * (delta_scale * _flat_norm(x) / _flat_norm(d).clamp_min(_TINY))[:, None, None, None]
    d.requires_grad_(True)
    opt = torch.optim.Adam([base, d], lr=lr)
    best = 0.0
    for _ in range(steps + 1):
        ratio = _flat_norm(f(base) - f(base + d)) / _flat_norm(d).clamp_min(_TINY)
        best = max(best, float(ratio.detach().max()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


# --------------------------------------------------------------------------------------------
# the radius sweep: each point attacked only where it can change a number

SeededAttack = Callable[..., Tensor]
"""``attack(model, x, y, eps, seed=s) -> x_adv`` (``pgd_l2`` and ``autoattack_l2`` with their other
options bound), with ``||x_adv - x||_2 <= eps`` per sample; ``seed`` makes each batch reproducible."""

PASSES = ("pgd", "strong", "audit", "bisect")
"""What a sweep runs at each radius, in order: the cheap attack on every point it has not broken
yet, the strong attack on every point no attack has broken yet, and the certificate audit; then
the strong attack's bisection over ``SweepPlan.bisect_radii``."""


@dataclass
class SweepPlan:
    """What to run: the radii (any order; swept increasing), the attacks and the audit.

    ``strong_radii`` are the radii at which the strong attack runs (the standard radii, or every
    radius); ``audit_radii`` those at which ``audit_size`` certified points (a fixed, seeded
    sample) are attacked by both attacks: a certified point flipped proves the certificate wrong.
    ``bisect_radii`` are the radii the strong attack covers by bisection afterwards (``bisect``).
    """

    radii: np.ndarray
    pgd: SeededAttack
    strong: SeededAttack | None
    strong_radii: frozenset[float]
    audit_radii: frozenset[float]
    audit_size: int
    batch_size: int
    seed: int = 0
    radius_tol: float = 1e-5
    bisect_radii: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self.radii = np.unique(np.round(np.asarray(self.radii, dtype=np.float64), 12))
        for e in self.radii:
            _check_eps(float(e))
        self.strong_radii = frozenset(round(float(e), 12) for e in self.strong_radii)
        self.audit_radii = frozenset(round(float(e), 12) for e in self.audit_radii)
        self.bisect_radii = np.unique(np.round(np.asarray(self.bisect_radii, np.float64), 12))

    @classmethod
    def from_config(cls, ev: dict[str, Any], seed: int) -> SweepPlan:
        """The plan of an evaluation config (``classification.evaluate``): PGD at every radius,
        the strong attack at the standard radii and over the grid (``on_grid``, by bisection or
        sweep, ``grid_search``), the audit of ``audit_certified`` points at the standard radii."""
        eps, std_eps = evaluation_radii(ev)
        strong = ev["strong"]
        sweep_grid = strong["on_grid"] and strong["grid_search"] == "sweep"
        return cls(
            radii=np.concatenate([eps, std_eps]),
            pgd=functools.partial(pgd_l2, **ev["pgd"]),
            strong=strong_attack(strong, ev["batch_size"]),
            strong_radii=frozenset(std_eps) | (frozenset(eps) if sweep_grid else frozenset()),
            audit_radii=frozenset(std_eps),
            audit_size=ev["audit_certified"],
            batch_size=ev["batch_size"],
            seed=seed,
            bisect_radii=eps if strong["on_grid"] and not sweep_grid else np.zeros(0),
        )

    def passes(self, k: int) -> list[str]:
        """The passes run at ``radii[k]`` (none at radius 0: nothing can move a point there)."""
        e = round(float(self.radii[k]), 12)
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
    same for the cheap attack alone) shrink as the sweep goes. ``todo`` holds the points of the
    current pass, fixed when the pass starts, and ``done`` how many of them were attacked, so a
    resumed sweep attacks exactly the batches an uninterrupted one would.
    """

    correct: Tensor
    certified_radius: Tensor
    break_radius: Tensor
    pgd_break_radius: Tensor
    audit_order: Tensor
    radius_index: int = 0
    pass_index: int = 0
    todo: Tensor | None = None
    done: int = 0
    audited: dict[float, int] = field(default_factory=dict)
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
        return cls(correct, certified_radius.detach().cpu().double(), unbroken, unbroken.clone(),
                   order)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def accuracies(self, eps: Sequence[float] | np.ndarray) -> dict[str, np.ndarray]:
        """Certified, PGD and empirical (every attack) robust accuracy at each ``eps``:
        ``mean_i [correct_i and r_i > eps]`` with ``r`` the certified, PGD-break and break radius.
        Exact at the swept radii (monotone: a point broken at ε is broken at every larger one)."""
        e = torch.as_tensor(np.asarray(eps, dtype=np.float64))[:, None]
        radii = {"certified": self.certified_radius, "pgd": self.pgd_break_radius,
                 "empirical": self.break_radius}  # fmt: skip
        return {
            name: (self.correct[None, :] & (r[None, :] > e)).double().mean(dim=1).numpy()
            for name, r in radii.items()
        }


def _batch_seed(seed: int, k: int, pass_name: str, b: int) -> int:
    """An independent seed per (radius, pass, batch): the same batches get the same draws on
    resume."""
    words = [seed, k, PASSES.index(pass_name), b]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _todo(plan: SweepPlan, state: SweepState, pass_name: str, e: float) -> Tensor:
    live = state.correct & ~(state.certified_radius > e)
    if pass_name == "pgd":
        return torch.nonzero(live & (state.pgd_break_radius > e)).squeeze(1)
    if pass_name == "strong":
        return torch.nonzero(live & (state.break_radius > e)).squeeze(1)
    order = state.audit_order
    certified = state.correct[order] & (state.certified_radius[order] > e)
    return order[certified][: plan.audit_size]


def _attack_batch(
    model: nn.Module,
    attack: SeededAttack,
    x: Tensor,
    y: Tensor,
    e: float,
    seed: int,
    radius_tol: float,
) -> Tensor:
    """Distances of the adversarial examples ``attack`` found (inf where it found none); every
    example is checked to lie in the ε-ball and in [0, 1] first."""
    x_adv = attack(model, x, y, e, seed=seed).to(x.device)
    _check_in_ball(x_adv, x, e, radius_tol)
    fooled = _predict(model, x_adv) != y
    dist = _flat_norm(x_adv.double() - x.double()).clamp(max=e)
    return torch.where(fooled, dist, torch.full_like(dist, math.inf)).cpu()


def _record(
    state: SweepState, pass_name: str, idx: Tensor, dist: Tensor, e: float, name: str
) -> None:
    if pass_name == "audit":
        flipped = torch.isfinite(dist)
        if flipped.any():
            raise InvariantError(
                f"model {name!r}: {int(flipped.sum())} of {len(idx)} audited points certified at "
                f"eps={e:.4g} were flipped by an attack: the Lipschitz certificate is unsound"
            )
        return
    state.break_radius[idx] = torch.minimum(state.break_radius[idx], dist)
    if pass_name == "strong":  # the bisection's lower bounds (fixed before it starts)
        survived = idx[~torch.isfinite(dist)]
        if state.strong_survived is None:
            state.strong_survived = torch.zeros_like(state.break_radius)
        state.strong_survived[survived] = state.strong_survived[survived].clamp(min=e)
    if pass_name == "pgd":
        state.pgd_break_radius[idx] = torch.minimum(state.pgd_break_radius[idx], dist)
    unsound = state.break_radius[idx] < state.certified_radius[idx]
    if unsound.any():
        i = int(idx[unsound][0])
        raise InvariantError(
            f"model {name!r}: point {i} has an adversarial example at distance "
            f"{float(state.break_radius[i]):.6g} inside its certified radius "
            f"{float(state.certified_radius[i]):.6g}: the Lipschitz certificate is unsound"
        )


def _eta_s(plan: SweepPlan, state: SweepState) -> float:
    """Seconds left if every sweep pass still to run attacks every point that is live now, at
    the seconds per point measured so far. A rough guide: a pass not yet measured counts as free
    and the bisection after the sweep is left out (its rounds get their own log lines)."""
    rate = {p: state.seconds[p] / state.points[p] if state.points[p] else 0.0 for p in PASSES}
    left = 0.0
    if state.todo is not None:
        left += (len(state.todo) - state.done) * rate[plan.passes(state.radius_index)[
            state.pass_index]]  # fmt: skip
    for k in range(state.radius_index, len(plan.radii)):
        e = float(plan.radii[k])
        first = state.pass_index + (state.todo is not None) if k == state.radius_index else 0
        for p in plan.passes(k)[first:]:
            left += len(_todo(plan, state, p, e)) * rate[p]
    return left


def _progress_line(plan: SweepPlan, state: SweepState, e: float, started: float) -> str:
    robust = state.accuracies([e])["empirical"][0]
    live = int((state.correct & (state.break_radius > e) & ~(state.certified_radius > e)).sum())
    elapsed = time.perf_counter() - started
    return (
        f"eps {e:.4f} ({state.radius_index + 1}/{len(plan.radii)}): {live} points left to attack, "
        f"robust {robust:.4f}, elapsed {elapsed:.0f} s, ETA {_eta_s(plan, state):.0f} s"
    )


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

    At radius ε a point needs no attack when it is misclassified, certified (``r_cert > ε``: no
    attack can move it, so the audit alone attacks a sample of such points) or already broken
    (an adversarial example found at ε' <= ε lies in the ε-ball too). The cheap attack runs on
    every point it has not broken, so its own curve stays that of the attack; the strong attack
    runs on what no attack has broken. A found example at distance d (checked <= ε) sets the
    point's break radius to min(current, d), so it counts at every radius >= d. A break radius
    below the certified radius, or an audited certified point flipped, raises ``InvariantError``.

    Resumable: ``save(state)`` is called after every batch; rerunning with the saved state
    attacks exactly the batches an uninterrupted run would (seeds per radius, pass and batch).
    ``stop()`` is polled after every batch: when true, the state is saved and returned early
    (``state.radius_index < len(plan.radii)``). One log line per radius (and per ``log_every_s``
    within one): radius, points left, robust accuracy so far, elapsed time, ETA.
    """
    device = model_device(model)
    started, last_line = time.perf_counter(), time.perf_counter()
    with eval_mode(model):
        while state.radius_index < len(plan.radii):
            k, passes = state.radius_index, plan.passes(state.radius_index)
            e = float(plan.radii[k])
            while state.pass_index < len(passes):
                pass_name = passes[state.pass_index]
                if state.todo is None:
                    state.todo, state.done = _todo(plan, state, pass_name, e), 0
                attacks = [plan.pgd, plan.strong] if pass_name == "audit" else [
                    plan.strong if pass_name == "strong" else plan.pgd]  # fmt: skip
                while state.done < len(state.todo):
                    b = state.done // plan.batch_size
                    idx = state.todo[state.done : state.done + plan.batch_size]
                    xb, yb = x[idx].to(device), y[idx].to(device).long()
                    t0 = time.perf_counter()
                    for attack in filter(None, attacks):
                        seed = _batch_seed(plan.seed, k, pass_name, b)
                        dist = _attack_batch(model, attack, xb, yb, e, seed, plan.radius_tol)
                        _record(state, pass_name, idx, dist, round(e, 12), name)
                    if pass_name == "audit":
                        state.audited[round(e, 12)] = state.audited.get(round(e, 12), 0) + len(idx)
                    state.seconds[pass_name] += time.perf_counter() - t0
                    state.points[pass_name] += len(idx)
                    state.done += len(idx)
                    save(state)
                    if time.perf_counter() - last_line > log_every_s:
                        log(_progress_line(plan, state, e, started))
                        last_line = time.perf_counter()
                    if stop():
                        return state
                state.pass_index, state.todo, state.done = state.pass_index + 1, None, 0
            log(_progress_line(plan, state, e, started))
            last_line = time.perf_counter()
            state.radius_index, state.pass_index = k + 1, 0
            save(state)
            if stop():
                return state
    return state


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


def strong_label(cfg: dict[str, Any]) -> str:
    """What the strongest attack was, for tables: ``autoattack standard``, ``autoattack apgd-ce
    (10 iterations)``, ``pgd (100 steps x 5)``."""
    if cfg["method"] == "pgd":
        return f"pgd ({cfg['steps']} steps x {cfg['restarts']})"
    label = "autoattack " + (
        ", ".join(cfg["attacks"]) if cfg["version"] == "custom" else "standard"
    )
    return label + (f" ({cfg['iterations']} iterations)" if cfg.get("iterations") else "")


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
    polled like ``sweep``; one log line per round.
    """
    if len(plan.bisect_radii) == 0 or plan.strong is None:
        return state
    device, started = model_device(model), time.perf_counter()
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
                idx = _next_group(plan, state)
                m = int((state.lo[idx[0]] + state.hi[idx[0]]) // 2)
                e = float(grid[m])
                xb, yb = x[idx].to(device), y[idx].to(device).long()
                t0 = time.perf_counter()
                seed = _batch_seed(plan.seed, state.round, "bisect", state.done)
                dist = _attack_batch(model, plan.strong, xb, yb, e, seed, plan.radius_tol)
                _record(state, "bisect", idx, dist, e, name)
                fooled = torch.isfinite(dist)
                first = torch.searchsorted(grid, dist[fooled].contiguous())
                state.hi[idx[fooled]] = torch.minimum(state.hi[idx[fooled]], first)
                state.lo[idx[~fooled]] = m + 1
                state.lo[idx] = torch.minimum(state.lo[idx], state.hi[idx])
                state.seconds["bisect"] += time.perf_counter() - t0
                state.points["bisect"] += len(idx)
                state.done += len(idx)
                save(state)
                if stop():
                    return state
            left = int((state.lo < state.hi).sum())
            log(
                f"bisection round {state.round + 1}: {len(state.todo)} points attacked, {left} "
                f"left, elapsed {time.perf_counter() - started:.0f} s"
            )
            state.round, state.todo, state.done = state.round + 1, None, 0
            save(state)


def evaluation_radii(ev: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The radius grid ``linspace(start, stop, num)`` and the standard radii of an evaluation
    config."""
    grid = np.linspace(ev["eps"]["start"], ev["eps"]["stop"], ev["eps"]["num"])
    return grid, np.asarray(ev["standard_eps"], dtype=np.float64)
