"""Tests of stablenets.nn.integrators: threshold factors, steps and stage-wise Lipschitz bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stablenets.nn.integrators import INTEGRATORS, ButcherTableau, get_integrator, threshold_factor

# Radius of absolute monotonicity (threshold factor) of each named method (nodepy's values).
KNOWN_RADII = {"euler": 1.0, "heun": 1.0, "ssprk3": 1.0, "rk4": 0.0, "midpoint": 0.0}

# Hand-built methods with known threshold factors.
HAND_BUILT = [
    # SSPRK(4,3) of Kraaijevanger / Spiteri-Ruuth: four stages, order 3, R = 2.
    (
        "ssprk43",
        [[0, 0, 0, 0], [1 / 2, 0, 0, 0], [1 / 2, 1 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6, 0]],
        [1 / 6, 1 / 6, 1 / 6, 1 / 2],
        2.0,
    ),
    # SSPRK(3,2): three stages, order 2, R = s - 1 = 2.
    ("ssprk32", [[0, 0, 0], [1 / 2, 0, 0], [1 / 2, 1 / 2, 0]], [1 / 3, 1 / 3, 1 / 3], 2.0),
    # Two forward-Euler steps of size h/2: R = 2.
    ("euler_x2", [[0, 0], [1 / 2, 0]], [1 / 2, 1 / 2], 2.0),
    # A negative coefficient rules out absolute monotonicity altogether.
    ("negative_b", [[0, 0], [1, 0]], [1.5, -0.5], 0.0),
]


def _hand_rk4_step(f, x, h):
    k1 = f(x)
    k2 = f(x + h / 2 * k1)
    k3 = f(x + h / 2 * k2)
    k4 = f(x + h * k3)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _hand_heun_step(f, x, h):
    k1 = f(x)
    return x + h / 2 * (k1 + f(x + h * k1))


def _hand_ssprk3_step(f, x, h):  # Shu-Osher form
    y1 = x + h * f(x)
    y2 = 3 / 4 * x + 1 / 4 * (y1 + h * f(y1))
    return 1 / 3 * x + 2 / 3 * (y2 + h * f(y2))


def _hand_midpoint_step(f, x, h):
    return x + h * f(x + h / 2 * f(x))


HAND_STEPS = {
    "euler": lambda f, x, h: x + h * f(x),
    "heun": _hand_heun_step,
    "ssprk3": _hand_ssprk3_step,
    "midpoint": _hand_midpoint_step,
    "rk4": _hand_rk4_step,
}


def _random_matrix(d: int, ell: float, seed: int, kind: str) -> torch.Tensor:
    """A ``d x d`` matrix of spectral norm ``ell``: general, symmetric PSD or skew."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    if kind == "psd":
        m = m @ m.T
    elif kind == "skew":
        m = m - m.T
    return m * (ell / torch.linalg.matrix_norm(m, 2))


def _step_matrix(tableau: ButcherTableau, m: torch.Tensor, h: float) -> torch.Tensor:
    """The matrix of one step on the linear field ``f(x) = -M x`` (rows of ``X`` are states)."""
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    return tableau.step(lambda x: -x @ m.T, eye, h).T


@pytest.mark.parametrize("name", sorted(KNOWN_RADII))
def test_named_threshold_factors(name):
    t = get_integrator(name)
    assert t.radius == pytest.approx(KNOWN_RADII[name], abs=1e-8)
    assert threshold_factor(np.array(t.A), np.array(t.b)) == pytest.approx(t.radius, abs=1e-8)
    assert t.step_radius == (t.radius if t.radius > 0 else 1.0)
    assert sum(t.b) == pytest.approx(1.0, abs=1e-15)  # consistency


@pytest.mark.parametrize(("name", "A", "b", "radius"), HAND_BUILT, ids=[c[0] for c in HAND_BUILT])
def test_hand_built_threshold_factors(name, A, b, radius):
    assert threshold_factor(np.array(A), np.array(b)) == pytest.approx(radius, abs=1e-8)
    tableau = ButcherTableau(name, tuple(map(tuple, A)), tuple(b))
    assert tableau.radius == pytest.approx(radius, abs=1e-8)


