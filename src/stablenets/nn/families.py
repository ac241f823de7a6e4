"""Other 1-Lipschitz block families, each with a sound ``lipschitz_bound(input_size)``.

All act on ``C`` channels and keep the shape, so they drop into the same classifier skeleton as
the paper's block; ``activation`` is a monotone, ``L``-Lipschitz ``sigma`` (``activations.py``).

* ``CPLBlock`` (Meunier et al. 2022): ``x - (2 theta / (L ||A||^2)) A^T sigma(A x + b)``. It *is*
  the paper's Euler block (``NonexpansiveBlock``: same operator, same field, same Euler step) with
  one sub-step of the largest stable size ``h = 2 r theta / (L ||A||^2)``: instead of keeping its
  integration time fixed and adding sub-steps as ``||A||`` grows, CPL lets the one step follow the
  norm. Training uses the power-iteration estimate, ``eval()`` the certified bound, as the
  Euler block does. Bound 1 (``h nu = r theta <= r``).
* ``SLLBlock`` (Araujo et al. 2023): ``x - (2 theta / L) A^T T^{-1} sigma(A x + b)`` with
  ``T = diag(t)``, ``t_i = sum_j |A A^T|_ij q_j / q_i`` and a learnable positive vector ``q``.
  ``T >= A A^T`` (Gershgorin on ``Q^{-1} (T - A A^T) Q``), so ``B = T^{-1/2} A`` has ``||B|| <= 1``;
  a.e. Jacobian ``I - (2 theta / L) B^T D B`` with ``0 <= D <= L`` diagonal (it commutes with
  ``T``), whose spectrum lies in ``[1 - 2 theta, 1]``: bound 1 without any power iteration.
* ``AOLBlock`` (Prach & Lampert 2022): ``sigma(P D x + b)``, ``D = diag(d)``,
  ``d_i = (sum_j |P^T P|_ij)^{-1/2}``; ``||P D|| <= 1`` by the same row-sum (Schur) test. Bound
  ``L min(1, ||P D||_cert)``.
* ``OrthogonalBlock`` (Cayley, Trockman & Kolter 2021): ``sigma(Q x + b)`` with ``Q`` the circular
  convolution whose symbol at each DFT frequency is the Cayley transform
  ``(I + V)^{-1} (I - V)`` of the skew-Hermitian ``V = K_hat - K_hat^H``: unitary at every
  frequency, so ``Q`` is orthogonal *on the circular grid of the input's size* (circular padding,
  exact; it wraps information across image borders). Bound ``L``.

**Convolution row sums.** For a convolution with kernel ``K`` the Gram matrices ``P^T P`` (over
input channels) and ``P P^T`` (over output channels) are, on an unbounded grid, convolutions whose
kernel is the autocorrelation ``G[i, j, s] = sum_{o, a} K[o, i, a] K[o, j, a + s]``; their absolute
row sums are ``sum_{j, s} |G[i, j, s]|``. A zero-padded (or strided) convolution on a finite grid
is a compression ``S C R`` of the circular convolution ``C`` on a grid at least ``k - 1`` larger
(see ``operators.py``), and ``C``'s Gram matrix has the same row sums or smaller (wrapped
autocorrelation entries are sums of ``G`` entries). ``||S C R D|| <= ||C D||`` because ``D`` is
constant per channel and so commutes with the embedding ``R`` (and likewise ``T`` with ``S``), so
both rescalings are sound for any padding, stride or dilation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stablenets.nn.activations import MonotoneActivation, build_activation
from stablenets.nn.blocks import INIT_POWER_ITERS, NonexpansiveBlock
from stablenets.nn.operators import (
    Conv2dOperator,
    LinearOperator,
    Pinnable,
    autocast_off,
    same_padding,
    spatial_size,
)

__all__ = [
    "FAMILIES",
    "CPLBlock",
    "SLLBlock",
    "AOLConv",
    "AOLBlock",
    "CayleyConv",
    "OrthogonalBlock",
    "abs_gram_rowsums",
    "build_family_block",
    "token_power_size",
    "wrapped_kernel",
    "FamilyBlock",
]

FAMILIES = ("cpl", "sll", "aol", "orthogonal")
# CPL's device-side step is shrunk by this factor: it covers the roundings of c / sigma^2.
DEVICE_STEP_SHRINK = 1 - 2.0**-48

Size = tuple[int, int]


def abs_gram_rowsums(
    weight: torch.Tensor, side: str, q: torch.Tensor | None = None
) -> torch.Tensor:
    """``r_i = sum_j |M_ij| q_j / q_i`` for ``M = P^T P`` (``side='in'``) or ``P P^T``
    (``side='out'``), ``P`` the dense map or the convolution (unbounded grid) of ``weight``.

    ``weight`` is ``(out, in)`` (dense) or ``(out, in, kh, kw)`` (convolution); one value per
    channel of the chosen side (constant over pixels). Differentiable in ``weight`` and ``q``.
    """
    if side not in ("in", "out"):
        raise ValueError(f"side must be 'in' or 'out', not {side!r}")
    w = weight.transpose(0, 1) if side == "in" else weight
    if w.dim() == 2:
        gram = (w @ w.t()).abs()
    else:
        kh, kw = w.shape[-2:]
        # gram[i, j, s] = sum_{c, a} w[i, c, a + s] w[j, c, a]: the full autocorrelation.
        gram = F.conv2d(w, w, padding=(kh - 1, kw - 1)).abs().sum(dim=(2, 3))
    if q is None:
        return gram.sum(dim=1)
    return (gram @ q) / q


def _safe_inverse(t: torch.Tensor) -> torch.Tensor:
    """``1 / t`` where ``t > 0``, else 0 (a zero row sum means a zero row of the operator)."""
    return torch.where(t > 0, 1.0 / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``v`` (one value per channel) shaped so that ``x * view`` scales channel ``i`` by
    ``v_i``: the channel axis is ``-3`` of an image, batched ``(N, C, H, W)`` or not
    ``(C, H, W)`` (``spatial_size``), and ``-1`` of a dense input, ``(N, F)`` or ``(F,)``.
    Broadcasting aligns the trailing axes, so the leading ones need no entries."""
    return v.view(-1, 1, 1) if spatial_size(x) is not None else v.view(-1)


