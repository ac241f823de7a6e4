"""Models of the paper, built by name, each with a sound ``lipschitz_bound()``.

* ``nonexpansive_classifier`` / ``resnet_classifier``: one skeleton (1x1 lift, stages of blocks,
  1x1 transition doubling the width + 2x2 average pooling after each stage, global mean, linear
  head); only the block differs. The bound counts every layer: lift, transitions, pooling (2x2
  average pooling has norm 1/2, a global mean over ``H W`` pixels ``1/sqrt(H W)``) and head.
  ``cpl_classifier``, ``sll_classifier``, ``aol_classifier``, ``orthogonal_classifier``: the same
  skeleton with the other 1-Lipschitz block families of ``families.py``.
* ``nonexpansive_denoiser``: zero-pad the channels to the width (an isometry), blocks, keep the
  first channels (its adjoint); direct ``N(x)`` or residual ``x - N(x)`` output. ``block``:
  the paper's block (default) or ``cpl``, ``sll``, ``aol`` from ``families.py``.
* ``dncnn``: Zhang et al. 2017, residual, batch norm; unconstrained, bound by the product of norms.

Checkpoints hold the name, the constructor kwargs and the full ``state_dict`` (power-iteration
vectors and integration times included); ``load_model(path)`` rebuilds the model in ``eval()``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn
from torch.nn import functional as F

from stablenets.atomic import atomic_path
from stablenets.errors import first_line, raise_if_transient
from stablenets.nn.activations import build_activation
from stablenets.nn.blocks import (
    INIT_POWER_ITERS,
    NonexpansiveBlock,
    ResidualBlock,
)
from stablenets.nn.families import FAMILIES, FamilyBlock, build_family_block
from stablenets.nn.integrators import compose_averaged
from stablenets.nn.operators import Conv2dOperator, DenseOperator, LinearOperator, same_padding

__all__ = [
    "Classifier",
    "NonexpansiveDenoiser",
    "DnCNN",
    "build_model",
    "model_arguments",
    "model_block",
    "model_defaults",
    "unused_arguments",
    "save_model",
    "load_model",
    "CheckpointError",
    "MODELS",
    "CLASSIFIERS",
    "DENOISERS",
    "CHECKPOINT_FORMAT",
    "BLOCKS",
]

# Blocks the classifier skeleton takes: the paper's two and the other 1-Lipschitz families.
BLOCKS = ("nonexpansive", "residual", *FAMILIES)
# Blocks the denoiser skeleton takes: the paper's and the families that apply (C -> C, zero pad).
DENOISER_BLOCKS = ("nonexpansive", "cpl", "sll", "aol")

Size = tuple[int, int]
_Op = TypeVar("_Op", bound=LinearOperator)
# A block of the skeletons: the paper's two (``blocks.py``) or one of the families.
Block = NonexpansiveBlock | ResidualBlock | FamilyBlock


def _size(v: int | tuple[int, int] | list[int]) -> Size:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class StableModel(nn.Module):
    """Shared bookkeeping: norm updates and per-block diagnostics for every model."""

    # Set by ``build_model`` (what ``save_model`` writes to rebuild the model).
    model_name: str
    model_kwargs: dict[str, Any]

    def constrained_blocks(self) -> Iterator[NonexpansiveBlock]:
        return (m for m in self.modules() if isinstance(m, NonexpansiveBlock))

    @torch.no_grad()
    def update_norms(self, n_iters: int = 1) -> None:
        """One warm-started power iteration per constrained operator (before a training step)."""
        for block in self.constrained_blocks():
            block.operator.power_iteration(n_iters)

    def block_stats(self) -> list[tuple[int, float]]:
        """``(sub-steps, norm)`` of each constrained block at its last forward pass."""
        return [(b.last_substeps, b.last_norm) for b in self.constrained_blocks()]

    def total_substeps(self) -> int:
        return sum(n for n, _ in self.block_stats())

    def averagedness(self, input_size: Size | None = None) -> float | None:
        """alpha-averagedness guaranteed in ``eval()``; ``None`` when nothing is guaranteed."""
        return None


def _torch_biased(op: _Op, torch_bias: bool = True) -> _Op:
    """``op``, with PyTorch's default bias when ``torch_bias`` (the layers of the authors'
    scripts are PyTorch's; our operators start at a zero bias)."""
    if torch_bias:
        op.torch_bias_()
    return op


