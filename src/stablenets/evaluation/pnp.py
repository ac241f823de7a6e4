"""Plug-and-Play (PnP) deblurring: blur operator, forward–backward iterations, TV baseline.

Forward model: ``y = K x + noise`` where ``K`` is a circular (periodic) convolution, applied by
FFT: ``K x = F^{-1}(h . F x)`` with ``h`` the transfer function (the DFT of the kernel, centred so
that ``K`` has no shift). Its adjoint is ``K^T y = F^{-1}(conj(h) . F y)`` and its operator norm is
exactly ``||K|| = max |h|`` (a circular convolution is diagonalised by the DFT).

PnP forward–backward with a denoiser ``D`` and relaxation ``lambda`` (Krasnosel'skii–Mann):

    x_{k+1} = (1 - lambda) x_k + lambda D(x_k - eta K^T (K x_k - y)).

The gradient step ``G = I - eta K^T K`` is ``(eta ||K||^2 / 2)``-averaged for
``0 < eta < 2 / ||K||^2``; if ``D`` is ``alpha``-averaged, ``T = D o G`` is averaged with
(Combettes–Yamada) ``alpha_T = (a1 + a2 - 2 a1 a2) / (1 - a1 a2)``, and the relaxed iteration
converges to a fixed point of ``T`` (when one exists) for ``0 < lambda < 1 / alpha_T``. For
``lambda <= 1 / alpha_T`` the relaxed operator is non-expansive, hence the step differences
``||x_{k+1} - x_k||`` are non-increasing: this is the diagnostic checked here, of the guarantee,
not of convergence. Without a fixed point (a blur whose transfer function has zeros and a
denoiser that shifts) the steps stay bounded away from zero while the iterates drift off, and
the relative change still falls towards ``tol``: ``converged`` is a stopping rule, not a proof.

PnP has no regularisation weight of its own: a denoiser trained at noise level ``sigma`` plugs in
a regulariser of about that strength, whatever the problem's noise. Its *strength* ``beta``,
``D_beta = (1 - beta) I + beta D`` (:func:`relaxed_denoiser`), is that weight: it is chosen on
validation images (:func:`select_pnp_strength`) as the TV baseline's weight is, and keeps the
guarantee (``D_beta`` is ``beta alpha``-averaged).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import NamedTuple, Protocol, TypedDict, Unpack

import numpy as np
import torch
from torch import Tensor

from stablenets.errors import InvariantError
from stablenets.evaluation.metrics import fixed_noise, per_image, psnr
from stablenets.evaluation.tv import (
    GRADIENT_NORM_SQ,
    check_images,
    divergence2d,
    gradient2d,
    project_dual_ball,
    relative_change,
    select_weight,
)
from stablenets.nn.operators import full_float32
from stablenets.progress import timing

__all__ = [
    "CircularBlur",
    "GaussianBlur",
    "LinearOperator",
    "Choice",
    "PnPOptions",
    "assert_nonincreasing",
    "check_nonincreasing",
    "forward_backward_averagedness",
    "gaussian_kernel",
    "observe",
    "pnp_forward_backward",
    "relaxed_denoiser",
    "select_pnp_strength",
    "select_tv_deblur_weight",
    "tv_deblur",
    "uniform_kernel",
]


# --------------------------------------------------------------------------------------------
# Blur operators
# --------------------------------------------------------------------------------------------


def gaussian_kernel(size: int, sigma: float) -> Tensor:
    """Normalised ``size x size`` Gaussian kernel, ``k_ij ∝ exp(-(i^2 + j^2) / (2 sigma^2))``.

    ``size`` must be odd so that the kernel has a centre pixel (no half-pixel shift).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"Gaussian kernel size must be a positive odd integer, got {size}")
    if sigma <= 0:
        raise ValueError(f"Gaussian kernel sigma must be positive, got {sigma}")
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2.0 * sigma**2))
    kernel = torch.outer(g, g)
    return kernel / kernel.sum()


