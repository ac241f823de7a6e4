"""Total variation (TV): the discrete gradient and divergence, and the TV denoising baseline.

* TV denoising: ``min_x 1/2 ||x - y||^2 + weight * TV(x)`` with the isotropic
  ``TV(x) = sum_pixels sqrt((D_h x)^2 + (D_w x)^2)`` solved by the Chambolle–Pock primal–dual
  method (accelerated by the strong convexity of the data term).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import NamedTuple, TypedDict, Unpack

import torch
from torch import Tensor

from stablenets.evaluation.metrics import psnr
from stablenets.progress import timing

GRADIENT_NORM_SQ = 8.0
"""Upper bound of ``||grad||^2`` for 2-D forward differences (4 per axis, two axes)."""

# --------------------------------------------------------------------------------------------
# Discrete gradient and divergence
# --------------------------------------------------------------------------------------------


def gradient2d(x: Tensor) -> Tensor:
    """Forward-difference gradient with Neumann boundary, ``(..., H, W) -> (..., 2, H, W)``.

    Component 0 is ``x[i+1, j] - x[i, j]`` (zero on the last row), component 1 is
    ``x[i, j+1] - x[i, j]`` (zero on the last column). ``||gradient2d||^2 <= 8``.
    """
    g = x.new_zeros(*x.shape[:-2], 2, *x.shape[-2:])  # written in place: differentiable too
    g[..., 0, :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    g[..., 1, :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return g


def divergence2d(p: Tensor) -> Tensor:
    """Discrete divergence, the exact negative adjoint of :func:`gradient2d`.

    ``(..., 2, H, W) -> (..., H, W)`` with ``<gradient2d(x), p> = -<x, divergence2d(p)>`` for
    every ``x`` and every ``p`` (including ``p`` that is non-zero on the last row/column):
    ``p_i - p_{i-1}`` along each axis with ``p_{-1} = 0`` and ``p_{n-1}`` treated as 0.
    """
    rows, cols = p[..., 0, :-1, :], p[..., 1, :, :-1]
    d = p.new_zeros(p.shape[:-3] + p.shape[-2:])
    d[..., :-1, :] += rows
    d[..., 1:, :] -= rows
    d[..., :, :-1] += cols
    d[..., :, 1:] -= cols
    return d


def project_dual_ball(p: Tensor, radius: float, couple_channels: bool = False) -> Tensor:
    """Project ``p`` of shape ``(N, C, 2, H, W)`` onto ``{|p_pixel| <= radius}``.

    This is the prox of the conjugate of ``radius * ||.||_{2,1}`` (isotropic TV). The pointwise
    norm runs over the two directions, and over the channels too when ``couple_channels``
    (vectorial TV).
    """
    if radius == 0:
        return torch.zeros_like(p)
    if couple_channels:
        norm = p.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    else:  # one pass over the two directions (a reduction over a dimension of 2 is slow)
        norm = torch.hypot(p[:, :, 0], p[:, :, 1]).unsqueeze(2)
    return p / (norm / radius).clamp(min=1.0)


# --------------------------------------------------------------------------------------------
# TV denoising by Chambolle–Pock
# --------------------------------------------------------------------------------------------


def relative_change(new: Tensor, old: Tensor) -> Tensor:
    """Per-image ``||new - old|| / ||old||`` (denominator floored at the smallest normal)."""
    num = (new - old).flatten(1).norm(dim=1)
    den = old.flatten(1).norm(dim=1).clamp_min(torch.finfo(old.dtype).tiny)
    return num / den


def tv_gap_distance(
    x: Tensor, p: Tensor, y: Tensor, weight: float, couple_channels: bool
) -> Tensor:
    """Per-image certified bound of ``||x - x*|| / ||x||`` for TV denoising, from the duality gap.

    With ``P(x) = 1/2 ||x - y||^2 + weight ||grad x||_{2,1}`` and, for a feasible dual
    ``|p| <= weight``, ``D(p) = 1/2 ||y||^2 - 1/2 ||y + div p||^2 <= P(x*)``, the 1-strong convexity
    of ``P`` gives ``1/2 ||x - x*||^2 <= P(x) - P(x*) <= P(x) - D(p)``. In float64: the gap is a
    small difference of large sums.
    """
    x, p, y = x.double(), p.double(), y.double()
    dims = (1, 2) if couple_channels else (2,)
    tv = gradient2d(x).pow(2).sum(dim=dims).sqrt().flatten(1).sum(1)
    primal = 0.5 * (x - y).flatten(1).pow(2).sum(1) + weight * tv
    dual = 0.5 * y.flatten(1).pow(2).sum(1) - 0.5 * (y + divergence2d(p)).flatten(1).pow(2).sum(1)
    return (2 * (primal - dual).clamp_min(0)).sqrt() / x.flatten(1).norm(dim=1).clamp_min(1e-300)


def check_images(y: Tensor) -> None:
    """Refuse anything but a batch of images ``(N, C, H, W)``: the dual ball's projection takes
    ``p``'s axes as (image, channel, direction, row, column), and a ``(N, H, W)`` input paired
    two rows as one pixel's directions, a wrong answer certified exact."""
    if y.dim() != 4:
        raise ValueError(f"TV needs images shaped (N, C, H, W), got shape {tuple(y.shape)}")


