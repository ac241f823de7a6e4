"""Tests of stablenets.nn.models: adversarial Lipschitz / averagedness audits of every model kind,
checkpoints, the model registry, and adaptive sub-steps in training."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from audit import adversary, averaged_objective
from torch import nn
from torch.overrides import TorchFunctionMode

import stablenets
from stablenets.nn.blocks import TIME_HEADROOM, NonexpansiveBlock, ResidualBlock
from stablenets.nn.families import AOLBlock, OrthogonalBlock, SLLBlock
from stablenets.nn.integrators import compose_averaged
from stablenets.nn.losses import build_loss
from stablenets.nn.models import (
    CLASSIFIERS,
    DENOISER_BLOCKS,
    MODELS,
    build_model,
    load_model,
    read_checkpoint,
    save_model,
)
from stablenets.nn.operators import Conv2dOperator, LinearOperator, pinned_weights

TOL = 1e-9  # relative slack allowed above a certified bound (float64 rounding)

SMALL = {
    "nonexpansive_classifier": {
        "base_width": 4,
        "stages": 2,
        "blocks_per_stage": 2,
        "input_size": 8,
    },
    "resnet_classifier": {"base_width": 4, "stages": 2, "blocks_per_stage": 2, "input_size": 8},
    "nonexpansive_denoiser": {"width": 6, "depth": 3, "input_size": (8, 10)},
    "dncnn": {"width": 6, "depth": 4, "input_size": 8},
}
SHAPE = {
    "nonexpansive_classifier": (3, 8, 8),
    "resnet_classifier": (3, 8, 8),
    "nonexpansive_denoiser": (3, 8, 10),
    "dncnn": (3, 8, 8),
}

# A covering design of the denoiser variants: every integrator with both outputs (direct and
# residual) and both thetas, every (residual, theta) pair.
DENOISERS = [
    ("euler", False, 1.0),
    ("euler", True, 0.5),
    ("heun", False, 0.5),
    ("heun", True, 1.0),
    ("ssprk3", False, 1.0),
    ("ssprk3", True, 0.5),
    ("rk4", False, 0.5),
    ("rk4", True, 1.0),
]

RESULTS: dict[str, tuple[float, float]] = {}  # label -> (largest ratio found, bound)

BLOCKS = (NonexpansiveBlock, ResidualBlock, SLLBlock, AOLBlock, OrthogonalBlock)


@pytest.fixture(autouse=True, scope="module")
def _report() -> Iterator[None]:
    """After the module: the largest ratio the adversary found against each bound."""
    yield
    if RESULTS:
        print("\nadversarial audit: largest ratio found / certified bound")
        for label, (ratio, bound) in RESULTS.items():
            print(f"  {label:48s} {ratio:.6f} / {bound:.6g}")


def jacobian_norm(model: nn.Module, shape: tuple[int, ...], points: int = 3) -> float:
    """Largest spectral norm of the exact Jacobian at a few random points (a local Lipschitz
    constant, a second, independent lower bound of the Lipschitz constant)."""
    g = torch.Generator().manual_seed(123)
    best = 0.0
    for _ in range(points):
        x = torch.rand(1, *shape, generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(model, x)
        jac = jac.reshape(-1, math.prod(shape))
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    return best


# --------------------------------------------------------------------------------------------
# Helpers


def _build(name: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **{**SMALL[name], **overrides})


def _operators(model: nn.Module) -> list[LinearOperator]:
    return [m for m in model.modules() if isinstance(m, LinearOperator)]


def _stress(
    model: nn.Module, factor: float = 2.0, seed: int = 1, bias: float | None = None
) -> nn.Module:
    """float64, eval, random biases (or all equal to ``bias``) and batch-norm statistics,
    constrained (and residual) block weights scaled by ``factor`` so that blocks take several
    sub-steps."""
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, NonexpansiveBlock):
                block.operator.weight.mul_(factor)
            elif type(block).__name__ == "ResidualBlock":
                block.first.weight.mul_(factor)
        for op in _operators(model):
            if op.bias is not None:
                noise = 0.3 * torch.randn(op.bias.shape, generator=g, dtype=torch.float64)
                op.bias.copy_(noise if bias is None else torch.full_like(noise, bias))
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.weight.copy_(1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64))
                bn.bias.copy_(0.1 * torch.randn(c, generator=g, dtype=torch.float64))
                bn.running_mean.copy_(0.1 * torch.randn(c, generator=g, dtype=torch.float64))
                bn.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
    return model


def _audit(label: str, model: nn.Module, shape, steps: int = 100, starts: int = 8) -> float:
    bound = model.lipschitz_bound()
    ratio = adversary(model, shape, steps=steps, starts=starts, images=True)
    local = jacobian_norm(model, shape)
    RESULTS[label] = (max(ratio, local), bound)
    print(f"{label}: adversary {ratio:.6f}, Jacobian {local:.6f}, bound {bound:.6g}")
    assert ratio <= bound * (1 + TOL), (label, ratio, bound)
    assert local <= bound * (1 + TOL), (label, local, bound)
    # the attack is not degenerate: it reaches the local Jacobian norm, a lower bound it should beat
    assert ratio > 0.9 * local > 0
    return ratio


# --------------------------------------------------------------------------------------------
# Adversarial Lipschitz audit of every model kind


@pytest.mark.parametrize("name", ["nonexpansive_classifier", "resnet_classifier"])
def test_classifier_lipschitz_bound_survives_attack(name):
    model = _stress(_build(name))
    with torch.no_grad():
        model(torch.rand(1, *SHAPE[name], dtype=torch.float64))
    if name == "nonexpansive_classifier":
        assert all(n > 1 for n, _ in model.block_stats())
        # Each stage of blocks alone (a sharper test than the whole, loosely bounded, model).
        for i, (stage, size) in enumerate(zip(model.stages, model.sizes, strict=True)):
            width = stage[0].operator.in_channels
            assert all(block.lipschitz_bound(size) == 1.0 for block in stage)
            ratio = adversary(stage, (width, *size), steps=60, starts=6, images=True)
            RESULTS[f"{name} stage {i}"] = (ratio, 1.0)
            assert 0.5 < ratio <= 1 + TOL
    _audit(name, model, SHAPE[name])


@pytest.mark.parametrize(("integrator", "residual", "theta"), DENOISERS)
def test_denoiser_lipschitz_bound_survives_attack(integrator, residual, theta):
    model = _stress(
        _build("nonexpansive_denoiser", integrator=integrator, residual=residual, theta=theta)
    )
    with torch.no_grad():
        model(torch.rand(1, 3, 8, 10, dtype=torch.float64))
    assert all(n > 1 for n, _ in model.block_stats())
    bound = model.lipschitz_bound()
    if integrator == "rk4":
        assert bound > 1.0  # RK4 has radius 0: the sound bound is stage-wise
    elif not residual:
        assert bound == 1.0
    else:
        assert 1.0 <= bound <= 2.0
    label = f"nonexpansive_denoiser {integrator} residual={residual} theta={theta}"
    steps = {"euler": 100, "heun": 80, "ssprk3": 60, "rk4": 40}[integrator]
    ratio = _audit(label, model, (3, 8, 10), steps=steps, starts=6)
    if not residual:
        assert ratio <= 1 + TOL


def test_dncnn_lipschitz_bound_survives_attack():
    model = _stress(_build("dncnn"), factor=1.0)
    _audit("dncnn", model, SHAPE["dncnn"])


def test_classifier_bound_counts_pooling_and_global_mean():
    """With blocks of negligible integration time the classifier is an affine map whose exact
    norm (dense Jacobian) must not exceed the bound, which counts 1/2 per 2x2 average pooling
    and 1/sqrt(H W) for the global mean."""
    model = _build("nonexpansive_classifier", time=1e-12).double().eval()
    bound = model.lipschitz_bound()
    local = jacobian_norm(model, SHAPE["nonexpansive_classifier"], points=1)
    assert local <= bound * (1 + TOL)
    pool = nn.AvgPool2d(2)
    eye = torch.eye(16, dtype=torch.float64).reshape(16, 1, 4, 4)
    assert float(torch.linalg.matrix_norm(pool(eye).reshape(16, -1), 2)) == pytest.approx(0.5)
    print(f"near-linear classifier: Jacobian norm {local:.6f}, bound {bound:.6f}")


@pytest.mark.parametrize("name", ["nonexpansive_classifier", "denoiser"])
def test_the_scripts_models_start_at_norm_one_with_pytorch_biases(name):
    """The scripts rescale lift, blocks, transitions and head of their non-expansive models to
    norm 1 at construction (then train them freely): norms within the warm start's 0.5 %, and each
    block then integrates ``T = r / (L sigma_0^2)``, about 1, in one sub-step. Their layers are
    PyTorch's, so the biases are drawn (not 0). ``init_norm=None`` keeps the initialisation,
    ``torch_bias=False`` gives zero biases."""
    built = "nonexpansive_denoiser" if name == "denoiser" else name
    model = _build(built).double().eval()
    skeleton = [] if name == "denoiser" else [model.lift, *model.transitions, model.head]
    blocks = list(model.constrained_blocks())
    for op in skeleton + [block.operator for block in blocks]:
        norm = float(copy.deepcopy(op).power_iteration(2000))  # converged: the norm, from below
        # (the float32 weight's rounding of the scale: a few 1e-9 below)
        assert 1.0 - 1e-7 <= norm <= 1.005, type(op).__name__
        assert op.bias is not None and bool(op.bias.detach().all())
    for block in blocks:
        assert float(block.time) == pytest.approx(1 / (1 + TIME_HEADROOM) ** 2, rel=0.006)
    model(torch.rand(1, *SHAPE[built], dtype=torch.float64))
    assert all(n == 1 for n, _ in model.block_stats())
    raw = _build(built, init_norm=None)
    norms = [op.norm_bound() for op in (raw.lift, raw.head)] if skeleton else []
    norms += [block.operator.norm_bound() for block in raw.constrained_blocks()]
    assert max(abs(n - 1) for n in norms) > 0.05
    unbiased = _build(built, torch_bias=False)
    ops = [unbiased.lift, *unbiased.transitions, unbiased.head] if skeleton else []
    for op in ops + [block.operator for block in unbiased.constrained_blocks()]:
        assert op.bias is not None and not bool(op.bias.detach().any()), type(op).__name__


def test_the_resnet_keeps_pytorchs_initialisation_and_the_families_zero_biases():
    """The scripts' ResNet is built of plain PyTorch layers (no rescaling, drawn biases); the
    families are not in the scripts and keep our initialisation (zero biases, no rescaling)."""
    resnet = _build("resnet_classifier")
    assert abs(resnet.lift.norm_bound() - 1) > 0.05 and abs(resnet.head.norm_bound() - 1) > 0.05
    assert all(bool(op.bias.detach().all()) for op in _operators(resnet) if op.bias is not None)
    torch.manual_seed(0)
    cpl = build_model("cpl_classifier", **SMALL["nonexpansive_classifier"])
    assert abs(cpl.lift.norm_bound() - 1) > 0.05
    assert not any(bool(op.bias.detach().any()) for op in _operators(cpl) if op.bias is not None)


def test_resnet_init_norm_starts_its_residual_convolutions_at_that_norm_too():
    """``init_norm`` starts lift, transitions, head and the paper's blocks at that norm: the
    ResNet's blocks are two convolutions each, rescaled as the skeleton (before, only the
    skeleton was). The default (``None``) keeps PyTorch's draws, which ``init_norm`` only scales,
    biases kept."""
    scaled = _build("resnet_classifier", init_norm=1.0).double()
    raw = _build("resnet_classifier").double()
    pairs = [
        (getattr(s, conv), getattr(r, conv))
        for s, r in zip(scaled.modules(), raw.modules(), strict=True)
        if isinstance(s, ResidualBlock)
        for conv in ("first", "second")
    ]
    assert len(pairs) == 8
    for s, r in pairs:
        # converged: the norm, from below; the 20-iteration warm start is within a few % at 4
        # and 8 channels on 8x8 (as the non-expansive blocks' start)
        norm = float(copy.deepcopy(s).power_iteration(2000))
        assert 1.0 - 1e-7 <= norm <= 1.05
        # rescale_'s estimate 1, refreshed by one more (non-decreasing) iteration
        assert 1.0 - 1e-6 <= float(s.sigma_estimate) <= norm * (1 + 1e-6)
        ratio = (s.weight / r.weight).detach()
        assert torch.allclose(ratio, ratio.flatten()[0], rtol=1e-6)
        assert torch.equal(s.bias, r.bias)
    assert max(abs(r.norm_bound() - 1) for _, r in pairs) > 0.05


@pytest.mark.parametrize("block", ["sll", "aol"])
def test_an_sll_or_aol_denoiser_checkpoint_at_a_large_size_is_small_and_round_trips(
    block, tmp_path
):
    """Its file holds the parameters, not power vectors of the image's size (before: 4.9 MB a
    block at width 8 and 321 x 481); it loads to the same model, and so does a checkpoint written
    before, with those vectors (never read: the loaded blocks keep their token ones)."""
    kwargs = {"block": block, "width": 8, "depth": 2, "input_size": [321, 481]}
    torch.manual_seed(0)
    model = build_model("nonexpansive_denoiser", **kwargs).eval()
    with torch.no_grad():
        for op in _operators(model):  # away from AOL's identity start
            op.weight.add_(0.1 * torch.randn_like(op.weight))
    path = tmp_path / "model.pt"
    save_model(model, path)
    assert path.stat().st_size < 64 * 2**10
    x = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    ckpt = read_checkpoint(path)
    for key in list(ckpt["state_dict"]):
        if key.endswith(".u"):
            ckpt["state_dict"][key] = torch.randn(1, 8, 321, 481)
    torch.save(ckpt, tmp_path / "old.pt")
    for loaded in (load_model(path), load_model(tmp_path / "old.pt")):
        state, other = model.state_dict(), loaded.state_dict()
        assert state.keys() == other.keys()
        assert all(torch.equal(state[k], other[k]) for k in state if not k.endswith(".u"))
        assert all(other[k].shape == (1, 8, 3, 3) for k in other if k.endswith(".u"))
        with torch.no_grad():
            assert torch.equal(model(x), loaded(x))
        assert loaded.lipschitz_bound((20, 24)) == model.lipschitz_bound((20, 24))


def test_a_classifier_refuses_inputs_of_another_size_than_its_certificate():
    """A smaller image makes the global mean larger (1/sqrt(H W)): the bound of the built size
    would not hold, so the forward pass says so instead."""
    model = _build("nonexpansive_classifier").double().eval()
    size = model.sizes[0]
    model(torch.zeros(1, 3, *size, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"certified for \({size[0]}, {size[1]}\) inputs, got"):
        model(torch.zeros(1, 3, size[0] // 2, size[1] // 2, dtype=torch.float64))


# Every model, the denoiser with each of its blocks: a model's bound certifies each block at its
# stage's image size, so no block may change that size, whatever kernel a user asks for.
EVERY_MODEL = [(name, {}) for name in MODELS if name != "nonexpansive_denoiser"] + [
    ("nonexpansive_denoiser", {"block": block}) for block in DENOISER_BLOCKS
]
# Blocks of pairs A^T A (the paper's, CPL, SLL) or of circular convolutions (orthogonal) keep the
# size with every kernel; those of one zero-padded convolution a step keep it with odd ones only.
ONE_CONVOLUTION = {"aol_classifier", "resnet_classifier", "dncnn", "aol"}


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4])
@pytest.mark.parametrize(("name", "extra"), EVERY_MODEL)
def test_every_block_keeps_its_image_size_or_the_model_refuses_the_kernel(name, extra, kernel_size):
    """An even kernel with padding ``k // 2`` grows the image by a pixel a convolution: an AOL
    block would then run on a larger grid than its bound was certified for (a review measured
    an AOL classifier's logits at 21x its bound so). A model of such blocks refuses an even
    kernel in one line; the others take it and keep every block's size."""
    small = SMALL.get(name, SMALL["nonexpansive_classifier"] if name in CLASSIFIERS else {})
    kwargs = {**small, **extra, "kernel_size": kernel_size}
    refuses = kernel_size % 2 == 0 and {name, extra.get("block")} & ONE_CONVOLUTION
    if refuses:
        with pytest.raises(
            ValueError, match=f"odd kernel_size to keep the image size; got {kernel_size}"
        ):
            build_model(name, **kwargs)
        return
    model = build_model(name, **kwargs).double().eval()
    changed = []

    def keeps_size(block: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if out.shape != inputs[0].shape:
            changed.append((type(block).__name__, tuple(inputs[0].shape), tuple(out.shape)))

    hooked = [b.register_forward_hook(keeps_size) for b in model.modules() if isinstance(b, BLOCKS)]
    size = model.sizes[0] if name in CLASSIFIERS else model.input_size
    x = torch.rand(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    assert not changed, changed
    assert hooked or out.shape == x.shape  # DnCNN: layers, no blocks; x - net(x) keeps the size


@pytest.mark.parametrize(("name", "extra"), EVERY_MODEL)
def test_one_unbatched_image_gives_what_it_gives_in_a_batch(name, extra):
    """Blocks take ``(C, H, W)`` as ``(N, C, H, W)``; the denoiser sliced the height as if it
    were the channels (a (3, 8, 10) image gave a (6, 3, 10) tensor) and the classifier failed."""
    small = SMALL.get(name, SMALL["nonexpansive_classifier"] if name in CLASSIFIERS else {})
    model = build_model(name, **{**small, **extra}).double().eval()
    size = model.sizes[0] if name in CLASSIFIERS else model.input_size
    x = torch.rand(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if name == "dncnn":  # its batch norm takes batches only, and says so
        with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
            model(x[1])
        return
    with torch.no_grad():
        batched, alone = model(x), model(x[1])
    assert alone.shape == batched.shape[1:]
    assert torch.allclose(alone, batched[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("residual", [False, True])
def test_averaged_denoiser_satisfies_the_averagedness_inequality_under_attack(residual):
    # (depth, theta, time, weight factor, bias). Residual: I - N is 1/2-averaged only when N is
    # alpha-averaged with alpha <= 1/2: one Euler block with theta = 0.5 (alpha = 1/2), or
    # three with theta = 0.2 and T = 0.38 (one sub-step each at norm 1, alpha about 0.41; at the
    # default T = 1 / 1.02^2, theta = 0.2 only splits each block into three sub-steps, about
    # 0.35-averaged together). A bias of 3 puts every unit in its linear region, where the attack
    # also shows the check is not vacuous: a third of alpha is violated.
    if residual:
        configs = [(1, 0.5, None, 1.0, None), (3, 0.2, 0.38, 1.0, None), (1, 0.5, None, 1.0, 3.0)]
    else:
        configs = [(3, 0.5, None, 1.0, None), (3, 0.5, None, 1.5, None), (1, 0.5, None, 1.0, 3.0)]
    for depth, theta, time, factor, bias in configs:
        model = _build(
            "nonexpansive_denoiser",
            integrator="euler",
            residual=residual,
            theta=theta,
            depth=depth,
            time=time,
        )
        model = _stress(model, factor=factor, bias=bias)
        alpha = model.averagedness()
        assert alpha is not None and 0 < alpha < 1
        worst = adversary(
            model, (3, 8, 10), averaged_objective(alpha), steps=60, starts=6, images=True
        )
        label = f"denoiser residual={residual} depth={depth} theta={theta} x{factor} bias={bias}"
        print(f"{label}: alpha {alpha:.4f}, max violation {worst:.3e}")
        assert worst <= TOL
        if bias is not None:
            assert (
                adversary(model, (3, 8, 10), averaged_objective(alpha / 3), steps=30, images=True)
                > 0
            )
        if residual:  # I - N = alpha_N (I - R): Lipschitz 2 alpha_N <= 1
            network = model._network_averagedness(model.input_size)
            assert alpha == 0.5 and network is not None and network <= 0.5
            assert model.lipschitz_bound() == pytest.approx(2 * network, rel=1e-12)


def test_averagedness_is_none_when_not_guaranteed():
    assert _build("nonexpansive_denoiser", integrator="rk4", theta=0.5).averagedness() is None
    model = _build("nonexpansive_denoiser", integrator="euler", theta=0.5, residual=True)
    # Three blocks, each alpha-averaged with alpha just under 1/2 (the default integration time
    # leaves headroom), compose to about 3/4 > 1/2: no guarantee for I - N.
    alphas = [block.averagedness() for block in model.blocks]
    assert all(0.45 < a < 0.5 for a in alphas), alphas
    composed = compose_averaged(compose_averaged(alphas[0], alphas[1]), alphas[2])
    assert composed > 0.5
    assert model.averagedness() is None
    assert model.lipschitz_bound() == pytest.approx(2 * composed, rel=1e-12)
    assert _build("dncnn").averagedness() is None


def test_eval_forward_uses_the_certified_bound_for_the_input_size():
    model = _stress(_build("nonexpansive_denoiser", integrator="heun"), factor=1.5)
    for size in ((8, 10), (12, 9)):
        with torch.no_grad():
            model(torch.rand(1, 3, *size, dtype=torch.float64))
        for block, (n, norm) in zip(model.blocks, model.block_stats(), strict=True):
            assert norm == block.operator.norm_bound(size)
            assert n == block.substeps(norm)


class _HostReads(TorchFunctionMode):
    """Records every tensor method that copies to the host (a device synchronisation on a GPU)."""

    METHODS = frozenset(
        {
            torch.Tensor.cpu,
            torch.Tensor.item,
            torch.Tensor.tolist,
            torch.Tensor.numpy,
            torch.Tensor.__float__,
            torch.Tensor.__int__,
            torch.Tensor.__bool__,
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.METHODS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_forward_and_backward_read_nothing_on_the_host_with_pinned_weights(name):
    """What an attack runs thousands of times per point: no per-pass synchronisation (only the
    input's shape and host copies of the norms decide the sub-steps)."""
    torch.manual_seed(0)
    model = build_model(name, **SMALL.get(name, {})).eval()
    size = model.input_size if hasattr(model, "input_size") else model.sizes[0]
    x = torch.rand(2, 3, *size, requires_grad=True)
    model(x)  # certificates computed once, outside the probe
    with pinned_weights(model), _HostReads() as reads:
        model(x).square().sum().backward()
    assert reads.seen == []
    if any(isinstance(m, NonexpansiveBlock) for m in model.modules()):
        with _HostReads() as unpinned:  # the probe sees the per-pass hashing it replaces
            model(x)
        assert "cpu" in unpinned.seen


@pytest.mark.parametrize("integrator", ["euler", "heun", "ssprk3"])
@pytest.mark.parametrize("theta", [0.25, 1.0])
def test_a_blocks_training_lipschitz_estimate_is_one_at_every_norm_without_reading_it(
    integrator: str, theta: float
):
    """Where the integrator has a contractivity radius, the sub-step rule keeps every sub-step
    inside it at any norm, so the margin loss's block factor is 1 without reading the norm (a
    host read a CUDA graph could not replay). The adversary: norms on both sides of every
    threshold where the count changes, up to 10,000x the count at norm 1."""
    from stablenets.nn.models import _block_estimate

    model = build_model("nonexpansive_classifier", **SMALL["nonexpansive_classifier"],
                        integrator=integrator, theta=theta).train()  # fmt: skip
    for block in model.constrained_blocks():
        T, limit = block.time_value(), block.tableau.step_radius * block.theta
        thresholds = [math.sqrt(2 * limit * k / (T * block.activation.lipschitz)) for k in
                      [1, 2, 3, 7, 50, 999, 10_000]]  # fmt: skip
        for norm in [0.01, 0.5, 1.0, 3.0] + [t * f for t in thresholds for f in (1 - 1e-12, 1 + 1e-12)]:  # fmt: skip
            n = block.substeps(norm)
            assert (T / n) * block._ell(norm) / 2 <= block.tableau.radius, (norm, n)
        with _HostReads() as reads:
            assert _block_estimate(block) == 1.0
        assert reads.seen == []


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_the_margin_loss_and_its_gradient_read_nothing_on_the_host(name: str):
    """What lets a margin-loss training step be replayed from a CUDA graph: its Lipschitz
    estimate (power iterations of the unconstrained layers, the blocks' factors) stays on the
    device."""
    torch.manual_seed(0)
    model = build_model(name, **SMALL.get(name, {})).train()
    size = model.input_size if hasattr(model, "input_size") else model.sizes[0]
    x, y = torch.rand(4, 3, *size), torch.randint(0, 10, (4,))
    criterion = build_loss({"name": "margin", "offset": 0.1, "temperature": 0.25})
    assert criterion is not None
    out = model(x)
    with _HostReads() as reads:
        criterion(model, out, y).backward()
    assert reads.seen == []


# --------------------------------------------------------------------------------------------
# Training mode: adaptive sub-steps


@pytest.mark.parametrize("name", ["nonexpansive_classifier", "nonexpansive_denoiser"])
def test_substeps_grow_with_the_norm_in_training(name):
    model = _build(name).train()
    x = torch.rand(2, *SHAPE[name])
    with torch.no_grad():
        model(x)
    before = model.total_substeps()
    assert before == sum(1 for _ in model.constrained_blocks())
    with torch.no_grad():
        for block in model.constrained_blocks():
            block.operator.weight.mul_(3.0)
    for _ in range(3):
        model.update_norms(5)
        with torch.no_grad():
            model(x)
    after = model.total_substeps()
    assert after > 4 * before
    for block in model.constrained_blocks():
        assert float(block.operator.sigma_estimate) <= block.operator.norm_bound() * (1 + 1e-6)
        assert block.last_norm == float(block.operator.sigma_estimate)
    # eval() switches to the certified bound: never fewer sub-steps than training.
    model.eval()
    with torch.no_grad():
        model(x)
    assert model.total_substeps() >= after


# --------------------------------------------------------------------------------------------
# Registry


def test_paper_parameter_counts():
    for name, expected in (("nonexpansive_classifier", 254_810), ("resnet_classifier", 497_290)):
        torch.manual_seed(0)
        model = build_model(name)
        assert sum(p.numel() for p in model.parameters()) == expected
    assert len(list(model.modules())) > 30


def test_build_model_rejects_unknown_names_and_bad_kwargs():
    with pytest.raises(ValueError, match=r"unknown model 'transformer'.*dncnn"):
        build_model("transformer")
    with pytest.raises(ValueError, match=r"'dncnn'.*widht"):
        build_model("dncnn", widht=3)
    with pytest.raises(ValueError, match=r"'nonexpansive_classifier'.*blocks"):
        build_model("nonexpansive_classifier", blocks=3)
    with pytest.raises(ValueError, match="width 2 must be >= channels 3"):
        build_model("nonexpansive_denoiser", width=2, input_size=8)
    with pytest.raises(ValueError, match="too small"):
        build_model("nonexpansive_classifier", input_size=2, stages=3)
    with pytest.raises(ValueError, match="activation 'gelu'"):
        build_model("nonexpansive_denoiser", width=4, depth=1, input_size=8, activation="gelu")
    with pytest.raises(ValueError, match="integrator 'rk45'"):
        build_model("nonexpansive_denoiser", width=4, depth=1, input_size=8, integrator="rk45")


# --------------------------------------------------------------------------------------------
# Checkpoints


def _trained_like(name: str) -> nn.Module:
    """A model whose state differs from a fresh build: power iterations, a weight change, BN
    statistics."""
    model = _build(name, seed=3).train()
    model.update_norms(4)
    with torch.no_grad():
        first = _operators(model)[1]
        first.weight.mul_(1.7)
        first.weight[0].add_(0.1)
        if first.bias is not None:
            first.bias.add_(0.05)
        model(torch.rand(4, *SHAPE[name]))  # batch-norm running statistics
    model.update_norms(2)
    return model


@pytest.mark.parametrize("name", sorted(SMALL))
def test_checkpoint_round_trip_is_bit_identical(name, tmp_path):
    model = _trained_like(name)
    path = tmp_path / f"{name}.pt"
    save_model(model, path, epoch=7, note="x")
    loaded = stablenets.load_model(str(path))
    assert type(loaded) is type(model)
    assert loaded.training is False
    assert loaded.model_name == name and loaded.model_kwargs == SMALL[name]
    assert read_checkpoint(path)["extra"] == {"epoch": 7, "note": "x"}
    state, other = model.state_dict(), loaded.state_dict()
    assert state.keys() == other.keys()
    for key in state:
        assert torch.equal(state[key], other[key]), key
    assert any(key.endswith(".u") for key in state)  # power-iteration vectors travel
    x = torch.rand(3, *SHAPE[name], generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        model.train()
        loaded.train()
        assert torch.equal(model(x), loaded(x))  # the training-mode estimates match too
    assert loaded.lipschitz_bound() == model.lipschitz_bound()
    # load_model's expect_name accepts the right name.
    assert load_model(path, expect_name=name).model_name == name


def test_save_model_creates_folders_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "model.pt"
    first = _build("dncnn", seed=1)
    save_model(first, path)
    second = _build("dncnn", seed=2)
    save_model(second, path)
    loaded = load_model(path)
    for key, value in second.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert isinstance(next(iter(loaded.net)), Conv2dOperator)


@pytest.mark.parametrize("name", ["nonexpansive_classifier", "orthogonal_classifier"])
def test_module_apply_reaches_every_operator_of_a_model(name):
    """``model.apply(fn)`` (torch's recursive visit, e.g. for a custom initialisation) works on a
    model holding operators: no operator method shadows ``nn.Module.apply``."""
    kw = {"base_width": 4, "stages": 2, "blocks_per_stage": 1, "input_size": 8}
    model = build_model(name, **kw)
    seen: list[str] = []
    model.apply(lambda m: seen.append(type(m).__name__))
    operators = [type(m).__name__ for m in model.modules() if isinstance(m, LinearOperator)]
    assert operators and sorted(operators) == sorted(
        n
        for n in seen
        if n in {type(m).__name__ for m in model.modules() if isinstance(m, LinearOperator)}
    )
    assert len(seen) == len(list(model.modules()))


def test_a_classifier_without_stages_is_refused_where_it_is_built():
    """It built, then its forward and its bound failed with an ``IndexError``."""
    with pytest.raises(ValueError, match="at least one stage, got stages=0"):
        build_model("nonexpansive_classifier", base_width=4, stages=0, input_size=8)
