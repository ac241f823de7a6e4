"""The plain reference implementation of the non-expansive models: the benchmark's baseline.

This module exists only so that ``stablenets.bench.training`` can report the speed of the real training
path (``models.py`` / ``blocks.py`` / ``training.py``) as a ratio measured side by side against the
most straightforward implementation of the same networks. It is deliberately naive:

* eager float32, no fusion, no grouped convolutions, no mixed precision, NCHW;
* one power iteration per layer per step, each followed by a host synchronisation (``.item()``)
  that turns the estimate into the layer's sub-step count;
* Python loops over sub-steps and Runge--Kutta stages, the field written out literally as
  ``k = -conv_transpose2d(sigma(conv2d(x, W) + b), W)``.

Built with ``from_model`` from a model of ``models.py``, it holds copies of the same weights,
power-iteration vectors and integration times, and computes the same function for the same
sub-step counts (``tests/test_bench.py`` checks this in float64), so the ratio compares like with
like. It is not used by the pipeline and offers no certificates.

``from_model(model, plain=True)`` gives the floor instead: the same skeleton with each block a
*plain convolution pair* ``x - h W^T sigma(W x + b)`` at a fixed step ``h`` (the block's step at
build time) -- no power iteration, no step-size arithmetic, one sub-step. Against it, the
benchmark measures what the constraint machinery of the CPL block costs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from stablenets.nn.blocks import NonexpansiveBlock
from stablenets.nn.families import CPLBlock
from stablenets.nn.models import Classifier, NonexpansiveDenoiser
from stablenets.nn.operators import Conv2dOperator

__all__ = [
    "PlainPairBlock",
    "ReferenceBlock",
    "ReferenceClassifier",
    "ReferenceDenoiser",
    "from_model",
]


def _copy(t: torch.Tensor | None) -> nn.Parameter:
    if t is None:
        raise ValueError("the reference needs operators with a bias")
    return nn.Parameter(t.detach().clone())


def _nonexpansive(block: nn.Module) -> NonexpansiveBlock:
    if not isinstance(block, NonexpansiveBlock):
        raise ValueError(f"the reference supports non-expansive blocks only, not {block}")
    return block


class ReferenceBlock(nn.Module):
    """``n`` explicit RK sub-steps of ``dx/dt = -W^T sigma(W x + b)`` over the time ``T``."""

    u: torch.Tensor  # the power-iteration vector, a buffer

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        block = _nonexpansive(block)
        op = block.operator
        if not isinstance(op, Conv2dOperator) or op.stride != (1, 1) or op.dilation != (1, 1):
            raise ValueError("the reference supports stride-1, dilation-1 convolutions only")
        self.weight, self.bias = _copy(op.weight), _copy(op.bias)
        self.padding = op.padding
        self.register_buffer("u", op.u.detach().clone())
        self.sigma = float(op.sigma_estimate)
        self.act = block.activation.fn
        self.L = block.activation.lipschitz
        self.time = float(block.time)
        self.radius = block.tableau.step_radius * block.theta
        self.A = [list(row) for row in block.tableau.A]
        self.b = list(block.tableau.b)
        self.substeps = 0

    @torch.no_grad()
    def power_iteration(self) -> float:
        """One warm-started iteration of ``W^T W``; the estimate ``||W u||`` goes to the host."""
        v = F.conv2d(self.u, self.weight, padding=self.padding)
        u = F.conv_transpose2d(v, self.weight, padding=self.padding)
        u = u / u.norm()
        self.u.copy_(u)
        self.sigma = F.conv2d(u, self.weight, padding=self.padding).norm().item()
        return self.sigma

    def field(self, x: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(x, self.weight, self.bias, padding=self.padding)
        return -F.conv_transpose2d(self.act(z), self.weight, padding=self.padding)

    def forward(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        if n is None:
            n = max(1, math.ceil(self.time * self.L * self.sigma**2 / (2 * self.radius)))
        self.substeps = n
        h = self.time / n
        for _ in range(n):
            ks = []
            for i in range(len(self.b)):
                xi = x
                for j in range(i):
                    if self.A[i][j] != 0:
                        xi = xi + h * self.A[i][j] * ks[j]
                ks.append(self.field(xi))
            for i in range(len(self.b)):
                if self.b[i] != 0:
                    x = x + h * self.b[i] * ks[i]
        return x


class PlainPairBlock(ReferenceBlock):
    """``x - h W^T sigma(W x + b)``: one sub-step at the fixed step ``h`` the block had when built
    (a CPL block: ``2 / (L ||W||^2)``), no norm estimate at all."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        block = _nonexpansive(block)
        norm = float(block.operator.sigma_estimate)
        step_size = getattr(block, "step_size", None)  # a CPL block's fixed step
        self.h = float(step_size(norm)) if step_size is not None else self.time

    @torch.no_grad()
    def power_iteration(self) -> float:
        return self.sigma

    def forward(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        self.substeps = 1
        return x + self.h * self.field(x)


class _ReferenceModel(nn.Module):
    blocks: list[ReferenceBlock]

    def update_norms(self) -> None:
        for block in self.blocks:
            block.power_iteration()

    def total_substeps(self) -> int:
        return sum(block.substeps for block in self.blocks)

    def _run(
        self,
        blocks: Iterable[ReferenceBlock],
        x: torch.Tensor,
        substeps: list[int] | None,
        offset: int,
    ) -> torch.Tensor:
        for k, block in enumerate(blocks):
            x = block(x, None if substeps is None else substeps[offset + k])
        return x


class ReferenceClassifier(_ReferenceModel):
    """Lift, stages of reference blocks, 1x1 transitions + 2x2 average pooling, mean, head."""

    def __init__(self, model: Classifier, block: type[ReferenceBlock] = ReferenceBlock) -> None:
        super().__init__()
        self.lift_w, self.lift_b = _copy(model.lift.weight), _copy(model.lift.bias)
        layers = list(model.stage_layers())
        self.stage_blocks = [[block(b) for b in blocks] for blocks, _, _ in layers]
        self.stages = nn.ModuleList(nn.ModuleList(stage) for stage in self.stage_blocks)
        self.trans_w = nn.ParameterList(_copy(t.weight) for _, t, _ in layers)
        self.trans_b = nn.ParameterList(_copy(t.bias) for _, t, _ in layers)
        self.head_w, self.head_b = _copy(model.head.weight), _copy(model.head.bias)
        self.blocks = [b for stage in self.stage_blocks for b in stage]

    def forward(self, x: torch.Tensor, substeps: list[int] | None = None) -> torch.Tensor:
        x = F.conv2d(x, self.lift_w, self.lift_b)
        offset = 0
        for stage, w, b in zip(self.stage_blocks, self.trans_w, self.trans_b, strict=True):
            x = self._run(stage, x, substeps, offset)
            offset += len(stage)
            x = F.avg_pool2d(F.conv2d(x, w, b), 2)
        return F.linear(x.mean(dim=(2, 3)), self.head_w, self.head_b)


class ReferenceDenoiser(_ReferenceModel):
    """Zero-pad the channels, reference blocks, keep the first channels; optionally residual."""

    def __init__(
        self, model: NonexpansiveDenoiser, block: type[ReferenceBlock] = ReferenceBlock
    ) -> None:
        super().__init__()
        self.channels, self.width, self.residual = model.channels, model.width, model.residual
        self.blocks = [block(b) for b in model.blocks]
        self.layers = nn.ModuleList(self.blocks)

    def forward(self, x: torch.Tensor, substeps: list[int] | None = None) -> torch.Tensor:
        z = torch.cat([x, x.new_zeros(x.shape[0], self.width - self.channels, *x.shape[2:])], 1)
        out = self._run(self.blocks, z, substeps, 0)[:, : self.channels]
        return x - out if self.residual else out


def from_model(model: nn.Module, plain: bool = False) -> _ReferenceModel:
    """The reference twin of a non-expansive (or CPL) classifier or denoiser, weights copied;
    ``plain``: with plain convolution pairs (``PlainPairBlock``) as blocks."""
    block = PlainPairBlock if plain else ReferenceBlock
    if not plain and any(isinstance(b, CPLBlock) for b in model.modules()):
        raise ValueError("a CPL block has no time-integrating twin; use plain=True")
    if isinstance(model, NonexpansiveDenoiser) and all(
        isinstance(b, NonexpansiveBlock) for b in model.blocks
    ):
        ref = ReferenceDenoiser(model, block)
    elif isinstance(model, Classifier) and all(
        isinstance(b, NonexpansiveBlock) for blocks, _, _ in model.stage_layers() for b in blocks
    ):
        ref = ReferenceClassifier(model, block)
    else:
        raise ValueError(f"no reference implementation for {type(model).__name__}")
    p = next(model.parameters())
    return ref.to(device=p.device, dtype=p.dtype)
