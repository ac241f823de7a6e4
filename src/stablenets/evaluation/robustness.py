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

import contextlib
import copy
import itertools
import math
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablenets.errors import InvariantError
from stablenets.evaluation.metrics import per_image
from stablenets.interrupt import Interrupted, StopFlag
from stablenets.nn.operators import full_float32, pinned_weights
from stablenets.progress import timing

if TYPE_CHECKING:  # the pipeline extra; imported where AutoAttack runs (autoattack_l2)
    from pyautoattack import AutoAttack
    from pyautoattack.autoattack import AttackName

Attack = Callable[[nn.Module, Tensor, Tensor, float], Tensor]
"""``attack(model, x, y, eps) -> x_adv`` with ``||x_adv - x||_2 <= eps`` per sample."""

SQRT2 = math.sqrt(2.0)
_TINY = 1e-12  # guards divisions by a zero norm


# --------------------------------------------------------------------------------------------
# helpers


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module, pin: bool = True) -> Iterator[nn.Module]:
    """Put every submodule in evaluation mode with its weights pinned (``pinned_weights``: no
    weight hashing, so no device synchronisation, per forward pass; ``pin=False`` only to measure
    what that saves), restoring each one's flag on exit."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with pinned_weights(model) if pin else contextlib.nullcontext():
            yield model
    finally:
        for module, flag in flags:
            module.training = flag


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def check_eps(eps: float) -> None:
    """A radius must be finite and non-negative (one clear error otherwise)."""
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def flat_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm ``||t_i||_2`` over all but the first axis."""
    return t.flatten(1).norm(dim=1)


class Autocast(nn.Module):
    """``model`` run under autocast in ``dtype`` (bf16), its logits returned in float32: what an
    attack differentiates when it runs in low precision (``classification.evaluate.precision``).
    The norm estimates that set the blocks' step sizes stay in float32 (``autocast_off``), so the
    network is the same function up to the rounding of its autocast ops (convolutions, linear
    layers); every example counted is checked with the float32 model
    (``radius_sweep.fast_search``). ``cache=False`` casts the weights at every use instead of
    once per pass, as a CUDA graph capture needs (``attack_graphs``)."""

    def __init__(
        self, model: nn.Module, dtype: torch.dtype = torch.bfloat16, cache: bool = True
    ) -> None:
        super().__init__()
        self.model, self.dtype, self.cache = model, dtype, cache

    def forward(self, x: Tensor) -> Tensor:
        device = model_device(self.model).type
        with torch.autocast(device, self.dtype, cache_enabled=self.cache):
            return self.model(x).float()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """The predicted class of each sample (argmax of the logits), in ``full_float32`` and
    evaluation mode (as every function here; its flags restored after)."""
    with eval_mode(model), full_float32():
        return model(x).argmax(dim=1)


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Logits of all of ``x`` (computed batch by batch on the model's device, in
    ``full_float32``), on the CPU."""
    device = model_device(model)
    with eval_mode(model), full_float32():
        parts = [model(x[s].to(device)).cpu() for s in _batches(len(x), batch_size)]
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# clean accuracy and margins


MARGIN_ROUNDING = 256
"""How many float32 units in the last place of a point's largest logit its margin may be off by:
the margin's rounding allowance (``clean_margins``). Float32 logits depend on the batch they are
computed in and on the kernels (thread count, device, cuDNN's algorithm): on the CPU a 3072-input
linear layer's logits differed by up to 14 such units between batch sizes 1, 7 and 500 (a margin,
a difference of two logits, by twice that). 256 is well above, and costs the certified radius
``256 * 2^-23 * max|z| / (sqrt(2) L)``: 2e-5 at max|z| = L = 1, far below the radius grid's
step (0.026)."""


def _margins_of(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    labels = y.cpu().long()[:, None]
    true = logits.gather(1, labels).squeeze(1)
    other = logits.scatter(1, labels, float("-inf")).amax(dim=1)
    return true - other, logits.argmax(dim=1) == labels.squeeze(1)


def margins(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Logit margins and correctness, both (N,) on the CPU.

    ``margin_i = z_{y_i}(x_i) - max_{j != y_i} z_j(x_i)`` and ``correct_i = argmax_j z_j = y_i``.
    """
    return _margins_of(_logits(model, x, batch_size), y)