class TVResult(NamedTuple):
    """A TV denoising: the images, the iterations run and the largest certified relative
    distance to the minimiser (:func:`tv_gap_distance`) at the end."""

    x: Tensor
    iterations: int
    distance: float


def tv_denoise(
    y: Tensor,
    weight: float,
    iters: int = 1000,
    tol: float = 5e-4,
    tau: float = 1.0,
    accelerate: bool = True,
    couple_channels: bool = False,
    check_every: int = 10,
) -> TVResult:
    """Isotropic TV denoising ``argmin_x 1/2 ||x - y||^2 + weight * ||grad x||_{2,1}``.

    Chambolle–Pock (2011) primal–dual iterations with ``K = grad``, ``K^T = -div``:

        p_{k+1}    = proj_{|p| <= weight}(p_k + sigma_k grad xbar_k)
        x_{k+1}    = (x_k + tau_k div p_{k+1} + tau_k y) / (1 + tau_k)
        theta_k    = 1 / sqrt(1 + 2 tau_k)      (accelerated, data term 1-strongly convex)
                     or 1                       (not accelerated, fixed steps)
        tau_{k+1}  = theta_k tau_k,  sigma_{k+1} = sigma_k / theta_k
        xbar_{k+1} = x_{k+1} + theta_k (x_{k+1} - x_k)

    with ``tau_0 sigma_0 ||grad||^2 <= tau_0 sigma_0 * 8 = 1`` (the product is invariant under
    acceleration). Each image stops after ``iters`` iterations or, checked every
    ``check_every``, once the duality gap certifies it within ``tol`` of the minimiser
    (``||x - x*|| <= tol ||x||``, :func:`tv_gap_distance`), each on its own: an image's answer
    is that of its solve alone, whatever images share its batch (a batch that ran until its
    slowest image stopped moved the others' PSNR by up to 0.013 dB). ``iterations``: until the
    last image stopped; ``distance``: the largest of the images' certified distances. Not on the
    relative change ``||x_{k+1} - x_k||``: with acceleration the steps shrink whether or not
    ``x`` is near ``x*``, and that rule stopped 160x ``tol`` away (0.1 dB off). ``y`` has shape
    ``(N, C, H, W)``.
    """
    if weight < 0:
        raise ValueError(f"TV weight must be non-negative, got {weight}")
    check_images(y)
    if weight == 0:
        return TVResult(y.clone(), 0, 0.0)
    sigma = 1.0 / (tau * GRADIENT_NORM_SQ)
    out = y.clone()  # each image's answer, written as it stops
    live = torch.arange(len(y), device=y.device)  # the images still iterating
    x, y_live = y.clone(), y
    x_bar, p = x, torch.zeros_like(gradient2d(y))
    k, distance = 0, 0.0
    while k < iters and len(live):
        p = project_dual_ball(p + sigma * gradient2d(x_bar), weight, couple_channels)
        x_new = (x + tau * divergence2d(p) + tau * y_live) / (1.0 + tau)
        theta = 1.0 / math.sqrt(1.0 + 2.0 * tau) if accelerate else 1.0
        tau, sigma = theta * tau, sigma / theta
        x_bar = x_new + theta * (x_new - x)
        x, k = x_new, k + 1
        if k % check_every == 0 or k == iters:
            gap = tv_gap_distance(x, p, y_live, weight, couple_channels)
            stop = gap <= tol if k < iters else torch.ones_like(gap, dtype=torch.bool)
            if bool(stop.any()):  # these stop here: their answer is that of a solve alone
                out[live[stop]] = x[stop]
                distance = max(distance, float(gap[stop].max()))
                keep = ~stop
                live, x, x_bar, p, y_live = live[keep], x[keep], x_bar[keep], p[keep], y_live[keep]
    if len(live):  # no iteration ran
        distance = math.inf
    return TVResult(out, k, distance)


