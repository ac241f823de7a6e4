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

import hashlib
import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LinearOperator", "DenseOperator", "Conv2dOperator", "CERTIFICATE_SLACK"]

# Relative inflation of every certified norm, covering the float64 eigen-solver's rounding.
CERTIFICATE_SLACK = 1e-9
# Frequency-chunk size (complex entries) of the convolution certificate; bounds its memory.
_CHUNK_ELEMENTS = 1 << 22
# Operators with at most this many inputs also get the dense (Cholesky) certificate, which is
# tight where the circulant bound is loose (small grids: 8x8 at 64 channels is 2-3% loose).
DENSE_CERTIFICATE_MAX_DIM = 4096
_DENSE_POWER_ITERS = 300
_DENSE_MARGINS = (1e-4, 1e-3, 1e-2)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


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
        y = self.apply(x)
        return y if self.bias is None else y + self._bias_view()

    def _bias_view(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def power_iteration(self, n_iters: int = 1) -> torch.Tensor:
        """Run ``n_iters`` warm-started iterations ``u <- A^T A u / ||A^T A u||``.

        Returns and stores ``sigma_estimate = ||A u||`` (a lower bound of ``||A||_2``).
        """
        w = self.weight.detach()
        u = self.u.to(w.dtype)
        for _ in range(n_iters):
            v = self._apply_with(w, u)
            u = self._adjoint_with(w, v, u.shape)
            u = u / u.norm().clamp_min(torch.finfo(u.dtype).tiny)
        self.u.copy_(u)
        estimate = self._apply_with(w.double(), u.double()).norm() / u.double().norm()
        stored = estimate.to(self.sigma_estimate.dtype)
        if stored.double() > estimate:  # round down: the estimate stays a lower bound
            stored = torch.nextafter(stored, torch.zeros_like(stored))
        self.sigma_estimate.copy_(stored)
        return self.sigma_estimate

    def _apply_with(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
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

    def _apply_with(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x @ w.t()

    def _adjoint_with(self, w: torch.Tensor, y: torch.Tensor, shape=None) -> torch.Tensor:
        return y @ w

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_with(self.weight, x)

    def adjoint(self, y: torch.Tensor, input_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``A^T y``; ``input_size`` is accepted for a uniform interface and ignored."""
        return self._adjoint_with(self.weight, y)

    def _bias_view(self) -> torch.Tensor:
        return self.bias

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

    def _apply_with(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)

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

    def _bias_view(self) -> torch.Tensor:
        return self.bias.view(1, -1, 1, 1)

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