def clean_margins(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``margins`` and each margin's rounding allowance, ``MARGIN_ROUNDING * eps_float32 *
    max_j |z_j(x_i)|`` (all (N,) on the CPU): what ``certified_radius`` takes off the margin.

    Why: the attacks judge a point in other batches than these, where its float32 logits round
    differently. A margin within rounding of zero is no evidence of a correct point that can be
    certified (another batch may misclassify it: an "adversarial example" at distance 0 inside a
    certified radius), and an audit at a point's own certified radius must not flip a point
    whose certificate only rounding overstated (``radius_sweep``)."""
    logits = _logits(model, x, batch_size)
    margin, correct = _margins_of(logits, y)
    scale = logits.abs().amax(dim=1)
    return margin, correct, MARGIN_ROUNDING * torch.finfo(torch.float32).eps * scale


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Clean accuracy ``mean_i [argmax_j z_j(x_i) = y_i]``."""
    _, correct = margins(model, x, y, batch_size)
    return correct.double().mean().item()


# --------------------------------------------------------------------------------------------
# certificates


def _check_lipschitz(lipschitz: float) -> None:
    if not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"lipschitz must be finite and > 0, got {lipschitz}")


def certified_radius(
    margins: Tensor, correct: Tensor, lipschitz: float, tolerance: Tensor | float = 0.0
) -> Tensor:
    """Certified L2 radius per sample (float64): ``(margin - tolerance) / (sqrt(2) L)``, 0 if
    misclassified or the margin is not above ``tolerance``.

    Tsuzuku et al. (2018): if the logit map is L-Lipschitz in L2, each logit difference
    ``z_y - z_j`` is ``sqrt(2) L``-Lipschitz, so the prediction cannot change within that radius.
    ``lipschitz`` must be a certified *upper* bound of L. ``tolerance`` (per sample, or one
    number) is how far the computed margin may exceed the true one (its rounding:
    ``clean_margins``); 0 takes the margin as exact.
    """
    _check_lipschitz(lipschitz)
    m = margins.detach().cpu().double() - torch.as_tensor(tolerance, dtype=torch.float64)
    radius = m / (SQRT2 * lipschitz)
    return torch.where(correct.detach().cpu().bool() & (m > 0), radius, torch.zeros_like(radius))


def certified_accuracy(
    margins: Tensor,
    correct: Tensor,
    lipschitz: float,
    eps_grid: Sequence[float] | np.ndarray,
    tolerance: Tensor | float = 0.0,
) -> np.ndarray:
    """Certified accuracy at each ε: ``mean_i [r_i > ε]`` with ``r`` the :func:`certified_radius`
    (``correct_i`` and ``margin_i - tolerance_i > sqrt(2) L ε``; ``tolerance``: the margins'
    rounding, as there).

    ``lipschitz`` must be a certified upper bound of the L2 Lipschitz constant of the logit map
    (Tsuzuku et al. 2018); a lower estimate (e.g. a short power iteration) is unsound.
    """
    radius = certified_radius(margins, correct, lipschitz, tolerance).numpy()
    eps = np.asarray(eps_grid, dtype=np.float64)
    return (radius[None, :] > eps[:, None]).mean(axis=1)


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
    factor = (eps / flat_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta * per_image(factor, delta)).clamp(0.0, 1.0)


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
        direction = unit_l2(_ce_gradient(model, x_adv, y))
        x_adv = project_l2(x_adv + step_size * direction, x, eps)
    return x_adv.detach()


