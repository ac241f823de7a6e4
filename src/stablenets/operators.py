"""Linear operators with adjoints and two kinds of spectral-norm information.

Every operator ``A`` offers ``forward`` (``A x + b``), ``apply`` (bias-free ``A x``) and
``adjoint`` (``A^T y``), plus

* ``power_iteration(n)``: a warm-started power iteration on ``A^T A`` whose vector ``u`` is a
  persistent buffer (saved in ``state_dict``, moved by ``.to()``). Cheap enough for every training
  step, but a *lower* bound of ``||A||_2``: it drives step sizes in training, never a certificate.
* ``norm_bound(input_size)``: a *certified upper* bound of ``||A||_2`` for inputs of the given
  spatial size, recomputed whenever the weight changes (keyed on a hash of the weight's content,
  so ``load_state_dict``, in-place edits and ``.data`` assignments are all seen).

For a 2-D convolution the bound is the exact norm of the circular convolution on the grid enlarged
by the kernel's reach, ``N = n + d (k - 1)`` per axis: the zero-padded convolution of an ``n``-sized
input is a row selection of the full linear convolution, which is a compression of that circular
one, so ``||A|| <= max_w sigma_max(K_hat(w))`` over the ``N``-point DFT frequencies ``w``. A stride
is a further row selection and only lowers the norm.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "Conv2dOperator",
    "CERTIFICATE_SLACK",
    "power_iteration_all",
]

# Relative inflation of every certified norm, covering the float64 eigen-solver's rounding.
CERTIFICATE_SLACK = 1e-9
# Frequency-chunk size (complex entries) of the convolution certificate; bounds its memory.
_CHUNK_ELEMENTS = 1 << 22
# Operators with at most this many inputs also get the dense (Cholesky) certificate, which is
# tight where the circulant bound is loose (small grids: 8x8 at 64 channels is 2-3% loose). Its
# cost grows as the cube of the input count: at 4096 inputs building the paper's classifier took
# 51 s instead of 0.5 s on one CPU thread for the same whole-network bound, hence the cut-off.
DENSE_CERTIFICATE_MAX_DIM = 1024
_DENSE_POWER_ITERS = 300
_DENSE_MARGINS = (1e-4, 1e-3, 1e-2)


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


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _round_down(estimate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``estimate`` (float64) cast to ``dtype``, rounded towards zero so that it stays a lower
    bound; elementwise and without a host synchronisation."""
    stored = estimate.to(dtype)
    return torch.where(
        stored.double() > estimate, torch.nextafter(stored, torch.zeros_like(stored)), stored
    )