def _init_normed(op: _Op, init_norm: float | None) -> _Op:
    """``op`` rescaled to the norm estimate ``init_norm`` (``rescale_``: the scripts start their
    constrained layers at norm 1 so), unchanged when ``None``."""
    if init_norm is not None:
        op.rescale_(init_norm, INIT_POWER_ITERS)
    return op


def _block_factory(
    block: str,
    activation: str,
    integrator: str,
    theta: float,
    time: float | None,
    kernel: int,
    init_norm: float | None,
    torch_bias: bool,
) -> Callable[[int, Size], Block]:
    """Return ``make(width, size)`` building one block of the requested kind (the paper's
    blocks start at norm ``init_norm``: the non-expansive block's operator, each of the residual
    block's two convolutions; with PyTorch's biases when ``torch_bias``)."""

    def conv(width: int, size: Size, padding: int = kernel // 2) -> Conv2dOperator:
        op = Conv2dOperator(width, width, kernel, size, padding=padding)
        return _torch_biased(op, torch_bias)

    def make(width: int, size: Size) -> Block:
        if block == "nonexpansive":
            return NonexpansiveBlock(
                conv(width, size),
                build_activation(activation),
                integrator,
                theta,
                time,
                init_norm=init_norm,
            )
        if block == "residual":
            pad = same_padding(kernel, "block 'residual'")
            first, second = (_init_normed(conv(width, size, pad), init_norm) for _ in range(2))
            return ResidualBlock(first, second, build_activation(activation))
        if block in FAMILIES:
            return build_family_block(block, width, size, kernel, activation, theta, integrator)
        raise ValueError(f"unknown block {block!r}; allowed: {list(BLOCKS)}")

    return make


def _sigma_estimate(op: LinearOperator) -> torch.Tensor:
    """``||A u|| / ||u||`` after one warm-started power iteration: a cheap lower estimate of
    ``||A||`` that is differentiable in the weight (``u`` is a constant)."""
    op.power_iteration(1)
    u = op.u.to(op.weight.dtype)
    return op._apply_with(op.weight, u).norm() / u.norm()


def _block_estimate(block: Block) -> torch.Tensor | float:
    """Training-time Lipschitz estimate of one block (norm estimates, no certificate)."""
    estimate = getattr(block, "lipschitz_estimate", None)
    if estimate is not None:
        return estimate()
    if isinstance(block, NonexpansiveBlock):
        if block.tableau.radius > 0 and block.theta <= 1:
            # substeps() keeps (T/n) L ||A||^2 / 2 <= radius * theta <= radius at every norm, so
            # the test below passes whatever the norm: no norm read on the host (a margin-loss
            # step stays capturable in a CUDA graph, whose key holds n and T/n, not the norm)
            return 1.0
        norm = float(block.operator.sigma_estimate)
        n = block.substeps(norm)
        h_ell = float(block.time) / n * block._ell(norm)
        if block.tableau.radius > 0 and h_ell / 2 <= block.tableau.radius:
            return 1.0
        return block.tableau.stagewise_lipschitz(h_ell) ** n
    if isinstance(block, ResidualBlock):
        lip = getattr(block.activation, "lipschitz", None)
        if lip is None:
            raise ValueError(
                "a ResidualBlock's Lipschitz estimate needs an activation with .lipschitz"
            )
        return 1.0 + _sigma_estimate(block.second) * lip * _sigma_estimate(block.first)
    raise TypeError(f"no Lipschitz estimate for {type(block).__name__}")


class Classifier(StableModel):
    """The paper's classifier skeleton; ``block`` selects the block: the paper's non-expansive or
    residual block, or one of the other 1-Lipschitz families (``cpl``, ``sll``, ``aol``,
    ``orthogonal``; see ``families.py``).

    ``init_norm``: lift, transitions, head and the paper's blocks (the non-expansive block's
    operator, both convolutions of the residual block) start at this norm estimate
    (``LinearOperator.rescale_``), then train freely, as the scripts build their non-expansive
    classifier (``nonexpansive_classifier``'s default: 1); ``None`` keeps PyTorch's
    initialisation, as the scripts' ResNet does (the default of the others: the families are not
    in the scripts, and their blocks keep their own parametrisations). The skeleton and the
    paper's blocks draw PyTorch's default biases when ``torch_bias``, as the scripts' layers do
    (the default of the paper's two classifiers; the families start at zero biases).
    """

    def __init__(
        self,
        block: str = "nonexpansive",
        in_channels: int = 3,
        num_classes: int = 10,
        base_width: int = 16,
        stages: int = 3,
        blocks_per_stage: int = 5,
        kernel_size: int = 3,
        activation: str = "leaky_relu",
        integrator: str = "euler",
        theta: float = 1.0,
        time: float | None = None,
        input_size: int | list[int] = 32,
        init_norm: float | None = None,
        torch_bias: bool = False,
    ) -> None:
        super().__init__()
        size = _size(input_size)
        make = _block_factory(
            block, activation, integrator, theta, time, kernel_size, init_norm, torch_bias
        )
        self.base_width = base_width
        self.lift = Conv2dOperator(in_channels, base_width, 1, size)
        if stages < 1:
            raise ValueError(f"a classifier needs at least one stage, got stages={stages}")
        self.sizes: list[Size] = []
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        width = base_width
        for _ in range(stages):
            if min(size) < 2:
                raise ValueError(f"input_size {input_size} is too small for {stages} stages")
            self.sizes.append(size)
            self.stages.append(nn.Sequential(*(make(width, size) for _ in range(blocks_per_stage))))
            self.transitions.append(Conv2dOperator(width, 2 * width, 1, size))
            width, size = 2 * width, (size[0] // 2, size[1] // 2)
        self.final_size = size
        self.head = DenseOperator(width, num_classes)
        for op in (self.lift, *self.transitions, self.head):
            _init_normed(_torch_biased(cast(LinearOperator, op), torch_bias), init_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.sizes[0]:  # the global mean's 1/sqrt(HW) depends on it
            raise ValueError(
                f"this classifier is built and certified for {self.sizes[0]} inputs, got "
                f"{tuple(x.shape[-2:])}: its lipschitz_bound() would not hold"
            )
        x = self.lift(x)
        for stage, transition in zip(self.stages, self.transitions, strict=True):
            x = F.avg_pool2d(transition(stage(x)), 2)
        return self.head(x.mean(dim=(-2, -1)))  # (N,) C, H, W: batched or one image

    def stage_layers(self) -> Iterator[tuple[list[Block], Conv2dOperator, Size]]:
        """``(blocks, transition, input size)`` of each stage."""
        for stage, transition, size in zip(self.stages, self.transitions, self.sizes, strict=True):
            # cast: __init__ fills each stage with make()'s blocks, each transition a Conv2dOperator
            yield list(cast("Iterable[Block]", stage)), cast(Conv2dOperator, transition), size

    def lipschitz_bound(self) -> float:
        """Product of certified bounds of every layer, pooling included."""
        bound = self.lift.norm_bound(self.sizes[0])
        for stage, transition, size in self.stage_layers():
            for block in stage:
                bound *= block.lipschitz_bound(size)
            bound *= transition.norm_bound(size) * 0.5
        bound /= math.sqrt(self.final_size[0] * self.final_size[1])
        return bound * self.head.norm_bound()

    def lipschitz_estimate(self) -> torch.Tensor:
        """Cheap training-time estimate of ``lipschitz_bound()``: the same product with
        power-iteration norms (one warm-started iteration per call), differentiable in the
        weights; for margin losses, never a certificate. A non-expansive block counts as 1, as
        it is in ``eval()``; in ``train()`` its sub-steps follow the estimate, which can lag a
        large weight step (a review measured a train-mode block at Lipschitz 18.7, 0.99998 in
        ``eval()``)."""
        est = _sigma_estimate(self.lift)
        for stage, transition, _ in self.stage_layers():
            for block in stage:
                est = est * _block_estimate(block)
            est = est * _sigma_estimate(transition) * 0.5
        est = est / math.sqrt(self.final_size[0] * self.final_size[1])
        return est * _sigma_estimate(self.head)


class NonexpansiveDenoiser(StableModel):
    """Blocks acting on channels zero-padded from ``channels`` to ``width``; output ``N(x)`` or
    ``x - N(x)`` (``residual=True``). The paper's blocks start at norm ``init_norm`` (the
    scripts: 1; ``None`` keeps the initialisation) with PyTorch's default biases when
    ``torch_bias`` (the scripts' layers; else zeros); the families' blocks keep their own."""

    def __init__(
        self,
        channels: int = 3,
        width: int = 64,
        depth: int = 10,
        kernel_size: int = 3,
        activation: str = "leaky_relu",
        integrator: str = "euler",
        theta: float = 1.0,
        time: float | None = None,
        residual: bool = False,
        input_size: int | tuple[int, int] | list[int] = (321, 481),
        power_size: int | list[int] | None = None,
        block: str = "nonexpansive",
        init_norm: float | None = 1.0,
        torch_bias: bool = True,
    ) -> None:
        super().__init__()
        if width < channels:
            raise ValueError(f"width {width} must be >= channels {channels}")
        if block not in DENOISER_BLOCKS:
            raise ValueError(f"unknown denoiser block {block!r}; allowed: {list(DENOISER_BLOCKS)}")
        self.channels, self.width, self.residual = channels, width, residual
        self.input_size = _size(input_size)
        psize = _size(power_size) if power_size is not None else None

        def make() -> NonexpansiveBlock | FamilyBlock:
            if block != "nonexpansive":
                return build_family_block(
                    block, width, self.input_size, kernel_size, activation, theta, integrator, psize
                )
            return NonexpansiveBlock(
                _torch_biased(
                    Conv2dOperator(
                        width, width, kernel_size, self.input_size, psize, padding=kernel_size // 2
                    ),
                    torch_bias,
                ),
                build_activation(activation),
                integrator,
                theta,
                time,
                init_norm=init_norm,
            )

        self.blocks = nn.Sequential(*(make() for _ in range(depth)))

    def network(self, x: torch.Tensor) -> torch.Tensor:
        """``N(x) = P^T (blocks) P x`` with ``P`` the zero-padding isometry."""
        z = F.pad(x, (0, 0, 0, 0, 0, self.width - self.channels))
        return self.blocks(z)[..., : self.channels, :, :]  # (N,) C, H, W: batched or one image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return x - out if self.residual else out

    def _typed_blocks(self) -> list[NonexpansiveBlock | FamilyBlock]:
        # cast: __init__ fills `blocks` with make()'s blocks only
        return list(cast("Iterable[NonexpansiveBlock | FamilyBlock]", self.blocks))

    def _network_averagedness(self, size: Size) -> float | None:
        alpha: float | None = None
        for block in self._typed_blocks():
            a = block.averagedness(size)
            if a is None:
                return None
            alpha = a if alpha is None else compose_averaged(alpha, a)
        return alpha

    def averagedness(self, input_size: Size | None = None) -> float | None:
        """alpha-averagedness of the ``eval()`` denoiser on ``input_size`` images (default: the
        size it was built for), or ``None`` when nothing is guaranteed.

        ``P^T T P`` keeps ``T``'s averagedness. For ``N = (1 - alpha) I + alpha R`` (``R``
        non-expansive), ``I - N = 2 alpha F`` with ``F = (I - R) / 2`` firmly non-expansive, so
        ``I - N`` is firmly non-expansive (1/2-averaged, tight) when ``alpha <= 1/2`` and not even
        non-expansive in general above. The denoiser runs on any size, and its sub-step
        counts, so alpha, follow the certified norms at that size: ask for the size it runs on
        (a smaller image may take fewer sub-steps and be less averaged).
        """
        alpha = self._network_averagedness(input_size or self.input_size)
        if alpha is None or not self.residual:
            return alpha
        return 0.5 if alpha <= 0.5 else None

    def lipschitz_bound(self, input_size: Size | None = None) -> float:
        """Product of block bounds; residual: ``min(1 + Lip(N), 2 alpha)`` (``I - N = alpha (I -
        R)`` for an alpha-averaged ``N = (1 - alpha) I + alpha R``)."""
        size = input_size or self.input_size
        bound = math.prod(block.lipschitz_bound(size) for block in self._typed_blocks())
        if not self.residual:
            return bound
        alpha = self._network_averagedness(size)
        return min(1.0 + bound, 2.0 * alpha) if alpha is not None else 1.0 + bound


class DnCNN(StableModel):
    """DnCNN: conv+ReLU, (depth-2) x conv+BN+ReLU, conv; output ``x - net(x)``."""

    def __init__(
        self,
        channels: int = 3,
        width: int = 64,
        depth: int = 20,
        kernel_size: int = 3,
        input_size: int | tuple[int, int] | list[int] = (321, 481),
    ) -> None:
        super().__init__()
        self.input_size = _size(input_size)
        pad = same_padding(kernel_size, "dncnn")

        def conv(cin: int, cout: int, bias: bool) -> Conv2dOperator:
            return Conv2dOperator(cin, cout, kernel_size, self.input_size, padding=pad, bias=bias)

        layers: list[nn.Module] = [conv(channels, width, True), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [conv(width, width, False), nn.BatchNorm2d(width), nn.ReLU()]
        layers.append(conv(width, channels, False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.net(x)

    def lipschitz_bound(self, input_size: Size | None = None) -> float:
        """``1 + prod ||conv|| * prod max|gamma| / sqrt(running_var + eps)`` (eval-mode BN)."""
        size = input_size or self.input_size
        bound = 1.0
        for m in self.net:
            if isinstance(m, Conv2dOperator):
                bound *= m.norm_bound(size)
            elif isinstance(m, nn.BatchNorm2d):
                if m.running_var is None:
                    raise ValueError("DnCNN.lipschitz_bound needs batch norm running statistics")
                scale = m.weight.detach().abs() / torch.sqrt(m.running_var + m.eps)
                bound *= float(scale.max())
        return 1.0 + bound


def _classifier(block: str, **defaults: Any) -> Callable[..., StableModel]:
    """``Classifier`` with ``block`` and ``defaults`` bound, keeping its signature (the config's
    checks read it) and letting a variant's kwargs override the defaults."""
    return functools.partial(Classifier, block=block, **defaults)


# The one registry of model names: ``build_model`` builds from ``MODELS``; the config's checks
# and the pipeline's jobs take a variant's kind from ``CLASSIFIERS`` / ``DENOISERS``.
CLASSIFIER_MODELS: dict[str, Callable[..., StableModel]] = {
    # the scripts' two classifiers, initialised as there
    "nonexpansive_classifier": _classifier("nonexpansive", init_norm=1.0, torch_bias=True),
    "resnet_classifier": _classifier("residual", torch_bias=True),
    "cpl_classifier": _classifier("cpl"),
    "sll_classifier": _classifier("sll"),
    "aol_classifier": _classifier("aol"),
    "orthogonal_classifier": _classifier("orthogonal"),
}
DENOISER_MODELS: dict[str, Callable[..., StableModel]] = {
    "nonexpansive_denoiser": NonexpansiveDenoiser,
    "dncnn": DnCNN,
}
MODELS: dict[str, Callable[..., StableModel]] = {**CLASSIFIER_MODELS, **DENOISER_MODELS}
CLASSIFIERS = frozenset(CLASSIFIER_MODELS)
DENOISERS = frozenset(DENOISER_MODELS)


# The block settings of the skeletons, and those each block reads: given to another block, a
# setting would change nothing (an AOL block has no theta; only the paper's blocks integrate).
# ``init_norm`` and ``torch_bias`` also set a classifier's lift, transitions and head;
# ``power_size`` is the denoiser's (SLL and AOL carry a token grid: ``token_power_size``).
_BLOCK_SETTINGS = frozenset(
    {"integrator", "theta", "time", "init_norm", "torch_bias", "power_size"}
)
_BLOCK_READS: dict[str, frozenset[str]] = {
    "nonexpansive": _BLOCK_SETTINGS,
    "residual": frozenset({"torch_bias", "init_norm"}),
    "cpl": frozenset({"theta", "integrator", "power_size"}),  # the integrator: Euler only
    "sll": frozenset({"theta"}),
    "aol": frozenset(),
    "orthogonal": frozenset(),
}


def model_arguments(name: str) -> list[str]:
    """The keyword arguments ``build_model(name, ...)`` accepts, from the constructor's signature
    (a classifier's block comes with its name: not an argument)."""
    params = inspect.signature(MODELS[name]).parameters
    return [p for p in params if not (p == "block" and name in CLASSIFIER_MODELS)]


def model_defaults(name: str) -> dict[str, Any]:
    """The default of each argument ``build_model(name, ...)`` accepts."""
    params = inspect.signature(MODELS[name]).parameters
    return {p: params[p].default for p in model_arguments(name)}


def model_block(name: str, kwargs: Mapping[str, Any]) -> str | None:
    """The block ``build_model(name, **kwargs)`` stacks (``None``: a model without blocks)."""
    params = inspect.signature(MODELS[name]).parameters
    if "block" not in params:
        return None
    return kwargs.get("block", params["block"].default)


def unused_arguments(name: str, kwargs: Mapping[str, Any]) -> list[str]:
    """The block settings in ``kwargs`` that the block of ``build_model(name, **kwargs)`` ignores:
    the model is built as if they were not given."""
    block = model_block(name, kwargs)
    if block is None:
        return []
    ignored = _BLOCK_SETTINGS - _BLOCK_READS[block]
    if name in CLASSIFIER_MODELS:
        ignored -= {"init_norm", "torch_bias"}
    return sorted(ignored & set(kwargs))


def build_model(name: str, **kwargs: Any) -> StableModel:
    """Build the model registered as ``name``; remembers ``name`` and ``kwargs`` for checkpoints."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
    unknown = sorted(set(kwargs) - set(model_arguments(name)))
    if unknown:
        raise ValueError(f"model {name!r} takes no {unknown}; allowed: {model_arguments(name)}")
    try:
        model = MODELS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"model {name!r}: bad arguments {sorted(kwargs)}: {err}") from None
    model.model_name, model.model_kwargs = name, dict(kwargs)
    return model


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or for another model."""


CHECKPOINT_FORMAT = "stablenets-model-v1"


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: no partial files."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_model(model: StableModel, path: Path, **extra: Any) -> None:
    """Write everything needed to rebuild ``model`` (plus ``extra`` metadata) atomically."""
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "name": model.model_name,
            "kwargs": model.model_kwargs,
            "state_dict": model.state_dict(),
            "extra": extra,
        },
        path,
    )


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True``; one clear error for any bad file
    (``CheckpointError``). A read the machine fails (``errors.is_transient_read_error``) raises
    instead: an ``OSError`` naming the file, or the memory error as it is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise_if_transient(err, f"checkpoint {path}")
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or foreign): {first_line(err)}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file")
    return ckpt


def _non_finite_entry(state: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding a NaN or an infinity:
    such weights would give NaN bounds and chance-level accuracies without a word."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not torch.isfinite(value).all():
                return name
    return None


def load_model(
    path: Path, map_location: str | torch.device = "cpu", expect_name: str | None = None
) -> StableModel:
    """Rebuild the model saved at ``path``, in ``eval()`` mode."""
    ckpt = read_checkpoint(path, map_location)
    parts = (ckpt.get("name"), ckpt.get("kwargs"), ckpt.get("state_dict"))
    if not isinstance(parts[0], str) or not all(isinstance(p, Mapping) for p in parts[1:]):
        raise CheckpointError(f"checkpoint {path} holds no model (a training run's checkpoint?)")
    if expect_name is not None and ckpt["name"] != expect_name:
        raise CheckpointError(
            f"checkpoint {path} holds model {ckpt['name']!r}, expected {expect_name!r}"
        )
    if (broken := _non_finite_entry(ckpt["state_dict"])) is not None:
        raise CheckpointError(
            f"checkpoint {path}: {broken} holds NaN or infinite values (a diverged training?)"
        )
    try:  # e.g. an even kernel that older code took
        model = build_model(ckpt["name"], **ckpt["kwargs"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {first_line(err)}") from err
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit {ckpt['name']!r}: {first_line(err)}"
        ) from None
    return model.to(map_location).eval()
