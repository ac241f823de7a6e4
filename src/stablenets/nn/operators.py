"""Linear operators with adjoints and two kinds of spectral-norm information.

Every operator ``A`` offers ``forward`` (``A x + b``), ``matvec`` (bias-free ``A x``) and
``adjoint`` (``A^T y``), plus

* ``power_iteration(n)``: a warm-started power iteration on ``A^T A`` whose vector ``u`` is a
  persistent buffer (saved in ``state_dict``, moved by ``.to()``). Cheap enough for every training
  step, but a *lower* bound of ``||A||_2``: it drives step sizes in training, never a certificate.
  ``warm_start(n)`` starts it well (for a convolution: from the plane wave at the symbol's peak).
* ``norm_bound(input_size)``: a *certified upper* bound of ``||A||_2`` for inputs of the given
  spatial size, computed only when asked and recomputed whenever the weight changes (keyed on a
  hash of the weight's content, so ``load_state_dict``, in-place edits and ``.data`` assignments
  are all seen). ``pinned_weights(model)`` hashes once for a scope in which the weights stay
  fixed (an attack), and checks on exit that they did.

**Convolutions.** Extend the input by zeros to ``Z^2``: the zero-padded, strided convolution of an
``n``-sized input is a compression ``R D_s C E`` (``E`` the isometric embedding, ``C`` the
convolution on ``l2(Z^2)``, ``D_s`` the stride's row selection, ``R`` a row selection), so
``||A|| <= ||D_s C||``. Splitting the input into its ``s1 s2`` polyphase components maps ``D_s C``
unitarily to a stride-1 convolution with ``C_in s1 s2`` input channels, whose norm is the sup of
its symbol over the torus, ``S = sup_w sigma_max(P(w))``, ``P(w) = sum_t Q_t exp(-i w.t)``
(``conv_symbol_taps``). ``S`` does not depend on ``n``; ``torus_norm_bound`` certifies it from
finitely many frequencies (see there), at a cost independent of the image size. Two other sound
bounds tighten small grids; the certificate is the minimum of those computed:

* the circulant bound: ``A`` is also a compression of the circular convolution on the grid
  ``N = n + max(min(p, r), min(p', r))`` per axis (``r = d (k - 1)`` the kernel's reach, ``p`` and
  ``p'`` the low and high padding actually read): out-of-range reads wrap onto the zeros of
  ``[n, N)`` and the rows that read data stay distinct, so ``||A|| <= max_j sigma_max(K_hat(w_j))``
  over the ``N``-point DFT frequencies (used while ``N1 (N2 / 2 + 1) <= CIRCULANT_MAX_FREQUENCIES``;
  it never exceeds ``S``, so at stride 1 the torus bound is computed only where it is not);
* the dense bound (at most ``DENSE_CERTIFICATE_MAX_DIM`` inputs): ``||A|| <= s`` when the float64
  Cholesky factorisation of ``s^2 I - A^T A`` exists, ``s`` a Lanczos estimate inflated by
  ``_DENSE_MARGINS`` in turn; exact to 1e-5 where boundary effects make the others loose
  (8x8 grids: 2-3 %).

Every certified norm is inflated by ``CERTIFICATE_SLACK`` for float64 rounding. A float32
network's own rounding (its parameters cast or computed in float32: AOL's rescaling, a step
size, about 1e-7 relative) is not in it: the certified radius leaves it to the margins'
rounding tolerance (README, "The bounds certify the network in exact arithmetic").
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Pinnable",
    "LinearOperator",
    "DenseOperator",
    "Conv2dOperator",
    "CERTIFICATE_SLACK",
    "conv_symbol_taps",
    "same_padding",
    "torus_norm_bound",
    "power_iteration_all",
    "pinned_weights",
    "held_values",
    "full_float32",
]

# Relative inflation of every certified norm, covering the float64 rounding of the certificates.
CERTIFICATE_SLACK = 1e-9
# Complex entries per chunk of symbol evaluations; bounds their memory.
_CHUNK_ELEMENTS = 1 << 22
# The torus refinement stops once its bound is within this relative gap of the largest sampled
# norm (so of the sup itself), or when the next level would pass _TORUS_MAX_EVALUATIONS
# frequencies (the bound is sound at every level, only looser).
TORUS_TOLERANCE = 1e-4
_TORUS_MAX_EVALUATIONS = 20_000
_TORUS_MAX_LEVELS = 12
# Frequencies per axis (of positive degree) of the coarsest torus grid: at least 8 per degree.
_TORUS_GRID = 16
# The circulant bound is computed while its half-spectrum has at most this many frequencies
# (grids up to about 32x32), where boundary effects make it tighter than the torus bound.
CIRCULANT_MAX_FREQUENCIES = 1024
# Operators with at most this many inputs also get the dense (Cholesky) certificate: on the
# classifier's 8x8 stage at 64 channels (4096 inputs) the other bounds are 2-3 % loose and it is
# exact to 1e-5, for about 1-2 s (the Gram matrix is assembled from patches, one factorisation).
# Its cost grows as the cube of the input count, hence the cut-off.
DENSE_CERTIFICATE_MAX_DIM = 4096
_DENSE_LANCZOS_STEPS = 80
_DENSE_MARGINS = (1e-5, 1e-4, 1e-3, 1e-2)
# warm_start iterates on at most this many pixels per axis: the top-left window of the power
# grid, whose Rayleigh quotients bound the whole grid's norm from below (a compression).
WARM_GRID = 64
# Peak search for warm starts: coarse grid per axis, then greedy 3x3 refinements of its best
# points.
_PEAK_GRID = 16
_PEAK_STARTS = 4
_PEAK_REFINEMENTS = 5

_T = TypeVar("_T")


def host_copy(owner: nn.Module, slot: str, buf: torch.Tensor) -> float | None:
    """The host value remembered for ``buf`` in ``owner``'s ``slot``, or ``None`` when it may be
    stale: another buffer object (``load_state_dict``, ``.to()``) or a bumped version counter
    (any in-place edit). Reading it costs no device synchronisation."""
    cached = owner.__dict__.get(slot)
    if cached is not None and cached[0] is buf and cached[1] == buf._version:
        return cached[2]
    return None


def remember_host_copy(owner: nn.Module, slot: str, buf: torch.Tensor, value: float) -> None:
    owner.__dict__[slot] = (buf, buf._version, value)


def spatial_size(x: torch.Tensor) -> tuple[int, int] | None:
    """The image size ``(H, W)`` of a convolution's input, batched ``(N, C, H, W)`` or not
    ``(C, H, W)``; ``None`` for a dense operator's ``(N, F)``. Certified bounds depend on it: a
    bound for another size is no bound."""
    return (x.shape[-2], x.shape[-1]) if x.dim() >= 3 else None


def same_padding(kernel_size: int, what: str) -> int:
    """The zero padding ``(k - 1) / 2`` with which one stride-1 convolution of an odd
    ``kernel_size`` keeps the image size; an even kernel cannot (``k // 2`` grows the image by a
    pixel, ``(k - 2) / 2`` shrinks it), which ``what`` (the layer asking) is told as a
    ``ValueError``. A pair ``A^T A`` keeps the size with ``k // 2`` at any ``k``."""
    if kernel_size % 2 == 0:
        raise ValueError(
            f"{what} needs an odd kernel_size to keep the image size; got {kernel_size}"
        )
    return kernel_size // 2


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _round_down(estimate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``estimate`` (float64) cast to ``dtype``, rounded towards zero so that it stays a lower
    bound; elementwise and without a host synchronisation."""
    stored = estimate.to(dtype)
    return torch.where(
        stored.double() > estimate, torch.nextafter(stored, torch.zeros_like(stored)), stored
    )


# --------------------------------------------------------------------------------------------
# The symbol of a convolution on the torus


def conv_symbol_taps(
    weight: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int]
) -> torch.Tensor:
    """Taps ``Q`` (float64, ``(C_out, C_in s1 s2, L1, L2)``) of a stride-1 convolution on
    ``l2(Z^2)`` with the same norm as the convolution of ``weight`` (stride, dilation) there.

    Per axis: with stride 1 the undilated taps (the dilated symbol is ``P(d w)``: the same values
    over the torus); with stride ``s > 1`` the dilated taps split into ``s`` polyphase components,
    ``y[i] = sum_j E[j] x[i s + j - p] = sum_{q, r} E[q s + r] x_r[i + q]`` with
    ``x_r[m] = x[m s + r - p]`` (a unitary re-indexing of the input), so input channel ``(c, r)``
    holds the taps ``E[q s + r]``. All-zero border rows and columns of taps are dropped (a shift
    multiplies the symbol by a unimodular scalar), so a Dirac kernel has one tap.
    """
    w = weight.detach().to(torch.float64)
    for axis in range(2):
        s, d = stride[axis], dilation[axis]
        if s == 1:
            continue
        dim = 2 + axis
        k = w.shape[dim]
        if d > 1:
            shape = list(w.shape)
            shape[dim] = d * (k - 1) + 1
            spread = w.new_zeros(shape)
            w = spread.index_copy_(dim, torch.arange(0, shape[dim], d, device=w.device), w)
        length = -(-w.shape[dim] // s)
        pad = [0, 0, 0, 0]
        pad[3 - 2 * axis] = length * s - w.shape[dim]
        w = F.pad(w, pad)
        o, i, h, v = w.shape
        if axis == 0:
            w = w.reshape(o, i, length, s, v).permute(0, 1, 3, 2, 4).reshape(o, i * s, length, v)
        else:
            w = w.reshape(o, i, h, length, s).permute(0, 1, 4, 2, 3).reshape(o, i * s, h, length)
    for dim in (2, 3):
        alive = (w.abs().amax(dim=tuple(x for x in range(4) if x != dim)) > 0).nonzero()
        if len(alive) == 0:
            return w[:, :, :1, :1] * 0
        w = w.narrow(dim, int(alive[0]), int(alive[-1] - alive[0]) + 1)
    return w


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run batched LAPACK calls on many small matrices with one CPU thread. With two, MKL's
    threads wait on each other inside every small call: on a shared 2-core machine, 1152 eigen-
    solves of 64x64 matrices took 4 to 50 s instead of 0.3 s."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _symbol(taps: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``P(w) = sum_{a, b} Q[:, :, a, b] exp(-i (w1 a + w2 b))`` at the points ``(w1, w2)``:
    ``(F, C_out, C_in)`` complex128."""
    a1, a2 = (torch.arange(n, dtype=torch.float64, device=taps.device) for n in taps.shape[-2:])
    e1, e2 = torch.exp(-1j * torch.outer(w1, a1)), torch.exp(-1j * torch.outer(w2, a2))
    return torch.einsum("fa,fb,oiab->foi", e1, e2, taps.to(torch.complex128))


def _symbol_top(taps: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``lambda(w) = sigma_max(P(w))^2`` at the points ``(w1, w2)`` (float64 eigen-solver on the
    smaller Gram matrix), evaluated in chunks that bound the memory."""
    c_out, c_in = taps.shape[:2]
    rows = max(1, _CHUNK_ELEMENTS // (c_out * c_in))
    out = []
    for start in range(0, len(w1), rows):
        sym = _symbol(taps, w1[start : start + rows], w2[start : start + rows])
        gram = sym.mH @ sym if c_out >= c_in else sym @ sym.mH
        with _one_thread(gram.device):
            out.append(torch.linalg.eigvalsh(gram)[:, -1])
    return torch.cat(out)


def _lag_norms(taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``||G_s||_2`` for the lags ``s`` of ``H(w) = sum_s G_s exp(-i w.s)`` (``H = P^H P`` or
    ``P P^H``, the smaller), with ``|s1|`` and ``|s2|`` as broadcastable columns and rows."""
    c_out, c_in, l1, l2 = taps.shape
    side = taps.transpose(0, 1) if c_out >= c_in else taps
    lags = F.conv2d(side, side, padding=(l1 - 1, l2 - 1))  # lags[j, i, s] = G_s[i, j]
    with _one_thread(lags.device):
        norms = torch.linalg.matrix_norm(lags.permute(2, 3, 0, 1), ord=2)
    s1 = (torch.arange(2 * l1 - 1, device=taps.device) - (l1 - 1)).abs().double()
    s2 = (torch.arange(2 * l2 - 1, device=taps.device) - (l2 - 1)).abs().double()
    return norms, s1[:, None], s2[None, :]


def _half_torus_grid(
    counts: list[int], degrees: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Centres ``2 pi j / M`` of a ``counts`` grid (one point on an axis of degree 0), keeping
    ``j <= M / 2`` on the last axis of positive degree: ``lambda(-w) = lambda(w)`` for a real
    kernel, and these cells (half-widths ``pi / M``) cover a half of the torus that meets every
    orbit ``{w, -w}``."""
    axes = [torch.arange(c, dtype=torch.float64, device=device) * (2 * math.pi / c) for c in counts]
    half = 1 if degrees[1] else 0
    axes[half] = axes[half][: counts[half] // 2 + 1]
    g1, g2 = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g1.reshape(-1), g2.reshape(-1)], dim=1)


@torch.no_grad()
def torus_norm_bound(taps: torch.Tensor) -> tuple[float, tuple[float, float]]:
    """Certified ``S >= sup_w sigma_max(P(w))`` over the torus, and the frequency of the largest
    value sampled. ``taps`` as from ``conv_symbol_taps``; the cost does not depend on any grid.

    ``lambda = sigma_max^2`` is the top eigenvalue of the Hermitian trigonometric polynomial
    ``H(w) = sum_s G_s exp(-i w.s)``, ``|s_i| <= m_i = L_i - 1``, with ``0 <= H <= S^2 I``. Take
    a maximiser ``w*``, ``v`` its top eigenvector, and ``p(w) = v^H H(w) v``: ``p <= lambda <= S^2``
    everywhere and ``p(w*) = S^2``, so ``grad p(w*) = 0``. For a sample point ``c`` with
    ``|c_i - w*_i| <= h_i``, ``g(t) = p(w* + t (c - w*)) - S^2 / 2`` is a sum of exponentials of
    frequencies ``|s.(c - w*)| <= tau = m1 h1 + m2 h2``, bounded by ``S^2 / 2``; Bernstein's
    inequality for such functions (bounded entire functions of exponential type ``tau``:
    ``sup |g'| <= tau sup |g|``; Boas, *Entire Functions*, 1954, Thm 11.1.2), applied twice,
    gives ``|g''| <= tau^2 S^2 / 2``; term by term, ``|g''| <= D2 = sum_s (|s1| h1 + |s2| h2)^2
    ||G_s||``. With ``g'(0) = 0``, Taylor gives ``lambda(c) >= p(c) >= S^2 - min(tau^2 S^2 / 2,
    D2) / 2``, i.e. ``S^2 <= min(lambda(c) / (1 - tau^2 / 4), lambda(c) + D2 / 2)`` for the cell
    of half-widths ``h`` around ``c`` that holds ``w*``. A cell cannot hold a maximiser when
    ``lambda(c) + min(tau U / 2, D1) < max sampled lambda`` (Weyl's inequality with the first
    derivative bounded the same ways: ``||H(w) - H(c)|| <= tau S^2 / 2`` and
    ``<= D1 = sum_s (|s1| h1 + |s2| h2) ||G_s||``; ``U >= S^2`` the bound so far).

    Branch and bound: a coarse grid (``_TORUS_GRID`` or ``8 m_i`` points per axis, half of the
    torus by symmetry), then every cell that may hold a maximiser and whose bound is above the
    largest sample by more than ``TORUS_TOLERANCE`` is split 3x3 (its centre is reused); each
    level divides ``tau`` by 3 and the bound's excess by 9. The answer is the largest bound of a
    cell that may hold a maximiser. Float64 throughout; rounding is covered by
    ``CERTIFICATE_SLACK`` (the eigen-solver's error is ~1e-14 relative to ``S^2``).
    """
    degrees = (taps.shape[2] - 1, taps.shape[3] - 1)
    if degrees == (0, 0):  # a constant symbol: its norm is exact
        return float(torch.linalg.matrix_norm(taps[:, :, 0, 0], ord=2)), (0.0, 0.0)
    norms, s1, s2 = _lag_norms(taps)
    counts = [max(_TORUS_GRID, 8 * m) if m else 1 for m in degrees]
    half_widths = [math.pi / c for c in counts]
    centres = _half_torus_grid(counts, degrees, taps.device)
    lam = _symbol_top(taps, centres[:, 0], centres[:, 1])
    evaluations = len(lam)
    best = int(lam.argmax())
    low, peak = float(lam[best]), (float(centres[best, 0]), float(centres[best, 1]))
    settled_top = 0.0
    top = math.inf  # set by the first level (the loop runs at least once); inf is sound
    for level in range(_TORUS_MAX_LEVELS + 1):
        tau = degrees[0] * half_widths[0] + degrees[1] * half_widths[1]
        spread = s1 * half_widths[0] + s2 * half_widths[1]
        first, second = float((spread * norms).sum()), float((spread.square() * norms).sum())
        cell_top = lam + second / 2
        if tau * tau < 4:
            cell_top = torch.minimum(cell_top, lam / (1 - tau * tau / 4))
        top = max(settled_top, float(cell_top.max()))
        target = low * (1 + 2 * TORUS_TOLERANCE)
        if top <= target or level == _TORUS_MAX_LEVELS:
            break
        may_hold = lam + min(tau * top / 2, first) >= low - 1e-12 * top
        settled = may_hold & (cell_top <= target)
        if bool(settled.any()):
            settled_top = max(settled_top, float(cell_top[settled].max()))
        refine = may_hold & ~settled
        steps = [
            torch.tensor([-2 * h / 3, 0.0, 2 * h / 3] if m else [0.0], dtype=torch.float64)
            for h, m in zip(half_widths, degrees, strict=True)
        ]
        offsets = torch.cartesian_prod(*steps).reshape(-1, 2).to(taps.device)
        centre = (offsets == 0).all(dim=1)
        n_new = int(refine.sum()) * int((~centre).sum())
        if n_new == 0:
            top = settled_top
            break
        if evaluations + n_new > _TORUS_MAX_EVALUATIONS:
            break
        children = centres[refine][:, None, :] + offsets[None]  # (cells, 9 or 3, 2)
        child_lam = lam[refine][:, None].repeat(1, len(offsets))
        fresh = children[:, ~centre].reshape(-1, 2)
        values = _symbol_top(taps, fresh[:, 0], fresh[:, 1])
        child_lam[:, ~centre] = values.reshape(len(children), -1)
        centres, lam = children.reshape(-1, 2), child_lam.reshape(-1)
        evaluations += n_new
        half_widths = [h / 3 if m else h for h, m in zip(half_widths, degrees, strict=True)]
        if float(values.max()) > low:
            best = int(values.argmax())
            low, peak = float(values[best]), (float(fresh[best, 0]), float(fresh[best, 1]))
    return math.sqrt(max(top, 0.0)), peak


def _symbol_peak(taps: torch.Tensor) -> tuple[float, float]:
    """A frequency where ``sigma_max(P(w))`` is (nearly) largest: the ``_PEAK_STARTS`` best
    points of a coarse half-torus grid, each refined greedily 3x3 around itself. A search, not
    a certificate."""
    degrees = (taps.shape[2] - 1, taps.shape[3] - 1)
    if degrees == (0, 0):
        return 0.0, 0.0
    counts = [_PEAK_GRID if m else 1 for m in degrees]
    centres = _half_torus_grid(counts, degrees, taps.device)
    lam = _symbol_top(taps, centres[:, 0], centres[:, 1])
    keep = lam.topk(min(_PEAK_STARTS, len(lam))).indices
    best, value = centres[keep], lam[keep]  # (starts, 2), (starts,)
    widths = [2 * math.pi / c if m else 0.0 for c, m in zip(counts, degrees, strict=True)]
    for _ in range(_PEAK_REFINEMENTS):
        widths = [h / 3 for h in widths]
        steps = [torch.tensor([-h, 0.0, h], dtype=torch.float64) for h in widths]
        points = best[:, None, :] + torch.cartesian_prod(*steps).to(taps.device)[None]
        lam = _symbol_top(taps, points[..., 0].reshape(-1), points[..., 1].reshape(-1))
        top = lam.view(len(best), -1).max(dim=1)
        best = points[torch.arange(len(best)), top.indices]
        value = top.values
    winner = int(value.argmax())
    return float(best[winner, 0]), float(best[winner, 1])


def _plane_wave(
    taps: torch.Tensor, freq: tuple[float, float], dilation: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """``Re(v exp(-i w . m))`` under a sine window on the pixels ``x = d m`` of a ``size`` grid
    (zero elsewhere), ``(1, C_in, *size)`` float64, ``v`` the top right singular vector of the
    stride-1 symbol ``P(w)``: near the top singular vector of a large grid's convolution when ``w``
    is the symbol's peak. A dilated convolution acts on the ``d1 d2`` sub-lattices separately (as
    the undilated one); the one at the origin is the largest."""
    w1, w2 = (torch.tensor([f], dtype=torch.float64, device=taps.device) for f in freq)
    v = torch.linalg.svd(_symbol(taps, w1, w2)[0]).Vh[0].conj()
    lead = v[int(v.abs().argmax())]
    v = v * (lead.conj() / lead.abs())  # real where P(w) is real (w = 0 or pi)
    waves = []
    for f, d, n in zip(freq, dilation, size, strict=True):
        x = torch.arange(n, device=taps.device)
        m, count = (x // d).double(), -(-n // d)
        window = torch.sin(math.pi * (m + 1) / (count + 1)) * (x % d == 0)
        waves.append(torch.exp(-1j * f * m) * window)
    return (v[:, None, None] * torch.outer(*waves)).real[None]


def _fan_in_bound(shape: Sequence[int]) -> float:
    """``1/sqrt(fan_in)`` of a weight of ``shape``: PyTorch's default init draws in +-it."""
    return 1.0 / math.sqrt(math.prod(shape[1:]))


def _default_init(
    shape: tuple[int, ...], bias: bool, generator: torch.Generator | None
) -> tuple[nn.Parameter, nn.Parameter | None]:
    """PyTorch's default weight of ``nn.Linear`` / ``nn.Conv2d``, uniform in +-``_fan_in_bound``;
    the bias starts at 0 (``torch_bias_`` draws PyTorch's)."""
    bound = _fan_in_bound(shape)
    weight = nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound)
    return weight, nn.Parameter(torch.zeros(shape[0])) if bias else None


class Pinnable(nn.Module):
    """A module whose ``weight`` a ``pinned_weights`` scope may take as fixed: it has a content
    stamp, and may hold values derived from the weight for the length of that scope."""

    weight: nn.Parameter

    def _content_stamp(self) -> tuple:
        """A fingerprint of the weight's *content*: no edit, however made, leaves a stale bound.
        It copies the weight to the host (a device synchronisation on a GPU); its bytes, as numpy
        has no bfloat16."""
        w = self.weight.detach()
        raw = w.cpu().contiguous().view(torch.uint8).numpy().tobytes()
        digest = hashlib.blake2b(raw, digest_size=16)
        return (digest.hexdigest(), str(w.dtype), tuple(w.shape))

    def _while_pinned(self, what: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, without autograd, held under ``what`` while a ``pinned_weights`` scope
        pins this module and freed when it ends; outside one, ``compute()`` each call. Within a
        scope the value is a constant of the fixed weight: no gradient reaches the weight
        through it (an attack differentiates the input only), and a weight edited inside the
        scope keeps the entry's value until it ends (where the edit, unless undone, raises)."""
        pin = _PINS.get(self)
        if pin is None:
            return compute()
        if what not in pin.values:  # a plain tensor even if first asked for in inference mode
            with torch.inference_mode(False), torch.no_grad():
                pin.values[what] = compute()
        return pin.values[what]


class LinearOperator(Pinnable):
    """Base class: a learnable linear map with bias, adjoint and norm information."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    u: torch.Tensor
    sigma_estimate: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self._bound_cache: dict[tuple, Any] = {}

    def _init_power_state(self, shape: tuple[int, ...], generator: torch.Generator | None) -> None:
        u = torch.randn(shape, generator=generator)
        self.register_buffer("u", u / u.norm())
        self.register_buffer("sigma_estimate", torch.zeros(()))

    def matvec(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``A x``, without the bias (named so as not to shadow ``nn.Module.apply(fn)``)."""
        raise NotImplementedError

    def adjoint(
        self, y: torch.Tensor, input_size: tuple[int, int] | None = None
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x + b``, the bias added inside the same kernel."""
        return self._apply_with(self.weight, x, self.bias)

    @torch.no_grad()
    def power_iteration(self, n_iters: int = 1) -> torch.Tensor:
        """Run ``n_iters`` warm-started iterations ``u <- A^T A u / ||A^T A u||``.

        Returns and stores ``sigma_estimate = ||A u||`` (a lower bound of ``||A||_2``). Never
        under autocast: the estimate sets step sizes, so it stays in the weight's precision.
        """
        with autocast_off({self.weight.device.type}):
            return self._power_iteration(n_iters)

    @torch.no_grad()
    def warm_start(self, n_iters: int) -> torch.Tensor:
        """Start the power iteration well and run ``n_iters`` iterations; returns the stored
        estimate (a lower bound of ``||A||_2``). Here: ``power_iteration(n_iters)`` from ``u``."""
        return self.power_iteration(n_iters)

    @torch.no_grad()
    def torch_bias_(self, generator: torch.Generator | None = None) -> None:
        """Draw the bias as PyTorch's ``nn.Linear`` / ``nn.Conv2d`` do (uniform in
        ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``, the weight's bound): the authors' scripts build on
        those layers. No bias: nothing to draw."""
        if self.bias is not None:
            draw = torch.rand(self.bias.shape, generator=generator) * 2 - 1
            self.bias.copy_(draw.to(self.bias) * _fan_in_bound(self.weight.shape))

    @torch.no_grad()
    def rescale_(self, norm: float, n_iters: int) -> torch.Tensor:
        """Scale the weight so that its norm estimate (``warm_start(n_iters)``) is ``norm``: the
        authors' scripts start every constrained operator at norm 1 this way, and then let it
        train freely. The bias is kept; returns the estimate refreshed for the scaled weight."""
        if not (math.isfinite(norm) and norm > 0):
            raise ValueError(f"rescale_: the target norm must be finite and > 0, got {norm}")
        estimate = float(self.warm_start(n_iters))
        if not estimate > 0:
            raise ValueError("rescale_: the operator's norm estimate is 0 (a zero weight)")
        self.weight.mul_(norm / estimate)
        return self.power_iteration(1)

    def _iterate(self, w: torch.Tensor, u: torch.Tensor, n_iters: int) -> torch.Tensor:
        """``n_iters`` normalised steps ``u <- A^T A u / ||A^T A u||``; where ``A^T A u`` is 0 (a
        zero weight) ``u`` is kept, so the estimate is 0, not 0/0, and a later nonzero weight
        is found again (a zero ``u`` would stay zero for ever)."""
        for _ in range(n_iters):
            v = self._apply_with(w, u)
            step = self._adjoint_with(w, v, u.shape)
            norm = step.norm()
            u = torch.where(norm > 0, step / norm.clamp_min(torch.finfo(u.dtype).tiny), u)
        return u

    def _rayleigh(self, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``||A u|| / ||u||`` in float64: a lower bound of ``||A||_2``."""
        ud = u.double()
        return self._apply_with(w.double(), ud).norm() / ud.norm()

    def _power_iteration(self, n_iters: int) -> torch.Tensor:
        w = self.weight.detach()
        u = self._iterate(w, self.u.to(w.dtype), n_iters)
        self.u.copy_(u)
        estimate = self._rayleigh(w, u)
        self.sigma_estimate.copy_(_round_down(estimate, self.sigma_estimate.dtype))
        return self.sigma_estimate

    def sigma_value(self) -> float:
        """``float(sigma_estimate)``; no device synchronisation when ``power_iteration_all`` or an
        earlier call left a host copy that is still current (same buffer object, unchanged
        version counter, so ``load_state_dict``, ``.to()`` and in-place edits all invalidate it).
        A CUDA graph capture must not synchronise: its forward pass reads this copy."""
        value = host_copy(self, "_sigma_host", self.sigma_estimate)
        if value is None:
            value = float(self.sigma_estimate)
            remember_host_copy(self, "_sigma_host", self.sigma_estimate, value)
        return value

    def _apply_with(
        self, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _adjoint_with(self, w: torch.Tensor, y: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _cached(self, what: Hashable, compute: Callable[[], _T]) -> _T:
        """``compute()`` cached under ``what`` until the weight's content changes (entries of
        other weights are dropped on the first miss).

        Looked up under the content stamp, or under the one ``pinned_weights`` took on entry.
        A miss there is checked against the content itself (one hash beside a computation that
        costs far more): a weight edited inside its scope gets the bound of its own content,
        filed under that content, never under the entry's stamp, where it would outlive an edit
        undone before the scope ends (no version counter sees ``.data`` swapped and restored)."""
        pin = _PINS.get(self)
        pinned = None if pin is None else pin.stamp
        key = (pinned if pinned is not None else self._content_stamp(), what)
        cache = self._bound_cache
        if key not in cache and pinned is not None:
            key = (self._content_stamp(), what)
        if key not in cache:
            for stale in [k for k in cache if k[0] != key[0]]:
                del cache[stale]
            cache[key] = compute()
        return cache[key]

    def norm_bound(self, input_size: tuple[int, int] | None = None) -> float:
        """Certified upper bound of ``||A||_2`` (cached until the weight changes); an error for a
        weight with a NaN or infinite entry, which has none."""
        size = None if input_size is None else _pair(input_size)  # a list too: hashable
        return self._cached(("norm", size), lambda: self._checked_norm(size))

    def _checked_norm(self, input_size: tuple[int, int] | None) -> float:
        if not bool(torch.isfinite(self.weight.detach()).all()):
            raise ValueError(
                f"{type(self).__name__} of weight {tuple(self.weight.shape)}: a NaN or infinite "
                "entry; its norm has no bound"
            )
        return self._certified_norm(input_size) * (1.0 + CERTIFICATE_SLACK)

    def _certified_norm(self, input_size: tuple[int, int] | None) -> float:
        raise NotImplementedError  # pragma: no cover - abstract


class DenseOperator(LinearOperator):
    """``A x + b`` for ``x`` of shape ``(N, in_features)``; the certified norm is exact (SVD)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = _default_init((out_features, in_features), bias, generator)
        self._init_power_state((1, in_features), generator)

    def _apply_with(
        self, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.linear(x, w, bias)

    def _adjoint_with(
        self, w: torch.Tensor, y: torch.Tensor, shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        return y @ w

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_with(self.weight, x)

    @torch.no_grad()
    def warm_start(self, n_iters: int) -> torch.Tensor:
        """Power iteration from the top right singular vector (an SVD, cheap at a classifier
        head's size: from a random vector, 20 iterations left a 10 x 128 head 2 % short)."""
        _, _, vh = torch.linalg.svd(self.weight.detach().double(), full_matrices=False)
        self.u.copy_(vh[:1].to(self.u.dtype))
        return self.power_iteration(n_iters)

    def adjoint(self, y: torch.Tensor, input_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``A^T y``; ``input_size`` is accepted for a uniform interface and ignored."""
        return self._adjoint_with(self.weight, y)

    @torch.no_grad()
    def _certified_norm(self, input_size: tuple[int, int] | None = None) -> float:
        return float(torch.linalg.matrix_norm(self.weight.detach().double(), ord=2))


class Conv2dOperator(LinearOperator):
    """2-D convolution (zero padding, groups=1) with its exact adjoint.

    ``input_size`` is the spatial size the operator acts on and the default size for
    ``norm_bound``; ``power_size`` (default ``input_size``) is the grid of the power-iteration
    vector, smaller for speed on large images (the estimate is then a lower bound of the norm at
    ``input_size``; on a larger grid it is one of the norm there, which can exceed it). The
    adjoint of ``y = conv(x)`` is the transposed convolution with the output padding that
    restores ``x``'s size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        input_size: int | tuple[int, int],
        power_size: int | tuple[int, int] | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.input_size = _pair(input_size)
        kh, kw = self.kernel_size
        for axis, n in enumerate(self.input_size):
            reach = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
            if n + 2 * self.padding[axis] < reach:
                raise ValueError(
                    f"Conv2dOperator: input size {self.input_size} with padding {self.padding} "
                    f"is smaller than the kernel's reach {reach}"
                )
        self.weight, self.bias = _default_init((out_channels, in_channels, kh, kw), bias, generator)
        self.power_size = _pair(power_size) if power_size is not None else self.input_size
        self._init_power_state((1, in_channels, *self.power_size), generator)

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """Spatial output size of the convolution for ``input_size``."""
        height, width = (
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(
                input_size, self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )
        return height, width

    def _output_padding(self, input_size: tuple[int, int]) -> tuple[int, int]:
        out = self.output_size(input_size)
        height, width = (
            n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for n, o, s, p, d, k in zip(
                input_size,
                out,
                self.stride,
                self.padding,
                self.dilation,
                self.kernel_size,
                strict=True,
            )
        )
        return height, width

    def _apply_with(
        self, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation)

    def _adjoint_with(self, w: torch.Tensor, y: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        size = (shape[-2], shape[-1])
        return F.conv_transpose2d(
            y, w, None, self.stride, self.padding, self._output_padding(size), 1, self.dilation
        )

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_with(self.weight, x)

    def adjoint(self, y: torch.Tensor, input_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``A^T y`` back onto inputs of ``input_size`` (default: the operator's input size)."""
        size = input_size or self.input_size
        return self._adjoint_with(self.weight, y, size)

    @torch.no_grad()
    def warm_start(self, n_iters: int) -> torch.Tensor:
        """Power iteration from the plane wave at the symbol's peak (``_plane_wave``; plus 1 % of
        the random ``u``, so that no singular direction is missing), ``n_iters`` iterations on
        the top-left ``WARM_GRID`` window of the power grid, the result embedded there (zeros
        elsewhere). The window's operator is a compression of the whole grid's, so the stored
        estimate (the window's Rayleigh quotient) stays a lower bound of ``||A||_2``. From a random
        vector, 20 iterations leave a 64-channel 3x3 convolution 2.4 % below its norm; from the
        plane wave, 0.02 % (64x64) to 0.3 % (8x8). Strided convolutions start from ``u``."""
        if self.stride != (1, 1):
            return self.power_iteration(n_iters)
        with autocast_off({self.weight.device.type}):
            taps = conv_symbol_taps(self._certificate_weight(), self.stride, self.dilation)
            grid = (self.u.shape[-2], self.u.shape[-1])
            window_height, window_width = (
                n if n <= WARM_GRID else max(WARM_GRID, d * (k - 1) + 1)
                for n, d, k in zip(grid, self.dilation, self.kernel_size, strict=True)
            )
            window = (window_height, window_width)
            start = _plane_wave(taps, _symbol_peak(taps), self.dilation, window)
            noise = self.u[..., : window[0], : window[1]].double()
            start = start / start.norm() + 0.01 * noise / noise.norm().clamp_min(1e-300)
            w = self.weight.detach()
            u = self._iterate(w, start.to(w.dtype), n_iters)
            estimate = self._rayleigh(w, u)
            full = torch.zeros_like(self.u)
            full[..., : window[0], : window[1]] = u / u.norm()
            self.u.copy_(full)
            self.sigma_estimate.copy_(_round_down(estimate, self.sigma_estimate.dtype))
        return self.sigma_estimate

    def _certificate_weight(self) -> torch.Tensor:
        """The float64 kernel whose zero-padded convolution ``matvec`` computes."""
        return self.weight.detach().to(torch.float64)

    @torch.no_grad()
    def _certified_norm(self, input_size: tuple[int, int] | None) -> float:
        """The smallest of the bounds computed (module docstring): the circulant bound on small
        grids, else the torus bound (cached per weight: no grid size enters it); the torus bound
        also for a strided convolution (the circulant bound ignores the stride, the torus bound
        does not). A stride-1 circulant bound is a maximum over some frequencies, so it never
        exceeds the sup ``S``, and the torus bound (at least ``S``) cannot improve on it. Then
        the dense bound on small operators."""
        n = _pair(input_size) if input_size is not None else self.input_size
        w = self._certificate_weight()
        circulant = self._circulant_norm(w, n)
        if circulant is None or self.stride != (1, 1):
            bound, peak = self._cached(
                "torus", lambda: torus_norm_bound(conv_symbol_taps(w, self.stride, self.dilation))
            )
            if circulant is not None and circulant[0] < bound:
                bound, peak = circulant
        else:
            bound, peak = circulant
        if self.in_channels * n[0] * n[1] <= DENSE_CERTIFICATE_MAX_DIM:
            bound = self._dense_refinement(w, n, bound, peak)
        return bound

    def _circulant_norm(
        self, w: torch.Tensor, n: tuple[int, int]
    ) -> tuple[float, tuple[float, float]] | None:
        """``max_j sigma_max(K_hat(w_j))`` over the DFT frequencies of the enlarged grid ``N`` per
        axis (module docstring) and the maximising frequency (of the undilated symbol), ``None``
        when that grid has too many frequencies. The dilated kernel's symbol at ``2 pi j / N``
        is the undilated one's at ``2 pi j d / N``."""
        out = self.output_size(n)
        grid = []
        for ni, oi, p, d, k, s in zip(
            n, out, self.padding, self.dilation, self.kernel_size, self.stride, strict=True
        ):
            reach = d * (k - 1)
            high = (oi - 1) * s - p + reach - (ni - 1)  # padding read past the input's end
            grid.append(ni + max(0, min(p, reach), min(high, reach)))
        if grid[0] * (grid[1] // 2 + 1) > CIRCULANT_MAX_FREQUENCIES:
            return None
        taps = conv_symbol_taps(w, (1, 1), (1, 1))
        j1 = torch.arange(grid[0], dtype=torch.float64, device=w.device)
        j2 = torch.arange(grid[1] // 2 + 1, dtype=torch.float64, device=w.device)
        g1, g2 = torch.meshgrid(
            j1 * (2 * math.pi * self.dilation[0] / grid[0]),
            j2 * (2 * math.pi * self.dilation[1] / grid[1]),
            indexing="ij",
        )
        g1, g2 = g1.reshape(-1), g2.reshape(-1)
        lam = _symbol_top(taps, g1, g2)
        best = int(lam.argmax())
        return math.sqrt(max(float(lam[best]), 0.0)), (float(g1[best]), float(g2[best]))

    def _dense_refinement(
        self, w: torch.Tensor, n: tuple[int, int], bound: float, peak: tuple[float, float]
    ) -> float:
        """Tighten ``bound``: if the float64 Cholesky factorisation of ``s^2 I - A^T A`` exists,
        then ``||A|| <= s``. ``s`` is a Lanczos estimate (``_lanczos_top``, from the plane wave at
        the symbol's ``peak`` plus 1 % of a seeded random vector; the random vector alone for a
        strided convolution) inflated by ``_DENSE_MARGINS`` in turn; nothing is built when the
        first candidate is not below ``bound``. ``A^T A = sum_y E_y^T (W^T W) E_y`` over the
        outputs ``y`` (``E_y`` the patch that ``y`` reads, ``W`` the kernel as a
        ``C_out x C_in k1 k2`` matrix). The convolutions are the base class's: ``w`` is already
        the effective kernel (an AOL rescaling included)."""
        dim = self.in_channels * n[0] * n[1]
        noise = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        start = noise.to(w.device) / math.sqrt(dim)  # all directions present, deterministic
        if self.stride == (1, 1):
            wave = _plane_wave(conv_symbol_taps(w, (1, 1), (1, 1)), peak, self.dilation, n)
            start = wave.reshape(-1) / wave.norm() + 0.01 * start

        def gram_apply(x: torch.Tensor) -> torch.Tensor:
            y = Conv2dOperator._apply_with(self, w, x.view(1, self.in_channels, *n))
            return Conv2dOperator._adjoint_with(self, w, y, (1, self.in_channels, *n)).reshape(-1)

        s = math.sqrt(max(_lanczos_top(gram_apply, start, _DENSE_LANCZOS_STEPS), 0.0))
        candidates = [s * (1 + m) for m in _DENSE_MARGINS if s * (1 + m) < bound]
        if not candidates:
            return bound
        # Patch indices (+1, so that the padding reads index 0, a dummy row and column).
        index = torch.arange(1, dim + 1, dtype=torch.float64, device=w.device)
        patches = F.unfold(
            index.view(1, self.in_channels, *n),
            self.kernel_size,
            self.dilation,
            self.padding,
            self.stride,
        )[0].long()  # (C_in k1 k2, outputs)
        wmat = w.reshape(w.shape[0], -1)
        patch_gram = wmat.T @ wmat
        gram = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=w.device)
        for col in patches.T:
            gram.index_put_((col[:, None], col[None, :]), patch_gram, accumulate=True)
        gram = gram[1:, 1:]
        eye = torch.eye(dim, dtype=torch.float64, device=w.device)
        for candidate in candidates:
            if int(torch.linalg.cholesky_ex(candidate**2 * eye - gram).info) == 0:
                return candidate
        return bound


def _lanczos_top(
    gram_apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int
) -> float:
    """Largest Ritz value of ``G`` (symmetric positive semi-definite, given by ``gram_apply``) on
    the Krylov space of ``start`` (Lanczos with full re-orthogonalisation): a lower estimate of
    ``lambda_max(G)``, far closer than a power iteration of as many products when the top of
    the spectrum is clustered. Only a candidate for the Cholesky test, never a certificate."""
    basis = [start / start.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(min(steps, start.numel())):
        z = gram_apply(basis[-1])
        alphas.append(float(basis[-1] @ z))
        stack = torch.stack(basis)
        for _ in range(2):  # full re-orthogonalisation, twice is enough
            z = z - stack.T @ (stack @ z)
        beta = float(z.norm())
        if beta <= 1e-12 * math.sqrt(sum(a * a for a in alphas)):
            break
        betas.append(beta)
        basis.append(z / beta)
    m = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(tri)[-1])


def _fusion_key(op: Conv2dOperator) -> tuple:
    w = op.weight
    return (
        tuple(w.shape),
        tuple(op.u.shape),
        op.stride,
        op.padding,
        op.dilation,
        w.dtype,
        w.device,
    )


@torch.no_grad()
def _grouped_power_iteration(ops: list[Conv2dOperator], n_iters: int) -> torch.Tensor:
    """``power_iteration(n_iters)`` of ``G`` identically shaped convolutions as one grouped
    convolution (and one grouped transposed convolution) per iteration; returns the stored
    (rounded-down) estimates, one per operator."""
    first, g = ops[0], len(ops)
    w = torch.cat([op.weight.detach() for op in ops])  # (G C_out, C_in, kh, kw)
    u = torch.cat([op.u for op in ops], dim=1).to(w.dtype)  # (1, G C_in, h, w)
    pad = first._output_padding((first.u.shape[-2], first.u.shape[-1]))
    tiny = torch.finfo(u.dtype).tiny
    for _ in range(n_iters):
        v = F.conv2d(u, w, None, first.stride, first.padding, first.dilation, g)
        step = F.conv_transpose2d(v, w, None, first.stride, first.padding, pad, g, first.dilation)
        flat = step.reshape(g, -1)  # reshape: u may be channels_last
        norms = flat.norm(dim=1, keepdim=True)
        kept = torch.where(norms > 0, flat / norms.clamp_min(tiny), u.reshape(g, -1))  # _iterate
        u = kept.reshape(u.shape)
    ud = u.double()
    # ||A u|| in float64 as one batched matrix product over the G patch matrices (cuDNN runs a
    # float64 grouped convolution as G slow kernels: 0.7 ms per step for the paper classifier).
    cols = F.unfold(ud, w.shape[-2:], first.dilation, first.padding, first.stride)
    av = torch.bmm(w.double().reshape(g, w.shape[0] // g, -1), cols.reshape(g, -1, cols.shape[-1]))
    estimate = av.reshape(g, -1).norm(dim=1) / ud.reshape(g, -1).norm(dim=1)
    stored = _round_down(estimate, first.sigma_estimate.dtype)
    # One fused copy per buffer kind; torch does not re-export its private _foreach_* ops.
    foreach_copy = torch._foreach_copy_  # pyright: ignore[reportPrivateImportUsage]
    foreach_copy([op.u for op in ops], list(u.split(first.u.shape[1], dim=1)))
    foreach_copy([op.sigma_estimate for op in ops], list(stored.unbind()))
    return stored


@dataclasses.dataclass
class _Pin:
    """A pinned module's content stamp on entry, and its values held for the scope."""

    stamp: tuple
    values: dict[Hashable, torch.Tensor] = dataclasses.field(default_factory=dict)


# The modules pinned by a live ``pinned_weights`` scope, with their pins: held outside the
# modules, so that a copy (``copy.deepcopy``, ``torch.save``) made inside a scope is not pinned.
_PINS: weakref.WeakKeyDictionary[Pinnable, _Pin] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def pinned_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Take the weights of ``model``'s ``Pinnable`` modules as fixed within this scope (an
    attack, a PnP run).

    A certified bound is cached under a hash of the weight's content, so every ``eval()`` forward
    pass hashes every block's weight: a copy to the host and, on a GPU, a device synchronisation
    per block that stops the host from queueing kernels ahead. Here the hash is taken once on
    entry and reused; on exit it is taken again, and a weight changed inside the scope raises
    ``RuntimeError`` naming it, since bounds looked up after the change may have been stale.
    A bound first computed inside the scope is filed under the content it was computed for
    (``LinearOperator._cached``), so an edit put back before the exit leaves no stale bound
    behind. Values a module derives from its weight alone may be held for the scope
    (``Pinnable._while_pinned``: an orthogonal convolution's Cayley transform, a float64 solve
    per frequency, taken once instead of at every pass) and are freed on exit. Modules already
    pinned by an enclosing scope are left to it."""
    ours = [
        (name, op)
        for name, op in model.named_modules()
        if isinstance(op, Pinnable) and op not in _PINS
    ]
    pins = {op: _Pin(op._content_stamp()) for _, op in ours}
    _PINS.update(pins)
    try:
        yield model
    finally:  # unpinned whatever happened: an error of the body passes unchanged
        held = [v for pin in pins.values() for v in pin.values.values()]
        if any(v.is_cuda for v in held):  # kernels queued on any stream may still read them
            torch.cuda.synchronize()
        for op in pins:
            del _PINS[op]
    changed = [name for name, op in ours if op._content_stamp() != pins[op].stamp]
    if changed:
        raise RuntimeError(
            f"weights of {', '.join(changed)} changed inside pinned_weights(): certified bounds "
            "used there may be stale"
        )


def held_values(model: nn.Module) -> list[torch.Tensor]:
    """The values live ``pinned_weights`` scopes hold for ``model``'s modules
    (``Pinnable._while_pinned``). A CUDA graph captured over them reads their memory: it keeps
    them alive beyond the scope (its weights unchanged, they stay the scope's values)."""
    pins = [_PINS.get(m) for m in model.modules() if isinstance(m, Pinnable)]
    return [v for pin in pins if pin is not None for v in pin.values.values()]


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Float32 at its full precision on a GPU within: no TF32 in convolutions (PyTorch's default
    there, about 1e-3 relative rounding) nor in matrix products, as before on exit. Certificates
    (the margins) and the judgement of every adversarial example run so: the certified bound
    holds for the network's arithmetic, and a judge in TF32 could flip a point the certificate
    covers, failing the job's invariants on rounding alone. Attacks search as they are set."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


@contextlib.contextmanager
def autocast_off(device_types: set[str]) -> Iterator[None]:
    """Disable autocast on these device types (norm estimates and rescalings stay in the
    weight's precision inside a mixed-precision forward)."""
    with contextlib.ExitStack() as stack:
        for kind in device_types:
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield


def power_iteration_all(operators: list[LinearOperator], n_iters: int = 1) -> list[float]:
    """``op.power_iteration(n_iters)`` for every operator, fused: identically shaped convolutions
    (the blocks of one stage) share one grouped convolution per iteration, and all estimates
    reach the host in one synchronisation. The same maths as the per-operator method (each
    estimate ``||A u|| / ||u||`` in float64, rounded down: a lower bound); only the order of
    floating-point reductions may differ. Returns the estimates as floats and leaves a host copy
    that ``sigma_value()`` reads without synchronising."""
    return remember_estimates(*fused_power_iteration(operators, n_iters))


# What ``fused_power_iteration`` returns: ``(operators, order, estimates)``.
FusedEstimates = tuple[list[LinearOperator], list[LinearOperator], torch.Tensor | None]


@torch.no_grad()
def fused_power_iteration(operators: list[LinearOperator], n_iters: int = 1) -> FusedEstimates:
    """The device part of ``power_iteration_all``: updates every ``u`` and ``sigma_estimate`` in
    place and returns ``(operators, order, estimates)``, the estimates (float64, in ``order``)
    still on the device. Nothing here synchronises, so a CUDA graph can hold it."""
    with autocast_off({op.weight.device.type for op in operators}):
        return _fused_power_iteration(operators, n_iters)


def remember_estimates(
    operators: list[LinearOperator], order: list[LinearOperator], estimates: torch.Tensor | None
) -> list[float]:
    """The host part: the estimates of ``fused_power_iteration`` in one synchronisation, kept
    as host copies for ``sigma_value()`` and returned in the order of ``operators``."""
    if estimates is None:
        return []
    host = estimates.tolist()  # one synchronisation
    for op, value in zip(order, host, strict=True):
        remember_host_copy(op, "_sigma_host", op.sigma_estimate, value)
    by_id = {id(op): value for op, value in zip(order, host, strict=True)}
    return [by_id[id(op)] for op in operators]


def _fused_power_iteration(operators: list[LinearOperator], n_iters: int) -> FusedEstimates:
    groups: dict[tuple, list[Conv2dOperator]] = {}
    singles: list[LinearOperator] = []
    for op in operators:
        if type(op) is Conv2dOperator:  # exactly: subclasses rescale their kernel
            groups.setdefault(_fusion_key(op), []).append(op)
        else:
            singles.append(op)
    order: list[LinearOperator] = []
    values: list[torch.Tensor] = []
    for ops in groups.values():
        if len(ops) == 1:
            singles.append(ops[0])
            continue
        values.append(_grouped_power_iteration(ops, n_iters).double())
        order += ops
    for op in singles:
        values.append(op.power_iteration(n_iters).double().reshape(1))
        order.append(op)
    if not order:
        return operators, order, None
    return operators, order, torch.cat([v.to(values[0].device) for v in values])
