"""Adversarial Lipschitz / averagedness audit shared by test_blocks.py and test_models.py."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ratio_objective(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``||f(x) - f(y)|| / ||x - y||`` per sample."""
    return dy.norm(dim=1) / dx.norm(dim=1)


def averaged_objective(alpha: float) -> Objective:
    """Violation of ``||Tx-Ty||^2 <= ||x-y||^2 - (1-a)/a ||(I-T)x-(I-T)y||^2``, relative to
    ``||x-y||^2``."""
    c = (1 - alpha) / alpha

    def objective(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        sq = dx.square().sum(dim=1)
        return (dy.square().sum(dim=1) - sq + c * (dx - dy).square().sum(dim=1)) / sq

    return objective


def adversary(
    f: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    objective: Objective = ratio_objective,
    *,
    starts: int = 8,
    steps: int = 100,
    lr: float = 0.03,
    seed: int = 0,
    offset: float = 0.0,
    images: bool = False,
) -> float:
    """Gradient ascent (Adam on ``x``, a direction ``v`` and a log-distance) of
    ``objective(x - y, f(x) - f(y))`` from ``starts`` random pairs at distances 1e-3 .. 2; the
    largest value seen. ``x`` starts standard normal plus ``offset``, or uniform in [0, 1] (where
    images live) when ``images``. Distances stay >= 1e-4 so float64 rounding stays far below the
    tests' tolerance."""
    g = torch.Generator().manual_seed(seed)
    if images:
        x = torch.rand(starts, *shape, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(starts, *shape, generator=g, dtype=torch.float64) + offset
    v = torch.randn(starts, *shape, generator=g, dtype=torch.float64)
    log_r = torch.linspace(math.log(1e-3), math.log(2.0), starts, dtype=torch.float64)
    params = [x.requires_grad_(), v.requires_grad_(), log_r.requires_grad_()]
    opt = torch.optim.Adam(params, lr=lr)
    view = (starts,) + (1,) * len(shape)
    best = -math.inf
    for _ in range(steps + 1):
        r = log_r.clamp(math.log(1e-4), math.log(10.0)).exp()
        dx = v / v.flatten(1).norm(dim=1).view(view) * r.view(view)
        out = f(torch.cat([x + dx, x]))
        value = objective(dx.flatten(1), (out[:starts] - out[starts:]).flatten(1))
        best = max(best, float(value.detach().max()))
        opt.zero_grad()
        (-value.sum()).backward()
        opt.step()
    return best