def test_threshold_factor_is_a_supremum():
    """Just below R the conditions hold; the bisection did not stop early."""
    from stablenets.nn.integrators import _absolutely_monotone_at

    for name, A, b, radius in HAND_BUILT[:3]:
        s = len(b)
        K = np.zeros((s + 1, s + 1))
        K[:s, :s], K[s, :s] = A, b
        assert _absolutely_monotone_at(K, radius - 1e-6), name
        assert not _absolutely_monotone_at(K, radius + 1e-6), name


def test_tableau_must_be_strictly_lower_triangular():
    with pytest.raises(ValueError, match="strictly lower triangular"):
        ButcherTableau("implicit", ((1.0,),), (1.0,))
    with pytest.raises(ValueError, match="strictly lower triangular"):
        ButcherTableau("bad_shape", ((0.0, 0.0),), (0.5, 0.5))


def test_unknown_integrator_is_rejected():
    with pytest.raises(ValueError, match=r"unknown integrator 'rk45'.*euler"):
        get_integrator("rk45")


@pytest.mark.parametrize("name", sorted(HAND_STEPS))
@pytest.mark.parametrize("h", [0.05, 0.7, 1.9])
def test_step_matches_hand_written_step_on_linear_ode(name, h):
    m = _random_matrix(7, 1.3, seed=3, kind="general")
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def f(z):
        return -z @ m.T

    got = get_integrator(name).step(f, x, h)
    torch.testing.assert_close(got, HAND_STEPS[name](f, x, h), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(("name", "order"), [("euler", 1), ("heun", 2), ("ssprk3", 3), ("rk4", 4)])
def test_step_has_the_method_order_on_a_linear_ode(name, order):
    """The step matrix agrees with ``exp(-h M)`` to ``O(h^(order+1))``."""
    m = _random_matrix(5, 1.0, seed=5, kind="general")
    errs = []
    for h in (0.1, 0.05):
        exact = torch.linalg.matrix_exp(-h * m)
        errs.append(float(torch.linalg.matrix_norm(_step_matrix(INTEGRATORS[name], m, h) - exact)))
    assert math.log2(errs[0] / errs[1]) == pytest.approx(order + 1, abs=0.2)


def test_stagewise_lipschitz_closed_forms():
    z = 0.83
    taylor = [1.0, z, z**2 / 2, z**3 / 6, z**4 / 24]
    assert INTEGRATORS["euler"].stagewise_lipschitz(z) == pytest.approx(sum(taylor[:2]))
    assert INTEGRATORS["heun"].stagewise_lipschitz(z) == pytest.approx(sum(taylor[:3]))
    assert INTEGRATORS["ssprk3"].stagewise_lipschitz(z) == pytest.approx(sum(taylor[:4]))
    assert INTEGRATORS["rk4"].stagewise_lipschitz(z) == pytest.approx(sum(taylor))
    assert INTEGRATORS["midpoint"].stagewise_lipschitz(z) == pytest.approx(sum(taylor[:3]))
    neg = ButcherTableau("negative_b", ((0.0, 0.0), (1.0, 0.0)), (1.5, -0.5))
    assert neg.stagewise_lipschitz(z) == pytest.approx(1 + 1.5 * z + 0.5 * z * (1 + z))


@pytest.mark.parametrize("name", sorted(INTEGRATORS))
def test_stagewise_lipschitz_bounds_one_step_on_linear_fields(name):
    """On ``f(x) = -M x`` with ``||M|| = ell`` the step is a matrix; its norm never exceeds the
    stage-wise bound, whatever ``M`` (general, symmetric, skew) and ``h ell``."""
    tableau = get_integrator(name)
    worst = 0.0
    for seed in range(12):
        for kind in ("general", "psd", "skew"):
            ell = 0.5 + seed / 4
            m = _random_matrix(6, ell, seed=100 + seed, kind=kind)
            for h_ell in (0.1, 1.0, 2.0, 3.5):
                h = h_ell / ell
                norm = float(torch.linalg.matrix_norm(_step_matrix(tableau, m, h), 2))
                bound = tableau.stagewise_lipschitz(h_ell)
                assert norm <= bound * (1 + 1e-12), (kind, seed, h_ell)
                worst = max(worst, norm / bound)
    # The bound is attained for a method with non-negative coefficients: M = -ell I (not a
    # gradient field of a convex potential, but ell-Lipschitz) gives the Taylor sum exactly.
    m = -1.7 * torch.eye(4, dtype=torch.float64)
    h = 1.1 / 1.7
    norm = float(torch.linalg.matrix_norm(_step_matrix(tableau, m, h), 2))
    if all(v >= 0 for row in tableau.A for v in row) and all(v >= 0 for v in tableau.b):
        assert norm == pytest.approx(tableau.stagewise_lipschitz(1.1), rel=1e-12)
    assert worst > 0.3  # the random fields are not trivially far below the bound


@pytest.mark.parametrize("name", ["euler", "heun", "ssprk3", "rk4"])
def test_linear_gradient_fields_are_contracted_within_the_step_rule(name):
    """On symmetric PSD ``M`` with ``h ||M|| / 2 <= step_radius`` every method's step has norm
    <= 1 (linear circle contractivity; RK4's linear stability interval reaches 2.78)."""
    tableau = get_integrator(name)
    for seed in range(10):
        m = _random_matrix(6, 2.0, seed=200 + seed, kind="psd")  # nu = 1
        for h in (0.25, 0.5, tableau.step_radius):
            norm = float(torch.linalg.matrix_norm(_step_matrix(tableau, m, h), 2))
            assert norm <= 1 + 1e-12
    # ... and Euler with h nu = 1.2 expands along the top eigenvector.
    m = _random_matrix(6, 2.0, seed=7, kind="psd")
    euler = float(torch.linalg.matrix_norm(_step_matrix(INTEGRATORS["euler"], m, 1.2), 2))
    assert euler == pytest.approx(1.4, rel=1e-10)


@pytest.mark.parametrize("h_nu", [0.2, 0.5, 1.0])
def test_a_step_is_averaged_as_its_shu_osher_form_of_euler_steps_says(h_nu):
    """From the tableau: Euler ``h nu``; Heun ``x/2 + E(E(x))/2``; SSPRK3 ``x/3 + 2/3 E(U(x))``
    with ``U = 3/4 I + 1/4 E o E`` (E: an ``h nu``-averaged Euler step, merely non-expansive at
    1); none for the schemes of radius 0."""
    from stablenets.nn.integrators import compose_averaged

    step = compose_averaged(h_nu, h_nu)
    expected = {
        "euler": h_nu if h_nu < 1 else None,
        "heun": step / 2,
        "ssprk3": 2 / 3 * compose_averaged(h_nu, step / 4),
        "midpoint": None,
        "rk4": None,
    }
    for name, alpha in expected.items():
        got = get_integrator(name).averagedness(h_nu)
        assert got == (None if alpha is None else pytest.approx(alpha, rel=1e-12)), name
    assert get_integrator("heun").averagedness(1.5) is None  # past the radius: no guarantee


def test_an_averaged_step_satisfies_the_averagedness_inequality_on_linear_gradient_fields():
    """``f(x) = -M x`` with ``M`` symmetric, eigenvalues in ``[0, ell]`` (the gradient of a convex
    quadratic): one step ``S`` of each SSP scheme, at ``h nu`` its averagedness is given for,
    satisfies ``||Sx - Sy||^2 <= ||x - y||^2 - (1 - a)/a ||(I - S)x - (I - S)y||^2`` at the
    extreme eigenvalues and between them."""
    ell = 2.0
    for name in ("euler", "heun", "ssprk3"):
        tableau = get_integrator(name)
        for h_nu in (0.3, 0.9, 1.0):
            alpha = tableau.averagedness(h_nu)
            if alpha is None:
                continue
            h = 2 * h_nu / ell
            for lam in np.linspace(0.0, ell, 41):  # a scalar mode of M
                s = float(
                    tableau.step(
                        lambda x, lam=lam: -lam * x, torch.tensor(1.0, dtype=torch.float64), h
                    )
                )
                gap = 1 - s**2 - (1 - alpha) / alpha * (1 - s) ** 2
                assert gap >= -1e-12, (name, h_nu, lam, s, alpha)