def uniform_kernel(size: int) -> Tensor:
    """Normalised ``size x size`` box kernel (odd ``size``)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"uniform kernel size must be a positive odd integer, got {size}")
    return torch.full((size, size), 1.0 / size**2, dtype=torch.float64)


class LinearOperator(Protocol):
    """What PnP needs of a forward operator."""

    def forward(self, x: Tensor) -> Tensor: ...

    def adjoint(self, y: Tensor) -> Tensor: ...

    def norm(self) -> float: ...


class CircularBlur:
    """Circular convolution with a given 2-D kernel, for images of shape ``(..., H, W)``.

    The kernel (float64, shape ``(kh, kw)``) is zero-padded to ``(H, W)`` and rolled so that
    its centre ``(kh // 2, kw // 2)`` sits at pixel ``(0, 0)``: a symmetric kernel then gives an
    operator with no shift. ``image_shape`` is ``(C, H, W)`` or ``(H, W)``; only ``(H, W)`` is
    used (the operator acts on every channel independently). The transfer function is cached
    per device and dtype, so the operator works wherever its input lives.
    """

    def __init__(self, kernel: Tensor, image_shape: Sequence[int]) -> None:
        kernel = torch.as_tensor(kernel, dtype=torch.float64).detach().cpu()
        if kernel.dim() != 2:
            raise ValueError(f"kernel must be 2-D, got shape {tuple(kernel.shape)}")
        self.kernel = kernel
        self.image_shape = tuple(int(s) for s in image_shape)
        self.height, self.width = self.image_shape[-2:]
        kh, kw = kernel.shape
        if kh > self.height or kw > self.width:
            raise ValueError(f"kernel {kh}x{kw} larger than image {self.height}x{self.width}")
        psf = torch.zeros(self.height, self.width, dtype=torch.float64)
        psf[:kh, :kw] = kernel
        psf = torch.roll(psf, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1))
        self.transfer = torch.fft.rfft2(psf)
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def from_kernel(cls, kernel: Tensor, image_shape: Sequence[int]) -> CircularBlur:
        """Circular blur with an arbitrary kernel (see the class docstring for the centring)."""
        return CircularBlur(kernel, image_shape)

    def _transfer_like(self, x: Tensor) -> Tensor:
        """Transfer function on the device of ``x``, in the complex dtype matching ``x``."""
        if x.shape[-2:] != (self.height, self.width):
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} != operator size {(self.height, self.width)}"
            )
        cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        key = (x.device, cdtype)
        if key not in self._cache:
            self._cache[key] = self.transfer.to(device=x.device, dtype=cdtype)
        return self._cache[key]

    def _apply(self, x: Tensor, transfer: Tensor) -> Tensor:
        """``F^{-1}(transfer . F x)`` over the last two axes."""
        spectrum = torch.fft.rfft2(x) * transfer
        return torch.fft.irfft2(spectrum, s=(self.height, self.width)).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``K x = F^{-1}(h . F x)`` (circular convolution with the kernel)."""
        return self._apply(x, self._transfer_like(x))

    __call__ = forward

    def adjoint(self, y: Tensor) -> Tensor:
        """``K^T y = F^{-1}(conj(h) . F y)`` (circular correlation with the kernel)."""
        return self._apply(y, self._transfer_like(y).conj())

    def norm(self) -> float:
        """Exact operator norm ``||K||_2 = max |h|`` (1 for a normalised non-negative kernel)."""
        return float(self.transfer.abs().max())

    def prox_data(self, v: Tensor, y: Tensor, tau: float) -> Tensor:
        """``argmin_x 1/2 ||K x - y||^2 + 1/(2 tau) ||x - v||^2``, exactly, by FFT:

        ``x = F^{-1}((F v + tau conj(h) . F y) / (1 + tau |h|^2))``.
        """
        return self.data_prox(y, tau)(v)

    def data_prox(self, y: Tensor, tau: float) -> Callable[[Tensor], Tensor]:
        """:meth:`prox_data` for fixed ``y`` and ``tau``, as an iterative solver calls it: the
        spectrum ``tau conj(h) . F y`` and the factor ``1 / (1 + tau |h|^2)`` are computed once,
        so each call costs one FFT pair instead of three transforms."""
        h = self._transfer_like(y)
        fixed = tau * h.conj() * torch.fft.rfft2(y)
        factor = 1.0 / (1.0 + tau * h.abs().pow(2))

        def prox(v: Tensor) -> Tensor:
            spectrum = (torch.fft.rfft2(v) + fixed) * factor
            return torch.fft.irfft2(spectrum, s=(self.height, self.width)).to(v.dtype)

        return prox


class GaussianBlur(CircularBlur):
    """Circular Gaussian blur with a normalised ``size x size`` kernel of std ``sigma`` pixels."""

    def __init__(self, size: int, sigma: float, image_shape: Sequence[int]) -> None:
        super().__init__(gaussian_kernel(size, sigma), image_shape)
        self.size = size
        self.sigma = sigma


def observe(
    x: Tensor,
    blur: LinearOperator,
    noise_sigma: float,
    seed: int,
    indices: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Noisy blurred observation ``y = K x + noise_sigma * z`` (unclipped, fixed seed per image).

    The noise follows :func:`stablenets.evaluation.metrics.fixed_noise`: image ``n`` uses the generator
    seeded by ``(seed, indices[n])``.
    """
    return fixed_noise(blur.forward(x), noise_sigma, seed, indices)


# --------------------------------------------------------------------------------------------
# PnP forward–backward
# --------------------------------------------------------------------------------------------


def forward_backward_averagedness(eta: float, norm_sq: float, denoiser_alpha: float) -> float:
    """Averagedness of ``D o (I - eta K^T K)`` for an ``denoiser_alpha``-averaged ``D``.

    The gradient step is ``a2 = eta ||K||^2 / 2``-averaged; Combettes–Yamada gives
    ``(a1 + a2 - 2 a1 a2) / (1 - a1 a2)`` with ``a1 = denoiser_alpha`` (valid for ``a2 < 1``).
    """
    a1, a2 = denoiser_alpha, eta * norm_sq / 2.0
    return (a1 + a2 - 2.0 * a1 * a2) / (1.0 - a1 * a2)


def _check_parameters(
    eta: float, relax: float, norm_sq: float, denoiser_alpha: float | None
) -> None:
    """Raise ``ValueError`` unless ``0 < eta < 2 / ||K||^2`` (an averaged gradient step) and the
    relaxation is allowed: given ``denoiser_alpha``, ``0 < relax < 1 / alpha_T``, which makes the
    whole iteration averaged; without it (no guarantee for the denoiser, so none for the
    iteration) ``0 < relax <= 1``."""
    eta_max = 2.0 / norm_sq
    if not 0.0 < eta < eta_max:
        raise ValueError(
            f"PnP step size eta={eta} must satisfy 0 < eta < 2/||K||^2 = {eta_max:.6g} "
            f"(||K|| = {math.sqrt(norm_sq):.6g}); otherwise the gradient step is not averaged"
        )
    if denoiser_alpha is None:
        if not 0.0 < relax <= 1.0:
            raise ValueError(
                f"relaxation {relax} must lie in (0, 1]; pass denoiser_alpha to allow up to "
                "1/alpha of the composed operator"
            )
        return
    if not 0.0 < denoiser_alpha <= 1.0:
        raise ValueError(f"denoiser_alpha={denoiser_alpha} must lie in (0, 1]")
    relax_max = 1.0 / forward_backward_averagedness(eta, norm_sq, denoiser_alpha)
    if not 0.0 < relax < relax_max:
        raise ValueError(
            f"relaxation {relax} must lie in (0, 1/alpha_T) = (0, {relax_max:.6g}) for a "
            f"{denoiser_alpha}-averaged denoiser and eta={eta}"
        )


def relaxed_denoiser(
    denoiser: Callable[[Tensor], Tensor], strength: float
) -> Callable[[Tensor], Tensor]:
    """The denoiser at strength ``beta``: ``D_beta(v) = v + beta (D(v) - v)``.

    The strength is PnP's regularisation weight. At a fixed point ``x = D_beta(z)``,
    ``z = x - eta grad f(x)``, the step balances the data term against the denoiser's pull:
    ``eta grad f(x) = beta (D(z) - z)``; for ``D = prox_phi``, ``D(z) - z = -grad M_phi(z)``
    (the Moreau envelope's gradient), so ``x`` minimises about ``f + (beta / eta) phi``: a
    denoiser trained at a noise level far above the problem's needs ``beta << 1``. If ``D`` is
    ``alpha``-averaged, ``D = (1 - alpha) I + alpha N`` with ``N`` non-expansive, then
    ``D_beta = (1 - beta alpha) I + beta alpha N`` is ``beta alpha``-averaged for
    ``0 < beta < 1 / alpha``: the PnP iteration's guarantee holds at every strength up to 1.
    """
    if not strength > 0.0:
        raise ValueError(f"denoiser strength must be positive, got {strength}")
    if strength == 1.0:
        return denoiser
    return lambda v: v + strength * (denoiser(v) - v)


def _norms(x: Tensor) -> Tensor:
    """Per-image Euclidean norms, ``(N, ...) -> (N,)``."""
    return x.flatten(1).norm(dim=1)


class _History:
    """Per-image, per-iteration records; rows are NaN for images that have stopped."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rows: dict[str, list[Tensor]] = {}

    def add(self, idx: Tensor, **values: Tensor) -> None:
        for key, value in values.items():
            row = torch.full((self.n,), math.nan, dtype=torch.float64)
            row[idx.cpu()] = value.detach().to("cpu", torch.float64)
            self.rows.setdefault(key, []).append(row)

    def tensors(self) -> dict[str, Tensor]:
        return {key: torch.stack(rows, dim=1) for key, rows in self.rows.items()}


def pnp_forward_backward(
    denoiser: Callable[[Tensor], Tensor],
    blur: LinearOperator,
    y: Tensor,
    eta: float,
    relax: float = 1.0,
    max_iter: int = 300,
    tol: float = 1e-5,
    x0: Tensor | None = None,
    reference: Tensor | None = None,
    denoiser_alpha: float | None = None,
    blowup: float = 1e6,
    log: Callable[[str], None] | None = None,
    log_every: int = 25,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PnP forward–backward ``x_{k+1} = (1-relax) x_k + relax D(x_k - eta K^T(K x_k - y))``.

    ``y`` has shape ``(N, C, H, W)``; ``x0`` defaults to ``y``. The denoiser must act on each
    image independently (e.g. a network in eval mode): converged or diverged images are dropped
    from the batch. Raises ``ValueError`` unless ``0 < eta < 2/||K||^2`` and ``0 < relax <= 1``
    (or ``0 < relax < 1/alpha_T`` when the denoiser's averagedness ``denoiser_alpha`` is given,
    see :func:`forward_backward_averagedness`).

    Image ``n`` stops when ``||x_{k+1} - x_k|| / ||x_k|| < tol`` (converged), when ``x_{k+1}``
    is non-finite or ``||x_{k+1}|| > blowup * max(||x0||, ||y||)`` (diverged; never raises;
    the last acceptable iterate is returned), or after ``max_iter`` iterations.

    History, as CPU float64 tensors of shape ``(N, K)`` (``K`` iterations run, NaN after an
    image stopped): ``step_norm`` ``||x_{k+1} - x_k||`` (``+inf`` when ``x_{k+1}`` is
    non-finite), ``relative_change``, ``residual`` ``||K x_{k+1} - y||``, and with a
    ``reference`` ``psnr_1`` (peak 1) and ``psnr_max`` (peak ``max(reference)``). Per image,
    shape ``(N,)``: ``iterations`` (int64), ``converged``, ``diverged`` (bool).

    ``log`` gets a line every ``log_every`` iterations: images still iterating, the largest
    relative change among them, elapsed time and an ETA (an upper one: images stop early).

    The iterations run in ``full_float32`` (no TF32 on a GPU): the step norms' non-increase is
    checked to float32 rounding (``check_nonincreasing``), and TF32's, about 1e-3 relative per
    convolution, would exceed the steps themselves near convergence.
    """
    norm = blur.norm()
    _check_parameters(eta, relax, norm**2, denoiser_alpha)
    x = (y if x0 is None else x0).detach().clone()
    n = x.shape[0]
    limit = blowup * torch.maximum(_norms(x), _norms(y))
    status = {
        "iterations": torch.zeros(n, dtype=torch.int64),
        "converged": torch.zeros(n, dtype=torch.bool),
        "diverged": torch.zeros(n, dtype=torch.bool),
    }
    active = torch.ones(n, dtype=torch.bool)
    history = _History(n)
    start = time.monotonic()
    with torch.no_grad(), full_float32():
        for k in range(1, max_iter + 1):
            idx = active.nonzero().squeeze(1)
            x_old, y_act = x[idx.to(x.device)], y[idx.to(y.device)]
            x_new = _pnp_step(denoiser, blur, x_old, y_act, eta, relax)
            ref = None if reference is None else reference[idx.to(reference.device)]
            bad, conv = _record(history, idx, x_new, x_old, y_act, blur, ref, tol, limit)
            good = idx[~bad]
            x[good.to(x.device)] = x_new[(~bad).to(x_new.device)]
            status["iterations"][idx] += 1
            status["diverged"][idx[bad]] = True
            status["converged"][idx[conv]] = True
            active[idx[bad | conv]] = False
            if not active.any():
                break
            if log is not None and k % log_every == 0:
                log(_progress_line(k, max_iter, active, history, time.monotonic() - start))
    return x, {**history.tensors(), **status}


def _progress_line(k: int, max_iter: int, active: Tensor, history: _History, elapsed: float) -> str:
    """``PnP iteration 50/300: 12 of 200 images iterating, largest relative change 3.1e-04,
    elapsed 40 s, ETA at most 200 s``."""
    change = history.rows["relative_change"][-1][active]
    largest = float(change.max()) if len(change) else 0.0
    return (
        f"PnP iteration {k}/{max_iter}: {int(active.sum())} of {len(active)} images iterating, "
        f"largest relative change {largest:.2e}, {timing(k, max_iter, elapsed, upper=True)}"
    )


def _pnp_step(
    denoiser: Callable[[Tensor], Tensor],
    blur: LinearOperator,
    x: Tensor,
    y: Tensor,
    eta: float,
    relax: float,
) -> Tensor:
    """One relaxed forward–backward step ``(1-relax) x + relax D(x - eta K^T(Kx - y))``."""
    z = denoiser(x - eta * blur.adjoint(blur.forward(x) - y))
    return z if relax == 1.0 else (1.0 - relax) * x + relax * z


def _record(
    history: _History,
    idx: Tensor,
    x_new: Tensor,
    x_old: Tensor,
    y: Tensor,
    blur: LinearOperator,
    reference: Tensor | None,
    tol: float,
    limit: Tensor,
) -> tuple[Tensor, Tensor]:
    """Append one iteration to ``history``; return CPU masks (diverged, converged) over ``idx``.

    A diverged image's rejected iterate records its step (the evidence) but the residual and
    PSNRs of the iterate it keeps and returns (the last acceptable one), as its results do."""
    step = _norms(x_new - x_old)
    finite = torch.isfinite(x_new).flatten(1).all(dim=1) & torch.isfinite(step)
    step = torch.where(finite, step, torch.full_like(step, math.inf))
    rel = step / _norms(x_old).clamp_min(torch.finfo(x_old.dtype).tiny)
    bad = ~finite | (_norms(x_new) > limit[idx.to(limit.device)])
    kept = torch.where(per_image(bad.to(x_new.device), x_new), x_old, x_new)
    records = {"step_norm": step, "relative_change": rel}
    records["residual"] = _norms(blur.forward(kept) - y)
    if reference is not None:
        records["psnr_1"] = psnr(kept, reference, 1.0)
        records["psnr_max"] = psnr(kept, reference, "max")
    history.add(idx, **records)
    bad = bad.cpu()
    conv = ((rel < tol).cpu()) & ~bad
    return bad, conv


# --------------------------------------------------------------------------------------------
# Monotonicity of the step differences
# --------------------------------------------------------------------------------------------


def check_nonincreasing(
    diffs: Sequence[float] | np.ndarray | Tensor, rtol: float = 1e-5, atol: float = 0.0
) -> int | None:
    """First ``k`` with ``diffs[k] > diffs[k-1] (1 + rtol) + atol``, or ``None`` if none.

    ``diffs`` is one image's ``||x_{k+1} - x_k||`` history. Trailing NaNs (padding after the
    image stopped) are ignored; any other non-finite entry counts as an increase at its index.
    For float32 iterates pass ``atol`` of the order of ``eps * ||x||`` (rounding of the
    difference of two iterates), since ``rtol`` alone cannot absorb it near convergence.
    """
    d = np.asarray(diffs.detach().cpu() if isinstance(diffs, Tensor) else diffs, dtype=float)
    d = d.reshape(-1)
    finite_or_inf = np.flatnonzero(~np.isnan(d))
    d = d[: finite_or_inf[-1] + 1] if finite_or_inf.size else d[:0]
    bad = np.flatnonzero(~np.isfinite(d))
    increases = np.flatnonzero(d[1:] > d[:-1] * (1.0 + rtol) + atol) + 1
    hits = np.concatenate([bad, increases])
    return int(hits.min()) if hits.size else None


def assert_nonincreasing(
    diffs: Sequence[float] | np.ndarray | Tensor,
    model: str,
    image: str,
    rtol: float = 1e-5,
    atol: float = 0.0,
) -> None:
    """Raise ``InvariantError`` naming model and image if :func:`check_nonincreasing` fails."""
    k = check_nonincreasing(diffs, rtol=rtol, atol=atol)
    if k is None:
        return
    d = np.asarray(diffs.detach().cpu() if isinstance(diffs, Tensor) else diffs, dtype=float)
    d = d.reshape(-1)
    before = f"{d[k - 1]:.6e} -> " if k > 0 else ""
    raise InvariantError(
        f"PnP step differences ||x_(k+1) - x_k|| increase for model {model!r} on image "
        f"{image!r} at iteration {k}: {before}{d[k]:.6e} (rtol={rtol}, atol={atol})"
    )


# --------------------------------------------------------------------------------------------
# TV deblurring baseline
# --------------------------------------------------------------------------------------------


def tv_deblur(
    y: Tensor,
    blur: CircularBlur,
    weight: float,
    iters: int = 300,
    tol: float = 1e-5,
    step: float = 0.01,
    x0: Tensor | None = None,
    couple_channels: bool = False,
    log: Callable[[str], None] | None = None,
    log_every: int = 25,
) -> tuple[Tensor, Tensor, Tensor]:
    """TV deblurring ``argmin_x 1/2 ||K x - y||^2 + weight * ||grad x||_{2,1}``, the iterations
    each image ran and whether it stopped at ``tol`` (``(N,)`` each, on the CPU: an image that
    met ``tol`` at the last iteration converged too, though it ran them all).

    Chambolle–Pock with ``grad`` as the split operator and the data term's exact FFT prox
    (:meth:`CircularBlur.data_prox`), steps ``tau = step / weight`` and ``tau * sigma * 8 = 1``
    (``||grad||^2 <= 8``; ``tau = 1`` for weight 0). The primal step scales as the inverse of
    the dual ball's radius, which balances the two: with a fixed ``tau = 1``, 300 iterations
    left the smaller weights 2-5e-2 from the minimiser, with ``step = 0.01`` 1-3e-3 on the
    benchmark's cartoons (benchmarks/README.md) and up to 5e-3 on 64x80 photos (0.02 dB): the
    relative-change stop is no certificate (the blur's data term is not strongly convex, so
    the duality gap bounds no distance, as it does for denoising).

        p_{k+1}    = proj_{|p| <= weight}(p_k + sigma grad xbar_k)
        x_{k+1}    = prox_{tau data}(x_k + tau div p_{k+1})
        xbar_{k+1} = 2 x_{k+1} - x_k

    An image stops after ``iters`` iterations or once its relative change is below ``tol``, and
    is then dropped from the batch: its result is the one it has alone, whichever images share
    its batch, and the others run on without it. ``log`` gets a line every ``log_every`` iterations (the
    largest relative change of the images running, elapsed time, an upper ETA), as
    ``pnp_forward_backward`` does.
    """
    if weight < 0:
        raise ValueError(f"TV weight must be non-negative, got {weight}")
    check_images(y)
    tau = step / weight if weight > 0 else 1.0
    sigma = 1.0 / (tau * GRADIENT_NORM_SQ)
    x = (y if x0 is None else x0).clone()
    out = x.clone()  # each image's answer, written as it stops
    live = torch.arange(len(x), device=x.device)  # the images still running
    x_bar, p, y_live = x, torch.zeros_like(gradient2d(x)), y
    prox = blur.data_prox(y, tau)
    iterations = torch.full((len(x),), iters, dtype=torch.long)
    converged = torch.zeros(len(x), dtype=torch.bool)
    start = time.monotonic()
    for k in range(1, iters + 1):
        p = project_dual_ball(p + sigma * gradient2d(x_bar), weight, couple_channels)
        x_new = prox(x + tau * divergence2d(p))
        change = relative_change(x_new, x)
        x_bar, x = 2.0 * x_new - x, x_new
        stop = change < tol
        if bool(stop.any()):  # these stop here, dropped from the batch
            done = live[stop].cpu()
            out[live[stop]] = x[stop]
            iterations[done], converged[done] = k, True
            keep = ~stop
            live, x, x_bar, p, y_live = live[keep], x[keep], x_bar[keep], p[keep], y_live[keep]
            if not len(live):
                break
            prox = blur.data_prox(y_live, tau)
        if log is not None and k % log_every == 0:
            log(
                f"TV deblur iteration {k}/{iters}: {len(live)} of {len(out)} images "
                f"running, largest relative change {float(change[~stop].max()):.2e}, "
                f"{timing(k, iters, time.monotonic() - start, upper=True)}"
            )
    out[live] = x  # those that ran every iteration
    return out, iterations, converged


class Choice(NamedTuple):
    """A deblurring method's weight chosen on validation images (TV's weight, PnP's denoiser
    strength), every candidate's mean PSNR, and the image-iterations the choice took (its cost,
    ``bench.cost``)."""

    value: float
    scores: list[float]
    image_iterations: int


def select_tv_deblur_weight(
    observed: Tensor,
    clean: Tensor,
    blur: CircularBlur,
    weights: Sequence[float],
    iters: int,
    tol: float,
    step: float = 0.01,
    log: Callable[[str], None] | None = None,
    found: MutableMapping[float, float] | None = None,
    stop_point: Callable[[], None] | None = None,
) -> Choice:
    """The :func:`tv_deblur` weight with the best mean PSNR (peak 1, as PnP's) on ``observed``
    *validation* images (:func:`stablenets.evaluation.tv.select_weight`, whose ``found`` and
    ``stop_point`` resume and stop a killed choice): PnP is compared with the baseline at its
    best weight for the blur and noise at hand, not at a guess. ``image_iterations`` counts the
    solves run by this call."""
    image_iterations = 0

    def solve(y: Tensor, weight: float) -> Tensor:
        nonlocal image_iterations
        x, ran, _ = tv_deblur(y, blur, weight, iters, tol, step)
        image_iterations += int(ran.sum())  # each image until it stopped
        return x

    weight, scores = select_weight(
        solve, observed, clean, weights, 1.0, log=log, found=found, stop_point=stop_point
    )
    return Choice(weight, scores, image_iterations)


def _prefixed(log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    """``log`` with ``prefix`` before each line."""
    return lambda line: log(prefix + line)


class PnPOptions(TypedDict, total=False):
    """The keyword options of :func:`pnp_forward_backward` that a strength's runs share."""

    relax: float
    max_iter: int
    tol: float
    blowup: float
    log_every: int


def select_pnp_strength(
    denoiser: Callable[[Tensor], Tensor],
    blur: LinearOperator,
    observed: Tensor,
    clean: Tensor,
    strengths: Sequence[float],
    eta: float,
    denoiser_alpha: float | None = None,
    check: Callable[[dict[str, Tensor], float], None] | None = None,
    log: Callable[[str], None] | None = None,
    found: MutableMapping[float, float] | None = None,
    converged: MutableMapping[float, float] | None = None,
    stop_point: Callable[[], None] | None = None,
    **options: Unpack[PnPOptions],
) -> Choice:
    """The denoiser strength (:func:`relaxed_denoiser`) whose PnP reconstructions of the
    ``observed`` *validation* images have the best mean PSNR (peak 1) against ``clean``, among
    the strengths whose runs converged on every one of them (stopped at ``tol``; all strengths
    if none did, with a log line): PnP is compared with TV at its best weight as TV is
    (:func:`select_tv_deblur_weight`), and at a fixed point, as TV at its minimiser. Why only
    converged ones: as ``beta -> 0`` PnP becomes gradient descent on the data term, whose
    iterates regularise by stopping early; at the iteration cap a strength too small to
    converge would win on that alone (a random network then scores as well as no denoiser).

    ``found`` and ``converged`` (each strength's converged fraction) resume a killed choice,
    ``stop_point`` stops it (:func:`stablenets.evaluation.tv.select_weight`);
    ``check(history, strength)`` sees each strength's histories (a job checks their step norms
    as it does the test images'); ``log`` also gets each run's progress lines.
    ``image_iterations`` counts the denoiser calls per image run by this call."""
    image_iterations = 0
    converged = {} if converged is None else converged  # saved before its score: never behind

    def solve(y: Tensor, strength: float) -> Tensor:
        nonlocal image_iterations
        alpha = None if denoiser_alpha is None else strength * denoiser_alpha
        lines = None if log is None else _prefixed(log, f"validation at strength {strength:g}: ")
        x, history = pnp_forward_backward(
            relaxed_denoiser(denoiser, strength), blur, y, eta, denoiser_alpha=alpha, log=lines,
            **options,
        )  # fmt: skip
        image_iterations += int(history["iterations"].sum())
        converged[strength] = float(history["converged"].double().mean())
        if check is not None:
            check(history, strength)
        return x

    strength, scores = select_weight(
        solve, observed, clean, strengths, 1.0, log=log, found=found, stop_point=stop_point,
        label="PnP denoiser strength", eligible=lambda s: converged[s] == 1.0,
    )  # fmt: skip
    if log is not None and not any(converged[s] == 1.0 for s in strengths):
        log("PnP denoiser strength: no strength converged on every validation image within "
            "max_iter; chosen among all (its score is that of the capped iterations)")  # fmt: skip
    return Choice(strength, scores, image_iterations)
