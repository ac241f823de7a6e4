"""Blocks: the non-expansive (or averaged) convex-potential block and the residual baseline.

Non-expansive block. It integrates ``dx/dt = -A^T sigma(A x + b)`` over a fixed time ``T`` with
``n`` explicit RK sub-steps of size ``h = T / n``, where

    n = ceil(T L ||A||^2 / (2 r theta)),   so that   h nu <= r theta,   nu = L ||A||^2 / 2.

``r`` is the integrator's step radius and ``theta`` in (0, 1]: with Euler and ``theta < 1`` each
sub-step is ``theta``-averaged (at most), and the block, ``n`` sub-steps composed, is averaged
with their composed constant (``averagedness``), larger than ``theta`` once ``n > 1``.
``T = r / (L sigma_0^2)`` as in the authors' scripts (``T = 1`` at an initial norm of 1, where one
sub-step uses half the radius); ``theta`` enters the step rule only: with ``theta >= 1/2`` a
block starts at one sub-step and needs a second once its norm grows past ``sqrt(2 theta)
sigma_0``; below, it starts at ``ceil(1 / (2 theta (1 + TIME_HEADROOM)^2))`` in training (one
sub-step down to ``theta`` = 0.481 there; in ``eval()`` the certified bound, about 1 % above the
estimate, takes a second sub-step below ``theta`` of about 0.49). In training the cheap power-iteration estimate of ``||A||`` drives ``n``;
in ``eval()`` the certified upper bound does, so the claim holds for the network that is
evaluated. Nothing caps ``n`` in ``eval()``: it grows with the square of the norm (a block whose
norm grew 100-fold takes 10,000 times the sub-steps), so load a model that training's guards
passed (``train.max_norm``, ``train.max_substeps``) or look at ``schedule()`` first.

The integration time is a float64 buffer: ``.half()`` or ``.to(torch.bfloat16)`` rounds it like
every other tensor (0.9612 -> 0.9609), which changes the network for good (a later ``.double()``
does not bring it back); its bound and forward pass stay consistent with each other.

Residual baseline. ``x - B sigma(A x + b)`` with unconstrained ``A`` and ``B``: its Lipschitz
bound ``1 + ||B|| L ||A||`` can exceed 1 even when ``||A|| = ||B|| = 1`` (the paper's 2^k example).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stablenets.nn.activations import MonotoneActivation
from stablenets.nn.integrators import compose_averaged, get_integrator
from stablenets.nn.operators import LinearOperator, host_copy, remember_host_copy, spatial_size

__all__ = ["INIT_POWER_ITERS", "NonexpansiveBlock", "ResidualBlock"]


# Sub-step inputs above this size are checkpointed in training (see NonexpansiveBlock): at batch
# 5, 64 channels, 321x481 one activation is 198 MB; the CIFAR-10 classifier's largest is 8 MB.
REMAT_BYTES = 64 * 2**20
# Default integration time: sigma_0 is the warm-started estimate inflated by this much (so an
# averaged block with theta = 1/2 starts at one sub-step in ``eval()`` too).
TIME_HEADROOM = 0.02
# Power iterations that warm a block's norm estimate (and rescale it to ``init_norm``) at
# construction: from the symbol's peak, a 64-channel 3x3 convolution's estimate is then within
# 0.02-0.3 % of its norm (``Conv2dOperator.warm_start``).
INIT_POWER_ITERS = 20


class NonexpansiveBlock(nn.Module):
    """Gradient flow of a convex potential, integrated with adaptive sub-steps.

    Args:
        operator: the linear map ``A`` (its bias is ``b``).
        activation: monotone ``sigma`` with Lipschitz constant ``L``.
        integrator: name of an explicit RK method (``euler``, ``heun``, ``ssprk3``, ``rk4``...).
        theta: safety factor in (0, 1]; ``theta < 1`` with Euler makes each sub-step
            ``theta``-averaged and the block averaged (``averagedness``: composed over the
            sub-steps, so above ``theta`` once there are several).
        time: integration time ``T``; by default ``r / (L sigma_0^2)`` as in the authors'
            scripts, with ``sigma_0 = (1 + TIME_HEADROOM)`` times the warm-started power-iteration
            estimate (``operator.warm_start``): a design choice, deterministic, nothing certified
            at construction. The headroom covers the estimate's remaining error and the
            certified bound's excess over the norm at the paper's sizes (about 1 %), so a block
            with ``theta >= 1/2`` starts with one sub-step in training and in ``eval()``.
        init_power_iters: power iterations run at construction to warm the norm estimate.
        init_norm: when set, ``A`` is first rescaled to this norm estimate (``rescale_``; the
            scripts start every block at 1).
    """

    # whether ``remat`` (activation checkpointing of the sub-steps) can apply to the block
    checkpointable: bool = True

    time: torch.Tensor  # the integration time, a float64 buffer

    def __init__(
        self,
        operator: LinearOperator,
        activation: MonotoneActivation,
        integrator: str = "euler",
        theta: float = 1.0,
        time: float | None = None,
        init_power_iters: int = INIT_POWER_ITERS,
        init_norm: float | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta={theta} is outside (0, 1]")
        self.operator = operator
        self.activation = activation
        self.tableau = get_integrator(integrator)
        self.theta = float(theta)
        if init_norm is not None:
            estimate = float(operator.rescale_(init_norm, init_power_iters))
        else:
            estimate = float(operator.warm_start(init_power_iters))
        if time is None:
            if not estimate > 0:
                raise ValueError(
                    f"operator norm estimate {estimate} at construction (a zero weight): the "
                    "integration time it sets is undefined; pass time= explicitly"
                )
            sigma0 = estimate * (1 + TIME_HEADROOM)
            time = self.tableau.step_radius / (activation.lipschitz * sigma0**2)
        if not time > 0:
            raise ValueError(f"integration time {time} must be positive")
        self.register_buffer("time", torch.tensor(float(time), dtype=torch.float64))
        self.last_substeps = 0
        self.last_norm = float("nan")
        # Activation checkpointing per sub-step in training: the same gradients, but only each
        # sub-step's input is kept (its stages are recomputed in backward). None: on when a
        # sub-step's input exceeds REMAT_BYTES (the full-image denoiser); True / False (set
        # before each pass by the training loop under ``max_substeps: auto``).
        self.checkpoint_substeps: bool | None = None

    def time_value(self) -> float:
        """``float(time)``, read from the device once and then from a host copy that any edit
        of the buffer invalidates (no synchronisation per forward pass on a GPU)."""
        value = host_copy(self, "_time_host", self.time)
        if value is None:
            value = float(self.time)
            if not (math.isfinite(value) and value > 0):  # a state_dict can load anything
                raise ValueError(f"integration time must be finite and > 0, got {value}")
            remember_host_copy(self, "_time_host", self.time, value)
        return value

    def field(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x) = -A^T sigma(A x + b)``, the negative gradient of the convex potential."""
        return -self.operator.adjoint(self.activation(self.operator(x)), spatial_size(x))

    def _ell(self, norm: float) -> float:
        """Lipschitz constant ``L ||A||^2`` of the field for operator norm ``norm``."""
        return self.activation.lipschitz * norm**2

    def substeps(self, norm: float) -> int:
        """Smallest ``n`` with ``(T / n) L norm^2 / 2 <= r theta`` (checked in float64)."""
        T, limit = self.time_value(), self.tableau.step_radius * self.theta
        ell = self._ell(norm)
        n = max(1, math.ceil(T * ell / (2 * limit)))
        while (T / n) * ell / 2 > limit:
            n += 1
        while n > 1 and (T / (n - 1)) * ell / 2 <= limit:
            n -= 1
        return n

    def current_norm(self, x: torch.Tensor | None = None) -> float:
        """Training: the power-iteration estimate. ``eval()``: the certified bound for ``x``."""
        if self.training:
            return self.operator.sigma_value()
        size = spatial_size(x) if x is not None else None
        return self.operator.norm_bound(size)

    def _gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``-f(x) = A^T sigma(A x + b)``: stepping it with ``-h`` is bitwise the step of ``f``
        with ``h`` (negation is exact) and saves one pass over the activations."""
        return self.operator.adjoint(self.activation(self.operator(x)), spatial_size(x))

    def _substep(self, x: torch.Tensor, h: float) -> torch.Tensor:
        return self.tableau.step(self._gradient, x, -h)

    def schedule(self, x: torch.Tensor | None = None) -> tuple[int, float]:
        """``(n, h)`` of the next forward pass at the current norm (``current_norm``), recorded
        as ``last_substeps`` / ``last_norm``. CUDA graphs key on it (``graphs.py``)."""
        norm = self.current_norm(x)
        n = self.substeps(norm)
        self.last_substeps, self.last_norm = n, norm
        return n, self.time_value() / n

    def checkpoints(self, input_bytes: int) -> bool:
        """Whether a training pass checkpoints its sub-steps on an input of ``input_bytes``:
        never where not ``checkpointable``; ``checkpoint_substeps`` when set; else (auto) when
        the input exceeds ``REMAT_BYTES``."""
        if not self.checkpointable:
            return False
        if self.checkpoint_substeps is not None:
            return self.checkpoint_substeps
        return input_bytes > REMAT_BYTES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h = self.schedule(x)
        remat = self.training and torch.is_grad_enabled()
        remat = remat and self.checkpoints(x.numel() * x.element_size())
        for _ in range(n):
            # Keep only each sub-step's input; recompute its stages in backward (deterministic:
            # no RNG state to save, which would also be illegal inside a CUDA graph capture).
            if remat:
                x = checkpoint(self._substep, x, h, use_reentrant=False, preserve_rng_state=False)
            else:
                x = self._substep(x, h)
        return x

    def lipschitz_bound(self, input_size: tuple[int, int] | None = None) -> float:
        """Sound bound of the block's Lipschitz constant as evaluated in ``eval()`` mode.

        1 when the certified step satisfies ``h nu <= R`` (R the computed threshold factor);
        otherwise the stage-wise bound raised to the number of sub-steps.
        """
        norm = self.operator.norm_bound(input_size)
        n = self.substeps(norm)
        h_ell = self.time_value() / n * self._ell(norm)
        if self.tableau.radius > 0 and h_ell / 2 <= self.tableau.radius:
            return 1.0
        try:
            return self.tableau.stagewise_lipschitz(h_ell) ** n
        except OverflowError:  # thousands of sub-steps of a stage-wise bound above 1
            return math.inf

    def averagedness(self, input_size: tuple[int, int] | None = None) -> float | None:
        """``alpha`` such that the ``eval()`` block is alpha-averaged, or ``None``.

        Each sub-step's (``ButcherTableau.averagedness`` at ``h nu = h ell / 2``: Euler's
        ``I - h grad(phi)`` is ``h nu``-averaged (Baillon–Haddad), Heun's and SSPRK3's convex
        combinations of Euler steps are too, RK4 and the midpoint rule guarantee nothing), and
        ``n`` sub-steps compose by ``compose_averaged``.
        """
        norm = self.operator.norm_bound(input_size)
        n = self.substeps(norm)
        alpha_step = self.tableau.averagedness(self.time_value() / n * self._ell(norm) / 2)
        if alpha_step is None:
            return None
        alpha = alpha_step
        for _ in range(n - 1):
            alpha = compose_averaged(alpha, alpha_step)
        return alpha


class ResidualBlock(nn.Module):
    """Baseline ``x - B sigma(A x + b_A) - b_B`` with unconstrained operators ``A`` and ``B``."""

    def __init__(
        self, first: LinearOperator, second: LinearOperator, activation: nn.Module
    ) -> None:
        super().__init__()
        self.first, self.second, self.activation = first, second, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.second(self.activation(self.first(x)))

    def lipschitz_bound(self, input_size: tuple[int, int] | None = None) -> float:
        """``1 + ||B|| L ||A||`` with certified norms."""
        lip = getattr(self.activation, "lipschitz", None)
        if lip is None:
            raise ValueError("ResidualBlock.lipschitz_bound needs an activation with .lipschitz")
        a = self.first.norm_bound(input_size)
        b = self.second.norm_bound(input_size)
        return 1.0 + b * lip * a