class LinearOperator(nn.Module):
    """Base class: a learnable linear map with bias, adjoint and norm information."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    u: torch.Tensor
    sigma_estimate: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self._bound_cache: dict[tuple, float] = {}

    def _init_power_state(self, shape: tuple[int, ...], generator: torch.Generator | None) -> None:
        u = torch.randn(shape, generator=generator)
        self.register_buffer("u", u / u.norm())
        self.register_buffer("sigma_estimate", torch.zeros(()))

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
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

    def _power_iteration(self, n_iters: int) -> torch.Tensor:
        w = self.weight.detach()
        u = self.u.to(w.dtype)
        for _ in range(n_iters):
            v = self._apply_with(w, u)
            u = self._adjoint_with(w, v, u.shape)
            u = u / u.norm().clamp_min(torch.finfo(u.dtype).tiny)
        self.u.copy_(u)
        estimate = self._apply_with(w.double(), u.double()).norm() / u.double().norm()
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

    def _adjoint_with(self, w: torch.Tensor, y: torch.Tensor, shape) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def _stamp(self) -> tuple:
        """A fingerprint of the weight's *content*: no edit, however made, leaves a stale bound."""
        w = self.weight.detach()
        digest = hashlib.blake2b(w.cpu().contiguous().numpy().tobytes(), digest_size=16)
        return (digest.hexdigest(), str(w.dtype), tuple(w.shape))

    def norm_bound(self, input_size: tuple[int, int] | None = None) -> float:
        """Certified upper bound of ``||A||_2`` (cached until the weight changes)."""
        key = (self._stamp(), input_size)
        if key not in self._bound_cache:
            self._bound_cache.clear()
            exact = self._certified_norm(input_size)
            self._bound_cache[key] = exact * (1.0 + CERTIFICATE_SLACK)
        return self._bound_cache[key]

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
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        w = (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._init_power_state((1, in_features), generator)

    def _apply_with(
        self, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.linear(x, w, bias)

    def _adjoint_with(self, w: torch.Tensor, y: torch.Tensor, shape=None) -> torch.Tensor:
        return y @ w

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_with(self.weight, x)

    def adjoint(self, y: torch.Tensor, input_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``A^T y``; ``input_size`` is accepted for a uniform interface and ignored."""
        return self._adjoint_with(self.weight, y)

    @torch.no_grad()
    def _certified_norm(self, input_size=None) -> float:
        return float(torch.linalg.matrix_norm(self.weight.detach().double(), ord=2))


class Conv2dOperator(LinearOperator):
    """2-D convolution (zero padding, groups=1) with its exact adjoint.

    ``input_size`` is the spatial size the operator acts on and the default size for
    ``norm_bound``; ``power_size`` (default ``input_size``) is the grid of the power-iteration
    vector, smaller for speed on large images (the estimate is a lower bound either way). The
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
    ):
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
        bound = 1.0 / math.sqrt(in_channels * kh * kw)
        w = (torch.rand(out_channels, in_channels, kh, kw, generator=generator) * 2 - 1) * bound
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.power_size = _pair(power_size) if power_size is not None else self.input_size
        self._init_power_state((1, in_channels, *self.power_size), generator)

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """Spatial output size of the convolution for ``input_size``."""
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(
                input_size, self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )

    def _output_padding(self, input_size: tuple[int, int]) -> tuple[int, int]:
        out = self.output_size(input_size)
        return tuple(
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

    def _apply_with(
        self, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation)

    def _adjoint_with(self, w: torch.Tensor, y: torch.Tensor, shape) -> torch.Tensor:
        size = tuple(shape[-2:])
        return F.conv_transpose2d(
            y, w, None, self.stride, self.padding, self._output_padding(size), 1, self.dilation
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_with(self.weight, x)

    def adjoint(self, y: torch.Tensor, input_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``A^T y`` back onto inputs of ``input_size`` (default: the operator's input size)."""
        size = input_size or self.input_size
        return self._adjoint_with(self.weight, y, size)

    @torch.no_grad()
    def _certified_norm(self, input_size: tuple[int, int] | None) -> float:
        """``max_w sigma_max(K_hat(w))`` over the DFT grid ``N = n + d (k - 1)``, in float64.

        ``K_hat(w) = sum_{a,b} W[:, :, a, b] exp(-i (w_1 d_1 a + w_2 d_2 b))`` is evaluated directly
        from the taps in chunks of frequency rows (memory stays small for 321x481 images); a real
        kernel has ``K_hat(-w) = conj(K_hat(w))``, so half of the second axis suffices.
        """
        n = _pair(input_size) if input_size is not None else self.input_size
        w = self.weight.detach().to(torch.float64)
        grid = [
            ni + d * (k - 1) for ni, d, k in zip(n, self.dilation, self.kernel_size, strict=True)
        ]
        phases = [
            torch.exp(
                -2j
                * math.pi
                * torch.outer(torch.arange(count, dtype=torch.float64), d * torch.arange(k))
                / N
            ).to(w.device)
            for count, N, d, k in zip(
                (grid[0], grid[1] // 2 + 1), grid, self.dilation, self.kernel_size, strict=True
            )
        ]
        wc = w.to(torch.complex128)
        c_out, c_in = w.shape[:2]
        rows = max(1, _CHUNK_ELEMENTS // (phases[1].shape[0] * c_out * c_in))
        top = torch.zeros((), dtype=torch.float64, device=w.device)
        for start in range(0, grid[0], rows):
            symbol = torch.einsum(
                "fa,gb,oiab->fgoi", phases[0][start : start + rows], phases[1], wc
            )
            gram = symbol.mH @ symbol if c_out >= c_in else symbol @ symbol.mH
            top = torch.maximum(top, torch.linalg.eigvalsh(gram)[..., -1].max())
        circulant = float(top.clamp_min(0.0).sqrt())
        return self._dense_refinement(n, circulant)

    @torch.no_grad()
    def _dense_refinement(self, n: tuple[int, int], bound: float) -> float:
        """Tighten ``bound`` on small operators: if the Cholesky factorisation of
        ``s^2 I - A^T A`` (float64, dense) exists, then ``||A|| <= s``. ``s`` is a converged power
        iteration inflated by ``_DENSE_MARGINS`` in turn; the circulant bound stays otherwise."""
        dim = self.in_channels * n[0] * n[1]
        if dim > DENSE_CERTIFICATE_MAX_DIM:
            return bound
        w = self.weight.detach().to(torch.float64)
        basis = torch.eye(dim, dtype=torch.float64, device=w.device).view(dim, -1, *n)
        at = self._apply_with(w, basis).reshape(dim, -1)  # rows A e_i: the matrix A^T
        gram = at @ at.T
        v = torch.ones(dim, dtype=torch.float64, device=w.device)
        for _ in range(_DENSE_POWER_ITERS):
            v = gram @ v
            v = v / v.norm()
        s = float((v @ gram @ v).clamp_min(0).sqrt())
        eye = torch.eye(dim, dtype=torch.float64, device=w.device)
        for margin in _DENSE_MARGINS:
            candidate = s * (1 + margin)
            if candidate >= bound:
                break
            if int(torch.linalg.cholesky_ex(candidate**2 * eye - gram).info) == 0:
                return candidate
        return bound


def _fusion_key(op: LinearOperator) -> tuple | None:
    if type(op) is not Conv2dOperator:
        return None
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
    pad = first._output_padding(tuple(first.u.shape[-2:]))
    conv = dict(stride=first.stride, padding=first.padding, dilation=first.dilation, groups=g)
    tiny = torch.finfo(u.dtype).tiny
    for _ in range(n_iters):
        v = F.conv2d(u, w, None, **conv)
        u = F.conv_transpose2d(v, w, None, first.stride, first.padding, pad, g, first.dilation)
        norms = u.reshape(g, -1).norm(dim=1).clamp_min(tiny)  # reshape: u may be channels_last
        u = (u.reshape(g, -1) / norms[:, None]).reshape(u.shape)
    ud = u.double()
    # ||A u|| in float64 as one batched matrix product over the G patch matrices (cuDNN runs a
    # float64 grouped convolution as G slow kernels: 0.7 ms per step for the paper classifier).
    cols = F.unfold(ud, w.shape[-2:], first.dilation, first.padding, first.stride)
    av = torch.bmm(w.double().reshape(g, w.shape[0] // g, -1), cols.reshape(g, -1, cols.shape[-1]))
    estimate = av.reshape(g, -1).norm(dim=1) / ud.reshape(g, -1).norm(dim=1)
    stored = _round_down(estimate, first.sigma_estimate.dtype)
    torch._foreach_copy_([op.u for op in ops], list(u.split(first.u.shape[1], dim=1)))
    torch._foreach_copy_([op.sigma_estimate for op in ops], list(stored.unbind()))
    return stored


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


@torch.no_grad()
def fused_power_iteration(
    operators: list[LinearOperator], n_iters: int = 1
) -> tuple[list[LinearOperator], list[LinearOperator], torch.Tensor | None]:
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


def _fused_power_iteration(operators: list[LinearOperator], n_iters: int):
    groups: dict[tuple, list[LinearOperator]] = {}
    singles: list[LinearOperator] = []
    for op in operators:
        key = _fusion_key(op)
        if key is None:
            singles.append(op)
        else:
            groups.setdefault(key, []).append(op)
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
