"""Explicit Runge–Kutta integrators given by Butcher tableaux, and their contractivity radius.

A block integrates ``dx/dt = f(x) = -A^T sigma(A x + b)``. When ``sigma`` is monotone and
``L``-Lipschitz, ``f`` satisfies the circle condition with ``nu = L ||A||^2 / 2``, and an explicit
RK method is non-expansive on such fields when ``h nu <= R``, where ``R`` is the method's radius of
nonlinear circle contractivity. That radius equals the threshold factor (radius of absolute
monotonicity) of Kraaijevanger (1991), computed here from the tableau by bisection:

    R = sup { r >= 0 : (I + r K)^{-1} exists, K (I + r K)^{-1} >= 0, r K (I + r K)^{-1} e <= e }

with ``K = [[A, 0], [b^T, 0]]`` and ``e`` the vector of ones (componentwise inequalities).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "ButcherTableau",
    "threshold_factor",
    "compose_averaged",
    "get_integrator",
    "INTEGRATORS",
]

_BISECTION_TOL = 1e-12
_NONNEG_TOL = 1e-14
_SNAP_DIGITS = 9


def _absolutely_monotone_at(K: np.ndarray, r: float) -> bool:
    """Kraaijevanger's conditions for absolute monotonicity at ``r``."""
    n = K.shape[0]
    if r == 0.0:
        return bool(np.all(K >= -_NONNEG_TOL))
    M = np.eye(n) + r * K
    try:
        P = K @ np.linalg.inv(M)
    except np.linalg.LinAlgError:
        return False
    return bool(np.all(P >= -_NONNEG_TOL) and np.all(r * P @ np.ones(n) <= 1 + _NONNEG_TOL))


def threshold_factor(A: np.ndarray, b: np.ndarray, r_max: float | None = None) -> float:
    """Radius of absolute monotonicity ``R`` of an explicit RK method (bisection on ``r``).

    For explicit methods ``R`` is at most the number of stages, which bounds the search.
    """
    s = len(b)
    K = _stage_matrix(np.asarray(A, dtype=np.float64), np.asarray(b, dtype=np.float64))
    if not _absolutely_monotone_at(K, 0.0):
        return 0.0
    hi = float(r_max if r_max is not None else s + 1)
    if _absolutely_monotone_at(K, hi):
        return hi
    lo = 0.0
    while hi - lo > _BISECTION_TOL:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _absolutely_monotone_at(K, mid) else (lo, mid)
    snapped = round(lo, _SNAP_DIGITS)  # exact rational radii (1, 2, ...) come out exactly
    return snapped if snapped >= lo and _absolutely_monotone_at(K, snapped) else lo


def compose_averaged(a1: float, a2: float) -> float:
    """Averagedness of ``T1 o T2`` for ``a_i``-averaged ``T_i`` (Combettes & Yamada 2015).

    ``alpha = (a1 + a2 - 2 a1 a2) / (1 - a1 a2)``, valid for ``a1, a2`` in [0, 1); 1 (merely
    non-expansive) where either is 1.
    """
    if a1 >= 1 or a2 >= 1:
        return 1.0
    return (a1 + a2 - 2 * a1 * a2) / (1 - a1 * a2)