def unit_l2(g: Tensor) -> Tensor:
    """``g / ||g||_2`` per sample, 0 where ``g`` is 0. Scaled by its largest entry first: the
    cross-entropy gradient of a point of margin 60 is about ``e^-60``, whose squares underflow
    in float32, and a floor of 1e-12 on its norm shrank the step by that factor (PGD at ε = 0.5
    broke 6 % of points 0.3 from the boundary at margin 60, 98 % now). Past a margin of about
    104 float32's softmax is exactly one-hot and the gradient exactly 0: cross-entropy PGD (the
    paper's, foolbox's) has no direction there; the strong attack's margin losses do."""
    scale = g.flatten(1).abs().amax(dim=1)
    g = g / per_image(torch.where(scale > 0, scale, torch.ones_like(scale)), g)
    return g / per_image(flat_norm(g).clamp_min(_TINY), g)


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
    check_eps(eps)
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
        todo = torch.nonzero(predict(model, x_dev) == y_dev).squeeze(1)
        for _ in range(restarts):
            if todo.numel() == 0:
                break
            x_sub, y_sub = x_dev[todo], y_dev[todo]
            adv = _pgd_run(model, x_sub, y_sub, eps, steps, rel_step * eps, random_start, gen)
            best[todo] = adv
            todo = todo[predict(model, adv) == y_sub]
    return best.to(x.device)


# --------------------------------------------------------------------------------------------
# AutoAttack


# Classes below which an AutoAttack attack fails inside pyautoattack 0.2.0 (an IndexError): its
# DLR losses divide by the gap to the third largest logit, the targeted one to the fourth.
AUTOATTACK_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}
# The attacks each AutoAttack version runs (pyautoattack's ``set_version``); custom: its list.
AUTOATTACK_VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}


def autoattack_label(version: str, attacks: Sequence[str] | None) -> str:
    """``AutoAttack standard`` or ``AutoAttack custom [apgd-ce, apgd-t]``, for messages."""
    return f"AutoAttack {version}" + (f" [{', '.join(attacks)}]" if attacks else "")


def autoattack_min_classes(version: str, attacks: Sequence[str] | None) -> int:
    """The fewest classes AutoAttack ``version`` (``attacks`` when custom) can attack."""
    names = AUTOATTACK_VERSIONS.get(version, attacks or ())
    return max([2, *(AUTOATTACK_MIN_CLASSES.get(name, 2) for name in names)])


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
    pyautoattack 0.2.0: float32 inputs; ``AUTOATTACK_MIN_CLASSES`` (fewer: a ``ValueError`` here;
    with K < 10 the targeted attacks use K - 1 targets); Square (standard) needs images of at
    least 5x5.
    """
    check_eps(eps)
    if (version == "custom") != (attacks is not None):
        raise ValueError("give attacks exactly when version='custom'")
    if eps == 0 or len(x) == 0:
        return x.clone()
    from pyautoattack import AutoAttack  # the pipeline extra: the library runs without it

    device = model_device(model)
    with eval_mode(model), _forked_rng(device):
        n_classes = _logits(model, x[:1], 1).shape[1]
        need = autoattack_min_classes(version, attacks)
        if n_classes < need:
            label = autoattack_label(version, attacks)
            raise ValueError(f"{label} needs {need} classes or more, the model has {n_classes}")
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
                _set_iterations(attack, int(iterations))
        x_adv, _ = adversary.run_standard_evaluation(x, y.long(), batch_size=batch_size)
    return x_adv.to(x.device)


def _set_iterations(attack: Any, n: int) -> None:
    """``n`` iterations for an attack AutoAttack built with 100. APGD also derives its step-size
    schedule from the count when it is built (pyautoattack 0.2.0, ``APGDAttack.__init__``: the
    first checkpoint after 22 %, the checkpoint spacing shrinking by 3 % to at least 6 %): set
    alone, ``n_iter`` would leave a 10-iteration APGD before its first checkpoint, never halving
    its step. FAB has no such schedule."""
    attack.n_iter = n
    if hasattr(attack, "n_iter_2"):
        attack.n_iter_2 = max(int(0.22 * n), 1)
        attack.n_iter_min = max(int(0.06 * n), 1)
        attack.size_decr = max(int(0.03 * n), 1)


# --------------------------------------------------------------------------------------------
# curves and the invariant


BALL_REL_TOL = 1e-6
"""Relative slack of the ball check (``ball_tolerance``): the attacks' float32 projection."""


