"""Monotone activations with their Lipschitz constants.

The convex-potential block ``x <- x - h A^T sigma(A x + b)`` is a gradient step of the convex
potential ``sum_i Phi(a_i^T x + b_i)`` with ``Phi' = sigma`` only when ``sigma`` is monotone
(non-decreasing). Its step-size rule needs the Lipschitz constant ``L`` of ``sigma``, so every
activation here carries it. Non-monotone activations (GELU, SiLU, ...) are rejected.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MonotoneActivation", "build_activation", "ACTIVATIONS"]


class MonotoneActivation(nn.Module):
    """A componentwise, monotone, ``lipschitz``-Lipschitz activation."""

    def __init__(
        self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], lipschitz: float
    ) -> None:
        super().__init__()
        self.name = name
        self.fn = fn
        self.lipschitz = float(lipschitz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return f"{self.name}, L={self.lipschitz:g}"


def _leaky_relu(negative_slope: float = 0.01) -> MonotoneActivation:
    if not 0.0 <= negative_slope:
        raise ValueError(
            f"leaky_relu negative_slope={negative_slope} makes the activation non-monotone; "
            "expected negative_slope >= 0"
        )
    return MonotoneActivation(
        "leaky_relu",
        lambda x: F.leaky_relu(x, negative_slope),
        max(1.0, negative_slope),
    )


def _elu(alpha: float = 1.0) -> MonotoneActivation:
    if not 0.0 <= alpha:  # NaN too
        raise ValueError(f"elu alpha={alpha} makes the activation non-monotone; expected >= 0")
    return MonotoneActivation("elu", lambda x: F.elu(x, alpha), max(1.0, alpha))


ACTIVATIONS: dict[str, Callable[..., MonotoneActivation]] = {
    "relu": lambda: MonotoneActivation("relu", F.relu, 1.0),
    "leaky_relu": _leaky_relu,
    "tanh": lambda: MonotoneActivation("tanh", torch.tanh, 1.0),
    "sigmoid": lambda: MonotoneActivation("sigmoid", torch.sigmoid, 0.25),
    "elu": _elu,
}

NON_MONOTONE = {"gelu", "silu", "swish", "mish", "sin", "cos", "selu_inverse", "gaussian"}


def build_activation(name: str, **kwargs: float) -> MonotoneActivation:
    """Return the activation ``name`` with its Lipschitz constant.

    Raises ``ValueError`` naming the allowed activations when ``name`` is unknown or not monotone.
    """
    if name in NON_MONOTONE:
        raise ValueError(
            f"activation {name!r} is not monotone, so the block is not a gradient step of a convex "
            f"potential; allowed: {sorted(ACTIVATIONS)}"
        )
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {sorted(ACTIVATIONS)}")
    make = ACTIVATIONS[name]
    allowed = set(inspect.signature(make).parameters)
    if unknown := sorted(set(kwargs) - allowed):
        raise ValueError(
            f"activation {name!r} takes no option {', '.join(map(repr, unknown))}; "
            f"its options: {sorted(allowed) or 'none'}"
        )
    return make(**kwargs)