class TVOptions(TypedDict, total=False):
    """The keyword options of :func:`tv_denoise` after ``iters``."""

    tol: float
    tau: float
    accelerate: bool
    couple_channels: bool
    check_every: int


def select_weight(
    solve: Callable[[Tensor, float], Tensor],
    observed: Tensor,
    clean: Tensor,
    weights: Sequence[float],
    peak: str | float = "max",
    batch_size: int | None = None,
    log: Callable[[str], None] | None = None,
    found: MutableMapping[float, float] | None = None,
    stop_point: Callable[[], None] | None = None,
    label: str = "TV weight",
    eligible: Callable[[float], bool] | None = None,
) -> tuple[float, list[float]]:
    """The regularisation weight whose reconstructions ``solve(observed, weight)`` have the best
    mean PSNR against ``clean``; every method with a weight picks it so, on *validation* images
    (never the test set), so that it is compared at its best, not at a guess. ``label`` names
    the weight in the log lines (``TV weight``, ``PnP denoiser strength``). ``eligible``, asked
    once every score is known, restricts the choice (to all candidates when it admits none).

    Returns the chosen weight and the mean PSNR of every weight, in the order given (ties go to
    the first). ``batch_size`` bounds the memory by solving that many images at a time. ``log``
    gets a line per weight (its PSNR, elapsed time, ETA): at paper size on a CPU a weight takes
    minutes. ``found``: the scores known so far, by weight; a weight in it is not solved again,
    and each new score goes into it as soon as it is known (a job passes its saved progress,
    ``pipeline.resume``, so that a killed choice resumes where it stopped). ``stop_point`` is
    called before each weight is solved: a job's ends it there once a stop signal arrived.
    """
    if len(weights) == 0:
        raise ValueError("choosing a regularisation weight needs at least one weight")
    found = {} if found is None else found
    step = batch_size or observed.shape[0]
    todo = [w for w in weights if w not in found]
    if log is not None and len(todo) < len(weights):
        log(f"{label}s: {len(weights) - len(todo)} of {len(weights)} scores found before")
    start = time.monotonic()
    for k, w in enumerate(todo, 1):
        if stop_point is not None:
            stop_point()
        values = [
            psnr(solve(observed[i : i + step], w), clean[i : i + step], peak)
            for i in range(0, observed.shape[0], step)
        ]
        found[w] = float(torch.cat(values).mean())
        if log is not None:
            elapsed = time.monotonic() - start
            log(
                f"{label} {w:g} ({k}/{len(todo)}): validation PSNR {found[w]:.2f} dB, "
                f"{timing(k, len(todo), elapsed)}"
            )
    scores = [found[w] for w in weights]
    allowed = [w for w in weights if eligible is None or eligible(w)] or list(weights)
    best = max(range(len(weights)), key=lambda i: (weights[i] in allowed, scores[i]))
    edge = {min(weights): "smallest", max(weights): "largest"}.get(weights[best])
    if log is not None and edge and len(weights) > 1:
        log(f"{label} {weights[best]:g} is the {edge} candidate: the best value may lie "
            "beyond the candidates; widen them to be sure the method is at its best")  # fmt: skip
    return float(weights[best]), scores


def select_tv_weight(
    noisy: Tensor,
    clean: Tensor,
    weights: Sequence[float],
    iters: int = 1000,
    peak: str | float = "max",
    batch_size: int | None = None,
    log: Callable[[str], None] | None = None,
    found: MutableMapping[float, float] | None = None,
    stop_point: Callable[[], None] | None = None,
    **tv_kwargs: Unpack[TVOptions],
) -> tuple[float, list[float]]:
    """:func:`select_weight` for :func:`tv_denoise` (``noisy``/``clean``: validation images)."""
    return select_weight(
        lambda y, w: tv_denoise(y, w, iters, **tv_kwargs).x, noisy, clean, weights, peak,
        batch_size, log, found, stop_point,
    )  # fmt: skip