def _stage_matrix(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``K = [[A, 0], [b^T, 0]]``: the stages and the step's result as rows."""
    s = len(b)
    K = np.zeros((s + 1, s + 1))
    K[:s, :s] = A
    K[s, :s] = b
    return K


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method ``(A, b)``; ``c`` follows from the row sums of ``A``.

    ``radius`` is the threshold factor computed from the tableau (the nonlinear circle
    contractivity radius: the step rule ``h nu <= radius`` makes a step non-expansive).
    ``step_radius`` is the radius the adaptive step rule uses: equal to ``radius`` when positive,
    else 1 as in the paper's scripts (classical RK4, explicit midpoint); then nothing guarantees
    non-expansiveness and models fall back to a stage-wise Lipschitz bound.
    """

    name: str
    A: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    radius: float = field(init=False)

    def __post_init__(self) -> None:
        A = np.asarray(self.A, dtype=np.float64)
        if A.shape != (len(self.b), len(self.b)) or np.any(np.triu(A) != 0):
            raise ValueError(f"integrator {self.name!r}: A must be strictly lower triangular s x s")
        object.__setattr__(self, "radius", threshold_factor(A, np.asarray(self.b)))

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def step_radius(self) -> float:
        return self.radius if self.radius > 0 else 1.0

    def step(
        self, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, h: float | torch.Tensor
    ) -> torch.Tensor:
        """One step ``x + h sum_i b_i k_i`` with ``k_i = f(x + h sum_j a_ij k_j)``."""
        ks: list[torch.Tensor] = []
        for i in range(self.stages):
            xi = x
            for j, a in enumerate(self.A[i][:i]):
                if a != 0:
                    xi = xi + _times(h, a) * ks[j]
            ks.append(f(xi))
        out = x
        for bi, k in zip(self.b, ks, strict=True):
            if bi != 0:
                out = out + _times(h, bi) * k
        return out

    def averagedness(self, h_nu: float) -> float | None:
        """``alpha`` such that one step of size ``h`` is alpha-averaged on every field
        ``-grad(phi)``, ``phi`` convex with an ``ell``-Lipschitz gradient, ``h_nu = h ell / 2``;
        ``None`` where that is not below 1, or where the radius ``R`` is 0.

        The canonical Shu–Osher form at ``R`` writes each stage as a convex combination of ``x``
        and Euler steps of size ``h / R`` from earlier stages (``K (I + R K)^{-1} >= 0`` is what
        ``R`` certifies, module docstring):

            Y_i = d_i x + sum_j R P_ij E(Y_j),   P = K (I + R K)^{-1},  d = (I + R K)^{-1} e,

        with ``E = I - (h / R) grad(phi)`` ``(h nu / R)``-averaged (Baillon–Haddad). A composition
        is averaged with ``compose_averaged``'s constant, a convex combination with the weighted
        sum of its parts' (the identity's 0; Combettes & Yamada 2015). Euler: ``h nu``; Heun:
        ``x/2 + E(E(x))/2``, half of two Euler steps composed (1/2 even at ``h nu = 1``).
        """
        if self.radius <= 0:
            return None
        a_euler = h_nu / self.radius
        if not 0 <= a_euler <= 1:
            return None
        K = _stage_matrix(np.asarray(self.A), np.asarray(self.b))
        weights = np.clip(self.radius * K @ np.linalg.inv(np.eye(len(K)) + self.radius * K), 0, 1)
        alphas: list[float] = []
        for row in weights:
            alphas.append(sum(w * compose_averaged(a_euler, alphas[j])
                              for j, w in enumerate(row[: len(alphas)]) if w > 0))  # fmt: skip
        return float(alphas[-1]) if alphas[-1] < 1 else None

    def stagewise_lipschitz(self, h_ell: float) -> float:
        """Sound Lipschitz bound of one step when ``f`` is ``ell``-Lipschitz (``h_ell = h ell``).

        ``Lip(Y_i) <= 1 + h ell sum_j |a_ij| Lip(Y_j)`` and ``Lip(step) <= 1 + h ell sum_i |b_i|
        Lip(Y_i)``; used where the circle-contractivity argument does not apply.
        """
        lips: list[float] = []
        for i in range(self.stages):
            lips.append(1.0 + h_ell * sum(abs(a) * lips[j] for j, a in enumerate(self.A[i][:i])))
        return 1.0 + h_ell * sum(abs(bi) * li for bi, li in zip(self.b, lips, strict=True))


def _times(h: float | torch.Tensor, c: float) -> float | torch.Tensor:
    """``h c``, without a kernel launch for ``c = 1`` when ``h`` is a device tensor (a CUDA
    graph's step size); for a float ``h * 1.0`` is ``h`` exactly, so nothing changes."""
    return h if c == 1 else h * c


def _tableau(name: str, A: list[list[float]], b: list[float]) -> ButcherTableau:
    s = len(b)
    full = tuple(tuple(float(v) for v in row + [0.0] * (s - len(row))) for row in A)
    return ButcherTableau(name, full, tuple(float(v) for v in b))


INTEGRATORS: dict[str, ButcherTableau] = {
    t.name: t
    for t in (
        _tableau("euler", [[]], [1.0]),
        _tableau("heun", [[], [1.0]], [0.5, 0.5]),
        _tableau("ssprk3", [[], [1.0], [0.25, 0.25]], [1 / 6, 1 / 6, 2 / 3]),
        _tableau("midpoint", [[], [0.5]], [0.0, 1.0]),
        _tableau("rk4", [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    )
}


def get_integrator(name: str) -> ButcherTableau:
    """The tableau called ``name``; a clear error lists the known ones."""
    try:
        return INTEGRATORS[name]
    except KeyError:
        raise ValueError(f"unknown integrator {name!r}; allowed: {sorted(INTEGRATORS)}") from None