# --------------------------------------------------------------------------------------------
# CPL: the Euler block at its largest stable step


class CPLBlock(NonexpansiveBlock):
    """Convex Potential Layer: one Euler step of size ``2 r theta / (L ||A||^2)``.

    Built on ``NonexpansiveBlock`` (Euler, ``theta``): ``field`` and the Euler step are the
    block's own; only the schedule differs (one sub-step whose size follows the norm rather than
    a fixed integration time; the inherited ``time`` buffer is unused). With a fixed time equal
    to this step, ``NonexpansiveBlock`` computes the same map (tested).
    """

    checkpointable = False  # the one step keeps its activations (``remat`` does not apply)

    def __init__(
        self,
        operator: LinearOperator,
        activation: MonotoneActivation,
        theta: float = 1.0,
        init_power_iters: int = INIT_POWER_ITERS,
    ) -> None:
        super().__init__(operator, activation, "euler", theta, 1.0, init_power_iters)

    def step_size(self, norm: float) -> float:
        """Largest ``h`` with ``h L norm^2 / 2 <= r theta`` in float64 (1 when ``A = 0``)."""
        limit = self.tableau.step_radius * self.theta
        ell = self._ell(norm)
        if not ell > 0:
            return 1.0
        h = 2 * limit / ell
        while h * ell / 2 > limit:
            h = math.nextafter(h, 0.0)
        return h

    def substeps(self, norm: float) -> int:
        return 1

    def device_step_size(self, sign: float = 1.0) -> torch.Tensor:
        """``sign`` times the step of the training estimate, computed on the device from the
        ``sigma_estimate`` buffer: ``c / sigma^2`` in float64 with ``c = 2 r theta / L`` shrunk by
        ``DEVICE_STEP_SHRINK`` (covering the few roundings, so ``h L sigma^2 / 2 <= r theta``
        still holds; within 4e-15 of ``step_size``), 1 when ``sigma = 0``. Six small kernels.
        Used while a CUDA graph is captured (``graphs.py``): a host float would be frozen into
        the graph, this tensor is read again at every replay."""
        c = 2 * self.tableau.step_radius * self.theta / self.activation.lipschitz
        s2 = self.operator.sigma_estimate.double().square()
        return torch.where(s2 > 0, s2.reciprocal() * (sign * c * DEVICE_STEP_SHRINK), sign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.schedule(x)  # one sub-step; records the norm
        norm = self.last_norm
        if self.training and x.is_cuda and torch.cuda.is_current_stream_capturing():
            h = self.device_step_size(-1.0)
        else:
            h = -self.step_size(norm)
        # The Euler step of -grad with -h: bitwise the step of the field with h (see blocks.py).
        return self.tableau.step(self._gradient, x, h)

    def lipschitz_bound(self, input_size: Size | None = None) -> float:
        """1: the certified step has ``h nu <= r theta <= r`` (Euler, ``r = 1``)."""
        norm = self.operator.norm_bound(input_size)
        h_ell = self.step_size(norm) * self._ell(norm)
        if h_ell / 2 <= self.tableau.radius:
            return 1.0
        return self.tableau.stagewise_lipschitz(h_ell)  # pragma: no cover - unreachable

    def averagedness(self, input_size: Size | None = None) -> float | None:
        """``h L ||A||^2 / 2 = theta`` (Baillon–Haddad), ``None`` when that is not below 1."""
        norm = self.operator.norm_bound(input_size)
        alpha = self.step_size(norm) * self._ell(norm) / 2
        return alpha if alpha < 1 else None

    def lipschitz_estimate(self) -> float:
        return 1.0


def token_power_size(size: Size, kernel_size: int) -> Size:
    """The power-iteration grid of the ``sll`` and ``aol`` operators: ``size`` capped at the
    kernel's. Neither block iterates its power vector (SLL's bound needs no norm, AOL's is
    ``norm_bound``); AOL's ``dirac_init`` reads it once, where ``P D = I`` gives the estimate 1
    on any grid. A full-size vector (``64 x 321 x 481`` floats: 39 MB a block at the denoiser's
    size) would only fill the model files; on this grid it is ``64 x 3 x 3``."""
    return (min(size[0], kernel_size), min(size[1], kernel_size))


def _keep_own_power_vector(
    block: SLLBlock | AOLBlock, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Load-state-dict pre-hook of the blocks that never read their power vector: a ``u`` of
    another grid (the full-size one of checkpoints written before ``token_power_size``) is
    replaced by the block's own, so those checkpoints still load, to the same model."""
    key = prefix + "operator.u"
    own = block.operator.u
    if key in state_dict and state_dict[key].shape != own.shape:
        state_dict[key] = own.detach().clone()


# --------------------------------------------------------------------------------------------
# SLL


class SLLBlock(nn.Module):
    """SDP-based Lipschitz layer ``x - (2 theta / L) A^T T^{-1} sigma(A x + b)``.

    ``A`` is a dense or convolution operator (``C -> C'``, stride 1); ``T`` is recomputed from the
    weight at every call, so the bound 1 holds in training and in ``eval()`` alike.
    """

    def __init__(
        self, operator: LinearOperator, activation: MonotoneActivation, theta: float = 1.0
    ) -> None:
        super().__init__()
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta={theta} is outside (0, 1]")
        if isinstance(operator, Conv2dOperator) and operator.stride != (1, 1):
            raise ValueError("SLLBlock needs a stride-1 operator (A^T A x must have x's shape)")
        self.operator, self.activation, self.theta = operator, activation, float(theta)
        hidden = operator.weight.shape[0]
        self.log_q = nn.Parameter(torch.zeros(hidden))
        self.register_load_state_dict_pre_hook(_keep_own_power_vector)

    def scaling(self) -> torch.Tensor:
        """``t_i = sum_j |A A^T|_ij q_j / q_i`` (one per hidden channel), never under autocast:
        the bound 1 rests on ``T >= A A^T``, and bf16 row sums come out up to 0.3 % low."""
        w = self.operator.weight
        with autocast_off({w.device.type}):  # as AOLConv.rescaled: in the weight's precision
            return abs_gram_rowsums(w, "out", self.log_q.exp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv_t = _safe_inverse(self.scaling())
        z = self.activation(self.operator(x)) * _channel_view(inv_t, x)
        step = 2 * self.theta / self.activation.lipschitz
        return x - step * self.operator.adjoint(z, spatial_size(x))

    def lipschitz_bound(self, input_size: Size | None = None) -> float:
        return 1.0

    def lipschitz_estimate(self) -> float:
        return 1.0

    def averagedness(self, input_size: Size | None = None) -> float | None:
        """``theta`` when below 1: the block is ``(1 - theta) I + theta N`` with ``N`` the
        non-expansive ``theta = 1`` block."""
        return self.theta if self.theta < 1 else None


# --------------------------------------------------------------------------------------------
# AOL


class AOLConv(Conv2dOperator):
    """Convolution ``P D`` rescaled per input channel by ``d_i = (sum_j |P^T P|_ij)^{-1/2}``.

    Every method of ``Conv2dOperator`` (matvec, adjoint, power iteration) sees the rescaled kernel;
    ``norm_bound`` is ``min(1, certified norm of the rescaled convolution)``. ``dirac_init``
    (square kernels only) starts from the identity kernel (then ``d = 1`` and ``P D = I``): a
    random kernel's rescaled norm is well below 1 (about 0.6 at 3x3), and a stack of such blocks
    without a skip connection shrinks the signal until nothing trains.
    """

    def __init__(self, *args: Any, dirac_init: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if dirac_init:
            if self.in_channels != self.out_channels:
                raise ValueError("AOLConv dirac_init needs in_channels == out_channels")
            with torch.no_grad():
                nn.init.dirac_(self.weight)
            # P D = I: every vector is a top singular vector, so one iteration gives the estimate
            # twenty would (exactly 1) and the power vector up to rounding (each iteration
            # takes 0.25 s at 321x481 on a CPU, at every build and load)
            self.power_iteration(1)

    def rescale_(self, norm: float, n_iters: int) -> torch.Tensor:
        """Not possible: ``P D`` is the same for every positive multiple of the weight."""
        raise ValueError(
            "rescale_: an AOL convolution's operator P D does not change with the weight's scale"
        )

    def rescaled(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        pinned = self.__dict__.get("_pinned")
        if pinned is not None and w.dtype in pinned:
            return pinned[w.dtype]
        with autocast_off({w.device.type}):  # the rescaling in the weight's precision
            d = _safe_inverse(abs_gram_rowsums(w, "in")).sqrt()
            out = w * d.view(1, -1, 1, 1)
        if pinned is not None:
            pinned[w.dtype] = out
        return out

    @contextlib.contextmanager
    def _pinned_rescaling(self) -> Iterator[None]:
        """Compute ``D`` once per dtype inside the block, not at every product: the
        autocorrelation costs ``C^3`` (seconds at 512 channels on a CPU)."""
        self.__dict__["_pinned"] = {}
        try:
            yield
        finally:
            self.__dict__["_pinned"] = None

    @torch.no_grad()
    def power_iteration(self, n_iters: int = 1) -> torch.Tensor:
        """The base iteration on ``P D``, with ``D`` computed once per call."""
        with self._pinned_rescaling():
            return super().power_iteration(n_iters)

    @torch.no_grad()
    def warm_start(self, n_iters: int) -> torch.Tensor:
        """The base warm start on ``P D``, with ``D`` computed once per call."""
        with self._pinned_rescaling():
            return super().warm_start(n_iters)

    def _apply_with(
        self, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return super()._apply_with(self.rescaled(w), x, bias)

    def _adjoint_with(self, w: torch.Tensor, y: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return super()._adjoint_with(self.rescaled(w), y, shape)

    def _certificate_weight(self) -> torch.Tensor:
        """The rescaled kernel ``P D`` in float64 (``D`` computed in float64 too)."""
        return self.rescaled(self.weight.detach().to(torch.float64))

    @torch.no_grad()
    def _certified_norm(self, input_size: Size | None) -> float:
        """``min(1, certified norm of P D)``: the row-sum test bounds the norm by 1 on every grid
        (module docstring), and ``Conv2dOperator``'s certificate runs on the rescaled kernel."""
        return min(1.0, super()._certified_norm(input_size))


class AOLBlock(nn.Module):
    """``sigma(P D x + b)`` with an ``AOLConv``; bound ``L min(1, ||P D||)``."""

    def __init__(self, operator: AOLConv, activation: MonotoneActivation) -> None:
        super().__init__()
        self.operator, self.activation = operator, activation
        self.register_load_state_dict_pre_hook(_keep_own_power_vector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.operator(x))

    def lipschitz_bound(self, input_size: Size | None = None) -> float:
        return self.activation.lipschitz * min(1.0, self.operator.norm_bound(input_size))

    def lipschitz_estimate(self) -> float:
        return self.activation.lipschitz

    def averagedness(self, input_size: Size | None = None) -> float | None:
        return None  # not a gradient step: nothing beyond the Lipschitz bound is claimed


# --------------------------------------------------------------------------------------------
# Orthogonal convolution (Cayley transform in the Fourier domain)


# the largest systems the CPU solves batched (see ``_solve``): half the smallest that failed
_CPU_BATCHED_SOLVE_MAX = 64


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve(a, b)`` over a batch of square systems (``b`` of ``a``'s shape); on
    the CPU, systems larger than ``_CPU_BATCHED_SOLVE_MAX`` one at a time. The batched CPU solve
    (oneMKL's LU in the torch 2.14.1 wheels) fails with several threads from about 150
    channels (2 or 8 threads; it ran up to 100): "Parameter 6 was incorrect on entry to
    ZLASWP", then a hang or wrong pivots, forward and backward. One at a time it does not; for
    small systems the batch is twice as fast (the XS orthogonal classifier's training step)."""
    if a.device.type != "cpu" or a.shape[-1] <= _CPU_BATCHED_SOLVE_MAX:
        return torch.linalg.solve(a, b)
    shape = a.shape
    pairs = zip(a.reshape(-1, *shape[-2:]).unbind(0), b.reshape(-1, *shape[-2:]).unbind(0),
                strict=True)  # fmt: skip
    return torch.stack([torch.linalg.solve(m, r) for m, r in pairs]).reshape(shape)


def wrapped_kernel(weight: torch.Tensor, size: Size) -> torch.Tensor:
    """The kernel of ``weight``'s circular convolution on the ``n1 x n2`` grid, taps folded
    modulo the grid: ``W_n[..., s, t] = sum_{a = s mod n1, b = t mod n2} W[..., a, b]``, so that
    ``(W * x)[i, j] = sum_{a, b} W[a, b] x[(i - a) mod n1, (j - b) mod n2]``. On a grid at least
    the kernel's it is the zero-padded kernel; ``rfft2(W, s=size)`` on a smaller grid would crop
    the taps beyond it instead (a 3x3 kernel on a 2x2 grid kept 4 of its 9 taps)."""
    n1, n2 = size
    k1, k2 = weight.shape[-2:]
    r1, r2 = -(-k1 // n1), -(-k2 // n2)  # ceil(k / n): the folds per axis
    padded = F.pad(weight, (0, r2 * n2 - k2, 0, r1 * n1 - k1))
    return padded.reshape(*weight.shape[:-2], r1, n1, r2, n2).sum(dim=(-4, -2))


class CayleyConv(Pinnable):
    """Orthogonal circular convolution ``C -> C`` (Trockman & Kolter 2021), with bias.

    The kernel ``W`` (``C x C x k x k``) is wrapped onto the input's grid (``wrapped_kernel``:
    zero-padded, or folded when the grid is smaller than the kernel); at each DFT frequency ``w``
    its symbol ``A(w)`` gives ``Q(w) = (I + V)^{-1} (I - V)``, ``V = A - A^H``. Real kernels
    give ``Q(-w) = conj(Q(w))``, so the map is real, and orthogonal on that circular grid for any
    input size (no zero padding anywhere: it is honest only as a circular convolution). Inputs
    are ``(N, C, H, W)`` or unbatched ``(C, H, W)``.
    """

    padding_mode = "circular"

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.channels, self.kernel_size = channels, int(kernel_size)
        bound = 1.0 / math.sqrt(channels * kernel_size**2)
        w = torch.rand(channels, channels, kernel_size, kernel_size, generator=generator)
        self.weight = nn.Parameter((w * 2 - 1) * bound)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def symbol(self, size: Size, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Q(w) = (I + V(w))^{-1} (I - V(w))`` with ``V = A - A^H``,
        ``A(w) = sum_t W_n[t] exp(-i w.t)`` (``W_n = wrapped_kernel(W, size)``), on the
        half-spectrum ``(n1, n2 // 2 + 1, C, C)``, in the complex ``dtype`` (default: the
        weight's).

        In ``eval()`` (the map that is certified and evaluated) solved in complex128 from the
        float64 weight, then rounded once to ``dtype``: ``Q`` is unitary to float64 rounding, so
        a complex64 ``Q`` has ``|sigma - 1| <= ||E|| <= 2^-24 sqrt(C)`` for the rounding ``E``
        (measured: at most ``4.6e-8`` for ``C`` 8 to 512, weights x1 to x1e4). Solved in
        complex64, the defect grew with ``||V||``, above the bound 1 that ``norm_bound`` states:
        ``sigma_max - 1`` up to ``2.4e-4`` at ``C = 64``, weights x1000, ``1.3e-2`` at
        ``C = 512``. Training solves in the weight's precision: its map needs no certificate,
        and the float64 solve costs about twice the complex64 one on a CPU (1.8 s against 0.9 s
        at ``C = 512`` on an 8x8 grid, one thread), more on GPUs slow in float64. Within
        ``pinned_weights`` (an attack) solved once per grid and precision, and held there.
        """
        dtype = dtype or torch.promote_types(self.weight.dtype, torch.complex64)
        if self.training:
            return self._cayley(size, self.weight.dtype, dtype)
        key = ("symbol", tuple(size), dtype, self.weight.device)
        return self._while_pinned(key, lambda: self._cayley(size, torch.float64, dtype))

    def _cayley(self, size: Size, solve: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
        """``Q`` solved from the weight in ``solve`` precision, rounded to ``dtype``."""
        w = wrapped_kernel(self.weight.to(solve), size)
        a = torch.fft.rfft2(w).permute(2, 3, 0, 1)  # (n1, m, C, C)
        v = a - a.mH
        eye = torch.eye(self.channels, dtype=v.dtype, device=v.device)
        return _solve(eye + v, eye - v).to(dtype)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """The orthogonal part ``Q x`` (bias-free), ``x`` batched or not: ``Q`` rounded once, to
        the precision of ``x``'s spectrum."""
        size = (x.shape[-2], x.shape[-1])
        xf = torch.fft.rfft2(x)
        yf = torch.einsum("fgoi,...ifg->...ofg", self.symbol(size, xf.dtype), xf)
        return torch.fft.irfft2(yf, s=size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matvec(x)
        return y if self.bias is None else y + self.bias.view(-1, 1, 1)

    def norm_bound(self, input_size: Size | None = None) -> float:
        """1: ``Q`` is orthogonal on every circular grid."""
        return 1.0


class OrthogonalBlock(nn.Module):
    """``sigma(Q x + b)`` with a ``CayleyConv``; bound ``L``."""

    def __init__(self, operator: CayleyConv, activation: MonotoneActivation) -> None:
        super().__init__()
        self.operator, self.activation = operator, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.operator(x))

    def lipschitz_bound(self, input_size: Size | None = None) -> float:
        return self.activation.lipschitz * self.operator.norm_bound(input_size)

    def lipschitz_estimate(self) -> float:
        return self.activation.lipschitz

    def averagedness(self, input_size: Size | None = None) -> float | None:
        return None  # not a gradient step: nothing beyond the Lipschitz bound is claimed


# --------------------------------------------------------------------------------------------
# Registry

FamilyBlock = CPLBlock | SLLBlock | AOLBlock | OrthogonalBlock


def build_family_block(
    family: str,
    width: int,
    size: Size,
    kernel_size: int = 3,
    activation: str = "leaky_relu",
    theta: float = 1.0,
    integrator: str = "euler",
    power_size: Size | None = None,
) -> FamilyBlock:
    """One ``width -> width`` block of ``family`` acting on ``size`` images (zero padding
    ``kernel_size // 2``, circular for ``orthogonal``; ``power_size``: the power-iteration grid
    of ``cpl``, see ``Conv2dOperator``; ``sll`` and ``aol``, which never iterate theirs, carry a
    token one, ``token_power_size``). Every block keeps the image size, which the models'
    bounds assume (each block is certified at its stage's size): ``aol``, a single convolution,
    takes only an odd ``kernel_size`` (``same_padding``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown block family {family!r}; allowed: {list(FAMILIES)}")
    if family == "cpl" and integrator != "euler":
        raise ValueError(f"block 'cpl' is one Euler step; integrator {integrator!r} is not allowed")
    act = build_activation(activation)
    if family == "orthogonal":
        return OrthogonalBlock(CayleyConv(width, kernel_size), act)
    if family != "cpl":
        power_size = token_power_size(size, kernel_size)
    if family == "aol":
        pad = same_padding(kernel_size, "block 'aol'")
        conv = AOLConv(width, width, kernel_size, size, power_size, padding=pad, dirac_init=True)
        return AOLBlock(conv, act)
    conv = Conv2dOperator(width, width, kernel_size, size, power_size, padding=kernel_size // 2)
    if family == "cpl":
        return CPLBlock(conv, act, theta)
    return SLLBlock(conv, act, theta)