def ball_tolerance(eps: float, x: Tensor, rel_tol: float = BALL_REL_TOL) -> float:
    """How far beyond ``eps`` an attack's example of ``x`` may lie and count as in the ball:
    ``rel_tol * eps`` (the float32 arithmetic of the attack's projection) plus ``sqrt(n) *
    2^-24`` for n values per sample (storing the example in float32 moves each coordinate in
    [0, 1] by at most 2^-25, half a unit in the last place of 1, so its norm by at most
    ``sqrt(n) 2^-25``; twice that for the attack's own last step). No tighter: PGD's examples of
    3x32x32 images lay up to 4e-8 (absolute) beyond the sphere at every radius, 7.6e-7 of a
    radius of 0.0256 (the grid's first), so 1e-6 relative alone would reject them. 3.3e-6 at
    3x32x32 (2.3e-5 of 36/255), against the 1e-5 the check used to allow at any radius."""
    n = math.prod(x.shape[1:])
    return rel_tol * eps + math.sqrt(n) * 2.0**-24


def check_in_ball(x_adv: Tensor, x: Tensor, eps: float, rel_tol: float = BALL_REL_TOL) -> None:
    """An attack's output must be finite and lie in the closed ``eps`` ball around ``x`` (up to
    its float32 rounding, ``ball_tolerance``, in float64) and in [0, 1]: a counted break outside
    the ball would be no break at all, and a NaN example (a NaN gradient inside the attack) would
    pass any ``>`` test and count as a break at every radius. The tests are written so that NaN
    fails them."""
    if not bool(torch.isfinite(x_adv).all()):
        raise ValueError(f"attack at eps={eps} returned non-finite values (NaN or inf)")
    dist = flat_norm(x_adv.double() - x.double())
    if dist.numel() and not bool((dist <= eps + ball_tolerance(eps, x, rel_tol)).all()):
        raise ValueError(f"attack left the eps={eps} ball: distance {dist.max().item():.9g}")
    if x_adv.numel() and not bool(((x_adv >= 0) & (x_adv <= 1)).all()):
        raise ValueError("attack left the image range [0, 1]")


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    attack: Attack,
    batch_size: int,
    rel_tol: float = BALL_REL_TOL,
) -> float:
    """Empirical robust accuracy ``mean_i [f(x_i) = y_i and f(attack(x_i)) = y_i]``.

    Each batch's adversarial examples are checked to lie in the ε-ball (up to its rounding,
    ``ball_tolerance``) and in [0, 1], so that a faulty attack cannot report a falsely low robust
    accuracy. The attack runs in ``full_float32``, as its examples are judged: in TF32 (a GPU's
    default) AutoAttack stopped attacking points it had broken only in TF32, which then counted
    as robust (``radius_sweep`` attacks in TF32 and attacks those points again instead).
    """
    check_eps(eps)
    device = model_device(model)
    robust = 0
    with eval_mode(model):
        for s in _batches(len(x), batch_size):
            xb, yb = x[s].to(device), y[s].to(device).long()
            with full_float32():
                x_adv = attack(model, xb, yb, eps).to(device)
            check_in_ball(x_adv, xb, eps, rel_tol)
            ok = (predict(model, xb) == yb) & (predict(model, x_adv) == yb)
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
    model: nn.Module,
    x: Tensor,
    steps: int = 50,
    lr: float = 1e-2,
    delta_scale: float = 1e-2,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    saved: MutableMapping[str, Any] | None = None,
    stop: StopFlag | None = None,
) -> float:
    """Empirical lower bound of the L2 Lipschitz constant of ``model`` (in evaluation mode)
    near the inputs ``x``.

    Gradient ascent (Adam) on ``||f(x') - f(x' + d)|| / ||d||`` per sample over both the base
    point ``x'`` (started at ``x``) and the offset ``d`` (started at random, ``||d|| =
    delta_scale ||x||``); returns the largest ratio seen. Any value is a true lower bound of the
    network's constant, so it must never exceed a certified upper bound. It runs on a float64
    copy of the model: the certificate bounds the network in exact arithmetic, and the search
    shrinks ``d`` until the rounding of ``f`` divided by ``||d||`` dominates the ratio, in
    float32 and far more in TF32, a GPU's default for convolutions (a review measured 1.70 for
    a denoiser certified at 1.0 under emulated TF32 convolutions). ``log`` gets a line every
    tenth of the steps (the largest ratio so far, elapsed, ETA): on full-size images on a CPU
    the search takes hours.

    Resumable: at each of those tenths the search's state (its step, ``x'``, ``d``, Adam's
    moments, the largest ratio) goes into ``saved["state"]`` (a job passes a section of its
    saved progress, ``pipeline.resume``), and after any step but the last once ``stop`` says a
    signal arrived, which then ends the search (``Interrupted``): at paper size on a CPU a step
    takes minutes, a tenth about half an hour. A search given a ``saved`` that holds a state
    goes on from it to the ratio an uninterrupted search finds.
    """
    exact = copy.deepcopy(model).double()
    near = x.detach().to(model_device(model), torch.float64)  # ``x`` may lie on another device
    with eval_mode(exact):
        return _ratio_search(exact, near, steps, lr, delta_scale, seed, log, saved, stop)


