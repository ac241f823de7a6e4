"""Training losses beyond the task's own: the Lipschitz-margin (offset) cross-entropy.

A point is certified at radius ``eps`` when its logit margin exceeds ``sqrt(2) L eps``
(``L`` the network's Lipschitz constant). The margin loss asks for a margin during training:

    loss(s, y) = tau * CE((s - offset L e_y) / tau, y),

the true-class logit lowered by ``offset L``, a temperature ``tau`` (Prach & Lampert 2022).
``offset = sqrt(2) eps`` asks for the margin that certifies ``eps``; Prach et al. 2024 train
with ``offset = 2 sqrt(2) eps`` (0.3993 at ``eps = 36/255``, twice it) and ``tau = 1/4``.
``offset = 0``, ``tau = 1`` is cross-entropy.
``L`` is the model's cheap training-time estimate (``model.lipschitz_estimate()``: power-iteration
norms, differentiable, so the loss also pushes the unconstrained layers' norms down), never the
certified ``eval()`` bound.

Config (``classification.train.loss``): ``null`` (the task's own loss) or
``{name: margin, offset: 0.3993073588, temperature: 0.25}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["margin_loss", "MarginLoss", "build_loss", "loss_label", "LOSSES"]

LOSSES = ("margin",)


def margin_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    offset: torch.Tensor | float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``tau * CE((logits - offset * onehot(target)) / tau, target)``, batch mean."""
    onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    shifted = (logits - offset * onehot) / temperature
    return F.cross_entropy(shifted, target) * temperature


def _lipschitz_estimate(model: nn.Module) -> torch.Tensor | float:
    estimate = getattr(model, "lipschitz_estimate", None)
    if estimate is None:
        raise ValueError(
            f"the margin loss needs model.lipschitz_estimate(); {type(model).__name__} has none"
        )
    return estimate()


class MarginLoss:
    """``margin_loss`` with offset ``offset L``, ``L`` from ``model.lipschitz_estimate()``."""

    def __init__(self, offset: float, temperature: float = 1.0) -> None:
        if not offset >= 0:
            raise ValueError(f"margin loss offset={offset} must be >= 0")
        if not temperature > 0:
            raise ValueError(f"margin loss temperature={temperature} must be > 0")
        self.offset, self.temperature = float(offset), float(temperature)

    def __call__(self, model: nn.Module, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        lip = _lipschitz_estimate(model) if self.offset > 0 else 0.0
        return margin_loss(out, target, self.offset * lip, self.temperature)


Criterion = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def build_loss(spec: dict[str, Any] | None, model: nn.Module | None = None) -> MarginLoss | None:
    """The criterion of ``spec`` (``None``: the task's own loss). With ``model``, checks that the
    model offers the Lipschitz estimate the loss needs."""
    if spec is None:
        return None
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {list(LOSSES)} (or null)")
    criterion = MarginLoss(**spec)
    if model is not None and criterion.offset > 0 and not hasattr(model, "lipschitz_estimate"):
        raise ValueError(
            f"the margin loss needs model.lipschitz_estimate(); {type(model).__name__} has none"
        )
    return criterion


def loss_label(spec: dict[str, Any] | None, task_loss: str = "cross-entropy") -> str:
    """What a model was trained with, for tables: ``task_loss`` for ``None`` (the task's own),
    else ``margin (offset 0.399, T 0.25)``; a spec saved with a model trained before the
    offset was named (its ``eps``: the offset ``sqrt(2) eps`` it trained with) as that offset,
    so its evaluation does not fail after its sweep."""
    if spec is None:
        return task_loss
    if "eps" in spec and "offset" not in spec:  # a model trained before the offset was named
        spec = {
            **{k: v for k, v in spec.items() if k != "eps"},
            "offset": math.sqrt(2) * spec["eps"],
        }
    criterion = build_loss(spec)
    assert criterion is not None
    return f"{spec['name']} (offset {criterion.offset:.3g}, T {criterion.temperature:g})"
