"""Tests of stablenets.nn.activations: Lipschitz constants, monotonicity and rejections."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from stablenets.nn.activations import ACTIVATIONS, MonotoneActivation, build_activation

# name, kwargs, exact Lipschitz constant, reference implementation
CASES = [
    ("relu", {}, 1.0, F.relu),
    ("leaky_relu", {}, 1.0, lambda x: F.leaky_relu(x, 0.01)),
    ("leaky_relu", {"negative_slope": 0.0}, 1.0, F.relu),
    ("leaky_relu", {"negative_slope": 0.3}, 1.0, lambda x: F.leaky_relu(x, 0.3)),
    ("leaky_relu", {"negative_slope": 2.5}, 2.5, lambda x: F.leaky_relu(x, 2.5)),
    ("tanh", {}, 1.0, torch.tanh),
    ("sigmoid", {}, 0.25, torch.sigmoid),
    ("elu", {}, 1.0, F.elu),
    ("elu", {"alpha": 0.5}, 1.0, lambda x: F.elu(x, 0.5)),
    ("elu", {"alpha": 3.0}, 3.0, lambda x: F.elu(x, 3.0)),
]
IDS = [f"{name}-{kw}" for name, kw, _, _ in CASES]

# A dense float64 grid through 0 (where every kink and every maximal slope of these functions is).
GRID = torch.linspace(-12.0, 12.0, 120_001, dtype=torch.float64)


def _adjacent_slopes(fn) -> torch.Tensor:
    y = fn(GRID)
    return (y[1:] - y[:-1]) / (GRID[1:] - GRID[:-1])


@pytest.mark.parametrize(("name", "kwargs", "lip", "ref"), CASES, ids=IDS)
def test_lipschitz_constant_is_exact(name, kwargs, lip, ref):
    act = build_activation(name, **kwargs)
    assert isinstance(act, MonotoneActivation)
    assert act.lipschitz == pytest.approx(lip, rel=1e-15)
    # Any chord slope on a line is a convex combination of adjacent chord slopes, so the max over
    # adjacent pairs of a dense grid is the sup over all pairs of grid points.
    slopes = _adjacent_slopes(act)
    assert float(slopes.abs().max()) <= act.lipschitz * (1 + 1e-9)
    assert float(slopes.abs().max()) >= act.lipschitz * (1 - 1e-3)  # and the constant is attained


@pytest.mark.parametrize(("name", "kwargs", "lip", "ref"), CASES, ids=IDS)
def test_random_pairs_never_exceed_lipschitz(name, kwargs, lip, ref):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100_000, generator=g, dtype=torch.float64) * 4
    sign = torch.randint(0, 2, (100_000,), generator=g, dtype=torch.float64) * 2 - 1
    b = a + sign * torch.logspace(-6, 1, 100_000, dtype=torch.float64)
    act = build_activation(name, **kwargs)
    ratio = (act(a) - act(b)).abs() / (a - b).abs()
    assert float(ratio.max()) <= lip * (1 + 1e-7)


@pytest.mark.parametrize(("name", "kwargs", "lip", "ref"), CASES, ids=IDS)
def test_activation_is_monotone_and_matches_reference(name, kwargs, lip, ref):
    act = build_activation(name, **kwargs)
    assert float(_adjacent_slopes(act).min()) >= 0.0
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5
    torch.testing.assert_close(act(x), ref(x), rtol=0, atol=0)
    assert act(x.float()).dtype == torch.float32
    assert name in repr(act)


def test_registry_lists_only_monotone_activations():
    assert set(ACTIVATIONS) == {"relu", "leaky_relu", "tanh", "sigmoid", "elu"}
    for name in ACTIVATIONS:
        assert float(_adjacent_slopes(build_activation(name)).min()) >= 0.0


@pytest.mark.parametrize("name", ["gelu", "silu", "swish", "mish"])
def test_non_monotone_activations_are_rejected(name):
    # The rejection is justified: the torch version of each really decreases somewhere.
    fn = {"gelu": F.gelu, "silu": F.silu, "swish": F.silu, "mish": F.mish}[name]
    assert float(_adjacent_slopes(fn).min()) < -1e-3
    with pytest.raises(ValueError, match=rf"{name}.*not monotone.*allowed"):
        build_activation(name)


@pytest.mark.parametrize("name", ["softplusx", "", "ReLU", "prelu"])
def test_unknown_activations_are_rejected(name):
    with pytest.raises(ValueError, match=rf"unknown activation '{name}'.*leaky_relu"):
        build_activation(name)


@pytest.mark.parametrize("slope", [-0.01, -1.0, float("nan")])
def test_leaky_relu_negative_slope_is_rejected(slope):
    with pytest.raises(ValueError, match="negative_slope"):
        build_activation("leaky_relu", negative_slope=slope)


@pytest.mark.parametrize("alpha", [-0.5, float("nan")])
def test_an_elu_alpha_that_is_negative_or_nan_is_rejected(alpha):
    """NaN passed ``alpha < 0`` and ``max(1, nan)`` is 1: an ELU claiming L = 1 gave NaN."""
    with pytest.raises(ValueError, match="elu alpha"):
        build_activation("elu", alpha=alpha)


def test_an_option_an_activation_does_not_take_is_named_in_one_line():
    with pytest.raises(ValueError, match=r"activation 'relu' takes no option 'negative_slope'; "):
        build_activation("relu", negative_slope=0.1)
    with pytest.raises(
        ValueError, match=r"'elu' takes no option 'slope'; its options: \['alpha'\]"
    ):
        build_activation("elu", slope=0.1)


def test_elu_negative_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha"):
        build_activation("elu", alpha=-0.5)