def _ratio_search(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    steps: int,
    lr: float,
    delta_scale: float,
    seed: int,
    log: Callable[[str], None] | None,
    saved: MutableMapping[str, Any] | None,
    stop: StopFlag | None,
) -> float:
    every, start = max(1, steps // 10), time.monotonic()
    # a copy: Adam updates the tensors it is given in place, and ``saved`` must keep its step's
    state = None if saved is None else copy.deepcopy(saved.get("state"))
    if state is None:
        g = torch.Generator(device=x.device).manual_seed(seed)
        base = x.detach().clone()
        d = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        d = d * (delta_scale * flat_norm(x) / flat_norm(d).clamp_min(_TINY))[:, None, None, None]
        first, best = 0, 0.0
    else:
        base, d = state["base"].to(x), state["d"].to(x)
        first, best = int(state["step"]), float(state["best"])
        if log is not None:
            log(f"Lipschitz search: resuming at step {first + 1}/{steps + 1}")
    base.requires_grad_(True)
    d.requires_grad_(True)
    opt = torch.optim.Adam([base, d], lr=lr)
    if state is not None:
        opt.load_state_dict(state["adam"])
    for step in range(first, steps + 1):
        ratio = flat_norm(f(base) - f(base + d)) / flat_norm(d).clamp_min(_TINY)
        best = max(best, float(ratio.detach().max()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
        k = step + 1
        if log is not None and (k % every == 0 or k == steps + 1):
            log(
                f"Lipschitz search step {k}/{steps + 1}: largest ratio {best:.4g}, "
                f"{timing(k - first, steps + 1 - first, time.monotonic() - start)}"
            )
        if k == steps + 1:  # done: a stop asked during the last step lets the search end
            break
        asked = stop is not None and stop.raised
        if saved is not None and (asked or k % every == 0):
            saved["state"] = {
                "step": k, "base": base.detach().clone(), "d": d.detach().clone(),
                "adam": copy.deepcopy(opt.state_dict()), "best": best,
            }  # fmt: skip
        if stop is not None and stop.raised:
            raise Interrupted(
                f"signal {stop.signum}: the Lipschitz search stopped after step {k} of "
                f"{steps + 1}{', its state saved' if saved is not None else ''}"
            )
    return best
