"""Tests of stablenets.nn.families (CPL, SLL, AOL, orthogonal Cayley convolution), their classifiers,
the margin loss and the training budget: adversarial Lipschitz audits with weights scaled up,
dense float64 Jacobians and matrices, exact properties, equivalences and config errors."""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from audit import adversary
from torch import nn
from torch.nn import functional as F

from stablenets.nn import families, operators
from stablenets.nn.activations import build_activation
from stablenets.nn.blocks import NonexpansiveBlock
from stablenets.nn.families import (
    FAMILIES,
    AOLBlock,
    AOLConv,
    CayleyConv,
    CPLBlock,
    SLLBlock,
    abs_gram_rowsums,
    build_family_block,
    token_power_size,
)
from stablenets.nn.losses import MarginLoss, build_loss, margin_loss
from stablenets.nn.models import build_model, load_model, save_model
from stablenets.nn.operators import (
    Conv2dOperator,
    DenseOperator,
    LinearOperator,
    pinned_weights,
)
from stablenets.pipeline.config import ConfigError, validate_config
from stablenets.train import budget
from stablenets.train.augment import AugmentConfig
from stablenets.train.loop import TrainConfig, train
from stablenets.train.tasks import ClassificationTask

TOL = 1e-9  # relative slack allowed above a certified bound (float64 rounding)
ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"

RESULTS: dict[str, tuple[float, float]] = {}


@pytest.fixture(autouse=True, scope="module")
def _report() -> Iterator[None]:
    yield
    if RESULTS:
        print("\nadversarial audit (families): largest ratio found / certified bound")
        for label, (ratio, bound) in RESULTS.items():
            print(f"  {label:44s} {ratio:.6f} / {bound:.6g}")


def _stress(module: nn.Module, factor: float, seed: int = 1) -> nn.Module:
    """float64, eval, every weight perturbed and scaled by ``factor``, random biases and ``q``."""
    module = module.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (LinearOperator, CayleyConv)):
                scale = float(m.weight.abs().max())
                noise = torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
                m.weight.add_(0.5 * scale * noise).mul_(factor)
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
            if isinstance(m, SLLBlock):
                m.log_q.copy_(torch.randn(m.log_q.shape, generator=g, dtype=torch.float64))
    return module


def _jacobian_norm(f, shape, points: int = 2) -> float:
    g = torch.Generator().manual_seed(123)
    best = 0.0
    for _ in range(points):
        x = torch.randn(1, *shape, generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(f, x).reshape(-1, math.prod(shape))
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    return best


def _matrix(f, shape) -> torch.Tensor:
    """The dense matrix of a linear map on inputs of ``shape`` (columns: images of e_i)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    return f(basis).reshape(n, -1).T


# --------------------------------------------------------------------------------------------
# Block audits at several widths


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("width", "factor"), [(2, 3.0), (5, 0.4), (5, 4.0)])
def test_family_block_survives_attack(family, width, factor):
    torch.manual_seed(width)
    size = (5, 6)
    block = _stress(build_family_block(family, width, size), factor)
    bound = block.lipschitz_bound(size)
    if family in ("cpl", "sll", "orthogonal"):
        assert bound == 1.0
    else:
        assert 0 < bound <= 1.0
    shape = (width, *size)
    ratio = adversary(block, shape, steps=50, starts=6)
    local = _jacobian_norm(block, shape)
    RESULTS[f"{family} block width={width} x{factor}"] = (max(ratio, local), bound)
    assert ratio <= bound * (1 + TOL), (family, ratio, bound)
    assert local <= bound * (1 + TOL), (family, local, bound)
    assert ratio > 0.05 * bound


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(4, 5), (4, 6)])
def test_every_family_block_maps_an_unbatched_image_as_the_batch_of_that_image(family, size):
    """A ``(C, H, W)`` input is the one-image batch ``(1, C, H, W)``. Before, SLL scaled by its
    per-channel ``T^{-1}`` viewed as ``(1, C)``, lined up with the image's *width*: a wrong
    output when ``W == C`` (here ``(4, 5)`` with 5 channels), a broadcast error otherwise; the
    orthogonal block's einsum refused a 3-D input."""
    torch.manual_seed(7)
    block = _stress(build_family_block(family, 5, size), 4.0)
    x = torch.randn(5, *size, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = block(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, block(x[None])[0], rtol=1e-12, atol=1e-12)


def test_an_unbatched_sll_block_survives_attack():
    """The unbatched SLL map keeps its bound 1. Before, with hidden channels of very different
    row sums and ``W == C``, the misaligned ``T^{-1}`` (previous test) gave Lipschitz 376."""
    torch.manual_seed(0)
    channels, size = 5, (4, 5)
    block = build_family_block("sll", channels, size, 3, "relu")
    with torch.no_grad():
        block.operator.weight.mul_(torch.logspace(-2, 1, channels).view(-1, 1, 1, 1))
        block.operator.bias.fill_(1.0)
    block = block.double().eval()

    def each(z: torch.Tensor) -> torch.Tensor:
        return torch.stack([block(image) for image in z])

    shape = (channels, *size)
    bound = block.lipschitz_bound(size)
    ratio = adversary(each, shape, steps=40, starts=4)
    local = _jacobian_norm(each, shape)
    RESULTS["sll block unbatched, W == C"] = (max(ratio, local), bound)
    assert ratio <= bound * (1 + TOL) and local <= bound * (1 + TOL), (ratio, local)
    assert local > 0.5


@pytest.mark.parametrize("family", ["cpl", "sll"])
def test_dense_family_blocks_survive_attack(family):
    g = torch.Generator().manual_seed(0)
    op = DenseOperator(7, 5, generator=g)
    act = build_activation("relu")
    block = CPLBlock(op, act) if family == "cpl" else SLLBlock(op, act)
    block = _stress(block, 3.0)
    ratio = adversary(block, (7,), steps=100)
    RESULTS[f"{family} dense 7->5"] = (ratio, block.lipschitz_bound())
    assert block.lipschitz_bound() == 1.0
    assert 0.5 < ratio <= 1 + TOL


# --------------------------------------------------------------------------------------------
# Classifiers: the whole skeleton with each family


SMALL = {"base_width": 4, "stages": 2, "blocks_per_stage": 2, "input_size": 8}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_classifier_survives_attack(family):
    torch.manual_seed(0)
    model = build_model(f"{family}_classifier", **SMALL)
    model = _stress(model, 3.0)
    bound = model.lipschitz_bound()
    ratio = adversary(model, (3, 8, 8), steps=60, starts=6, images=True)
    local = _jacobian_norm(model, (3, 8, 8))
    RESULTS[f"{family}_classifier"] = (max(ratio, local), bound)
    assert ratio <= bound * (1 + TOL) and local <= bound * (1 + TOL)
    assert ratio > 0
    # Each stage alone: its bound is the product of its block bounds (1 but for AOL).
    for i, (stage, size) in enumerate(zip(model.stages, model.sizes, strict=True)):
        stage_bound = math.prod(block.lipschitz_bound(size) for block in stage)
        assert 0 < stage_bound <= 1.0
        width = 4 * 2**i
        ratio = adversary(stage, (width, *size), steps=40, starts=4)
        RESULTS[f"{family}_classifier stage {i}"] = (ratio, stage_bound)
        assert 0.05 * stage_bound < ratio <= stage_bound * (1 + TOL)


def test_family_classifiers_share_the_skeleton_and_round_trip(tmp_path):
    shapes = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = build_model(f"{family}_classifier", **SMALL)
        shapes[family] = [
            (n, tuple(p.shape)) for n, p in model.named_parameters() if not n.startswith("stages")
        ]
        model.train()
        model(torch.rand(2, 3, 8, 8))
        path = tmp_path / f"{family}.pt"
        save_model(model, path)
        loaded = load_model(path)
        x = torch.rand(3, 3, 8, 8)
        assert torch.equal(model.eval()(x), loaded(x))
        assert model.lipschitz_bound() == loaded.lipschitz_bound()
    assert all(s == shapes["cpl"] for s in shapes.values())


def test_unknown_block_and_model_names_are_clear_errors():
    from stablenets.nn.models import Classifier

    with pytest.raises(ValueError, match=r"unknown block 'lot'.*'cpl', 'sll', 'aol', 'orthogonal'"):
        Classifier(block="lot", base_width=2, stages=1, blocks_per_stage=1, input_size=4)
    with pytest.raises(ValueError, match=r"unknown model 'sol_classifier'.*sll_classifier"):
        build_model("sol_classifier")
    with pytest.raises(ValueError, match="one Euler step"):
        build_model("cpl_classifier", integrator="heun", **SMALL)


# --------------------------------------------------------------------------------------------
# Denoisers: the paper's denoiser skeleton with cpl, sll and aol blocks


@pytest.mark.parametrize(
    ("block", "residual", "theta"),
    [("cpl", False, 1.0), ("cpl", True, 0.5), ("sll", False, 0.5), ("sll", True, 0.5)]
    + [("aol", False, 1.0), ("aol", True, 1.0)],
)
def test_family_denoiser_survives_attack(block, residual, theta):
    from audit import averaged_objective

    torch.manual_seed(0)
    model = build_model(
        "nonexpansive_denoiser",
        width=6,
        depth=3,
        input_size=(8, 10),
        block=block,
        residual=residual,
        theta=theta,
    )
    model = _stress(model, 3.0)
    bound = model.lipschitz_bound()
    alpha = model.averagedness()
    if theta < 1 and not residual:
        assert alpha is not None and alpha < 1
    assert bound <= (2.0 if residual else 1.0)
    ratio = adversary(model, (3, 8, 10), steps=50, starts=6, images=True)
    local = _jacobian_norm(model, (3, 8, 10))
    RESULTS[f"denoiser {block} residual={residual} theta={theta}"] = (max(ratio, local), bound)
    assert ratio <= bound * (1 + TOL) and local <= bound * (1 + TOL)
    assert ratio > 0.05 * min(bound, 1.0)
    if alpha is not None:
        worst = adversary(model, (3, 8, 10), averaged_objective(alpha), steps=40, images=True)
        assert worst <= 1e-9


def test_denoiser_block_errors():
    with pytest.raises(ValueError, match=r"unknown denoiser block 'orthogonal'.*'aol'"):
        build_model("nonexpansive_denoiser", width=4, depth=1, input_size=8, block="orthogonal")


# --------------------------------------------------------------------------------------------
# CPL is the Euler block at its largest step


def test_cpl_is_the_euler_block_with_one_largest_step():
    g = torch.Generator().manual_seed(0)
    op = Conv2dOperator(3, 4, 3, (5, 6), padding=1, generator=g)
    cpl = _stress(CPLBlock(op, build_activation("leaky_relu")), 2.5)
    x = torch.randn(3, 3, 5, 6, generator=g, dtype=torch.float64)
    for mode in ("eval", "train"):
        getattr(cpl, mode)()
        y = cpl(x)
        norm = cpl.last_norm
        assert cpl.last_substeps == 1
        assert norm == (op.norm_bound((5, 6)) if mode == "eval" else float(op.sigma_estimate))
        # The explicit CPL formula x - 2 / (L ||W||^2) W^T sigma(W x + b).
        w = op.weight
        explicit = x - 2 / norm**2 * F.conv_transpose2d(
            F.leaky_relu(F.conv2d(x, w, op.bias, padding=1)), w, padding=1
        )
        torch.testing.assert_close(y, explicit, rtol=1e-12, atol=1e-12)
        # NonexpansiveBlock (same operator, Euler) with its time set to that step: the same map.
        act = build_activation("leaky_relu")
        euler = NonexpansiveBlock(op, act, "euler", 1.0, time=1.0, init_power_iters=0)
        euler.train(mode == "train")
        euler.time.fill_(cpl.step_size(norm))
        assert torch.equal(euler(x), y)
        assert euler.last_substeps == 1
    assert cpl.averagedness() is None  # theta = 1: non-expansive only
    half = CPLBlock(op, build_activation("relu"), theta=0.5)
    assert half.averagedness((5, 6)) == pytest.approx(0.5, rel=1e-12)
    assert half.averagedness((5, 6)) <= 0.5


def test_cpl_step_never_exceeds_the_stable_limit():
    cpl = CPLBlock(DenseOperator(3, 3), build_activation("relu"))
    for norm in (1e-3, 0.3, 1.0, 1.7, 3.0, 7.1, 1e4):
        h = cpl.step_size(norm)
        assert h * norm**2 / 2 <= 1.0
        assert math.nextafter(h, math.inf) * norm**2 / 2 > 1.0 - 1e-15
    assert cpl.step_size(0.0) == 1.0


# --------------------------------------------------------------------------------------------
# SLL and AOL: exact row-sum rescalings on zero-padded grids


@pytest.mark.parametrize("factor", [1.0, 5.0])
def test_sll_scaling_dominates_the_gram_matrix_on_the_padded_grid(factor):
    g = torch.Generator().manual_seed(2)
    op = Conv2dOperator(3, 4, 3, (4, 5), padding=1, generator=g)
    block = _stress(SLLBlock(op, build_activation("relu")), factor)
    with torch.no_grad():
        a = _matrix(op.matvec, (3, 4, 5))  # (4*4*5) x (3*4*5)
        t = block.scaling().repeat_interleave(20)  # per channel, constant over pixels
    gap = torch.diag(t) - a @ a.T
    assert float(torch.linalg.eigvalsh(gap).min()) >= -1e-10 * float(t.max())
    # Dense rows: the same rule.
    d = DenseOperator(6, 4, generator=g).double()
    q = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    w = d.weight.detach()
    expected = ((w @ w.T).abs() @ q) / q
    torch.testing.assert_close(abs_gram_rowsums(w, "out", q), expected)


def test_sll_averagedness_under_attack():
    from audit import averaged_objective

    g = torch.Generator().manual_seed(4)
    block = _stress(SLLBlock(DenseOperator(6, 6, generator=g), build_activation("relu"), 0.5), 3)
    assert block.averagedness() == 0.5
    worst = adversary(block, (6,), averaged_objective(0.5), steps=80)
    assert worst <= 1e-9


def test_aol_rescaling_matches_the_dense_gram_rows_and_is_nonexpansive():
    g = torch.Generator().manual_seed(3)
    n = 9  # large enough that the centre pixel's row of P^T P is the full autocorrelation
    op = AOLConv(2, 3, 3, (n, n), padding=1, generator=g).double()
    with torch.no_grad():
        op.weight.mul_(7.0)
    plain = Conv2dOperator(2, 3, 3, (n, n), padding=1, bias=False).double()
    with torch.no_grad():
        plain.weight.copy_(op.weight)
    p = _matrix(plain.matvec, (2, n, n))
    gram = (p.T @ p).abs().view(2, n, n, 2 * n * n)
    centre_rows = gram[:, n // 2, n // 2].sum(dim=1)
    torch.testing.assert_close(centre_rows, abs_gram_rowsums(op.weight.detach(), "in"))
    with torch.no_grad():
        pd = _matrix(op.matvec, (2, n, n))
    assert float(torch.linalg.matrix_norm(pd, 2)) <= 1 + 1e-12
    assert op.norm_bound() <= 1 + 2e-9
    # The identity (dirac) start of the classifier's AOL blocks: d = 1 and P D = I.
    dirac = AOLConv(3, 3, 3, (5, 5), padding=1, dirac_init=True).double()
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dirac.matvec(x).detach(), x, rtol=0, atol=1e-15)
    assert dirac.norm_bound() == pytest.approx(1.0, rel=2e-9)
    # Strided and dilated: still a compression of the same rescaled full convolution.
    for kwargs in ({"stride": 2}, {"dilation": 2, "padding": 2}):
        strided = AOLConv(2, 3, 3, (7, 7), generator=g, **{"padding": 1, **kwargs}).double()
        with torch.no_grad():
            strided.weight.mul_(3.0)
        with torch.no_grad():
            m = _matrix(strided.matvec, (2, 7, 7))
        assert float(torch.linalg.matrix_norm(m, 2)) <= 1 + 1e-12


@pytest.mark.parametrize(("width", "size"), [(4, (5, 6)), (64, (40, 48))])
def test_a_dirac_initialised_aol_convolution_is_the_identity_and_its_power_vector_a_fixed_point(
    width, size
):
    """Why one power iteration at its construction is enough: more leave its estimate exactly 1
    and its power vector the same up to rounding (the normalisation's)."""
    torch.manual_seed(0)
    conv = AOLConv(width, width, 3, size, padding=1, dirac_init=True)
    x = torch.randn(2, width, *size)
    assert torch.equal(conv(x), x) and float(conv.sigma_estimate) == 1.0
    u = conv.u.clone()
    conv.power_iteration(19)
    assert float(conv.sigma_estimate) == 1.0
    torch.testing.assert_close(conv.u, u, rtol=0, atol=1e-8)


def test_aol_refuses_a_rescaling_it_could_not_honour():
    """``P D`` is invariant under the weight's scale, so the scripts' ``rescale_`` would leave the
    norm where it was and return the old estimate; it says so instead."""
    op = AOLConv(2, 3, 3, (6, 6), padding=1, generator=torch.Generator().manual_seed(0)).double()
    with pytest.raises(ValueError, match="does not change with the weight's scale"):
        op.rescale_(1.0, 20)
    before = _matrix(op.matvec, (2, 6, 6)).detach()
    with torch.no_grad():
        op.weight.mul_(5.0)  # the invariance that makes it impossible
    torch.testing.assert_close(_matrix(op.matvec, (2, 6, 6)).detach(), before)


def _state_mib(module: nn.Module) -> float:
    return sum(v.numel() * v.element_size() for v in module.state_dict().values()) / 2**20


@pytest.mark.parametrize("family", ["sll", "aol"])
def test_sll_and_aol_denoisers_at_the_paper_size_hold_no_image_sized_power_vector(family):
    """Neither block iterates its power vector, which on the whole 321 x 481 image made the
    denoiser's state 378 MiB (1.4 MiB of parameters), twice that in a training checkpoint: on
    the token grid (``token_power_size``) the state is little more than the parameters."""
    model = build_model("nonexpansive_denoiser", block=family, input_size=[321, 481])
    assert _state_mib(model) < 2.0
    assert all(block.operator.u.shape == (1, 64, 3, 3) for block in model.blocks)
    assert token_power_size((321, 481), 3) == (3, 3) and token_power_size((2, 9), 5) == (2, 5)


def _full_grid_block(family: str, size: tuple[int, int]) -> nn.Module:
    """The block ``build_family_block(family, 8, size)`` was before ``token_power_size``: the
    power vector on the whole image."""
    act = build_activation("leaky_relu")
    if family == "sll":
        return SLLBlock(Conv2dOperator(8, 8, 3, size, padding=1), act)
    return AOLBlock(AOLConv(8, 8, 3, size, padding=1, dirac_init=True), act)


@pytest.mark.parametrize("family", ["sll", "aol"])
def test_sll_and_aol_blocks_on_the_token_grid_compute_what_the_full_grid_ones_did(family):
    """The same seed (the weight is drawn before ``u``) gives the same weights and AOL's dirac
    start the same estimate, 1; with the same (stressed) weights, the same outputs and certified
    bound, bit for bit: neither reads the power vector. A state with the full-size vector (a
    checkpoint written before) loads and leaves the token one in place."""
    size = (12, 10)
    torch.manual_seed(0)
    block = build_family_block(family, 8, size)
    torch.manual_seed(0)
    full = _full_grid_block(family, size)
    assert block.operator.u.shape[-2:] == (3, 3) and full.operator.u.shape[-2:] == size
    old, new = full.state_dict(), block.state_dict()
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old if not k.endswith(".u"))
    assert float(block.operator.sigma_estimate) == float(full.operator.sigma_estimate)
    if family == "aol":
        assert float(block.operator.sigma_estimate) == 1.0
    block, full = _stress(block, 3.0), _stress(full, 3.0)
    x = torch.randn(2, 8, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for mode in (True, False):
        with torch.no_grad():
            assert torch.equal(block.train(mode)(x), full.train(mode)(x)), mode
    assert block.lipschitz_bound(size) == full.lipschitz_bound(size)
    token = block.operator.u.clone()
    block.load_state_dict(full.state_dict())
    assert torch.equal(block.operator.u, token)
    with torch.no_grad():
        assert torch.equal(block(x), full(x))


def test_sll_scaling_under_bf16_autocast_is_the_float32_one():
    """``T >= A A^T`` carries SLL's bound 1: under bf16 autocast its row sums came out up to
    0.28 % low (64 channels). As AOL's rescaling, ``T`` is computed with autocast off, and
    ``q`` still gets its gradient through it."""
    torch.manual_seed(0)
    block = build_family_block("sll", 64, (32, 32))
    with torch.no_grad():
        plain = block.scaling()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = block.scaling()
    assert amp.dtype == torch.float32 and torch.equal(amp, plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(torch.rand(1, 64, 32, 32)).float().sum().backward()
    assert block.log_q.grad is not None and bool(block.log_q.grad.abs().sum() > 0)


# --------------------------------------------------------------------------------------------
# Orthogonal convolution: exact on the circular grid


@pytest.mark.parametrize("size", [(6, 6), (5, 8), (7, 3)])
def test_cayley_convolution_is_orthogonal_on_the_circular_grid(size):
    g = torch.Generator().manual_seed(5)
    conv = CayleyConv(3, 3, generator=g).double()
    with torch.no_grad():
        conv.weight.mul_(4.0)
    x = torch.randn(6, 3, *size, generator=g, dtype=torch.float64)
    y = conv.matvec(x)
    assert y.dtype == torch.float64 and y.shape == x.shape
    ratio = y.detach().flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert float((ratio - 1).abs().max()) < 1e-10
    with torch.no_grad():
        q = _matrix(conv.matvec, (3, *size))
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    assert float((q.T @ q - eye).abs().max()) < 1e-10
    # A circular convolution: it commutes with circular shifts.
    shifted = conv.matvec(torch.roll(x, (1, 2), dims=(2, 3)))
    torch.testing.assert_close(shifted, torch.roll(y, (1, 2), dims=(2, 3)))
    assert conv.padding_mode == "circular"


@pytest.mark.parametrize("channels", [16, 64])
def test_the_float32_cayley_symbol_is_unitary_to_its_last_rounding_at_large_weights(channels):
    """``norm_bound`` states 1 exactly, so ``Q(w)`` must be unitary up to the final float32
    rounding (``sigma_max - 1`` about 4e-8, ``2^-24 sqrt(C)`` at worst). Before, the Cayley solve
    ``(I + V)^{-1} (I - V)`` ran in complex64, and its error grew with ``||V||``: at weights
    x1000, ``sigma_max`` exceeded 1 by 3.5e-5 (16 channels) and 2.4e-4 (64)."""
    conv = CayleyConv(channels, 3, generator=torch.Generator().manual_seed(channels)).eval()
    with torch.no_grad():
        conv.weight.mul_(1000.0)
    q = conv.symbol((8, 8))  # eval(): the map certified and evaluated
    assert q.dtype == torch.complex64
    singular = torch.linalg.svdvals(q.detach().to(torch.complex128))
    assert float((singular - 1).abs().max()) < 2e-7


_WIDE_CAYLEY = """
import torch
from stablenets.nn.families import CayleyConv
torch.set_num_threads(2)
conv = CayleyConv(192, 3, generator=torch.Generator().manual_seed(0))
x = torch.rand(2, 192, 4, 4, generator=torch.Generator().manual_seed(1))
conv(x).square().sum().backward()  # training: forward and backward
q = conv.eval().symbol((4, 4)).to(torch.complex128)
print(float((torch.linalg.svdvals(q) - 1).abs().max()))
"""


def test_a_wide_cayley_convolution_runs_on_several_cpu_threads():
    """The batched CPU solve of oneMKL (torch 2.14.1) fails with two threads from about 150
    channels, forward and backward: 'Parameter 6 was incorrect on entry to ZLASWP', then a hang
    (the medium and large orthogonal classifiers have 256 and 512). Solved one system at a time,
    it runs and the symbol stays unitary."""
    run = subprocess.run([sys.executable, "-c", _WIDE_CAYLEY], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"})  # fmt: skip
    assert run.returncode == 0 and "LASWP" not in run.stdout + run.stderr, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 1e-6


def _count_solves(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = families._solve
    monkeypatch.setattr(families, "_solve", lambda a, b: calls.append(1) or real(a, b))
    return calls


def test_a_pinned_orthogonal_classifier_solves_each_cayley_symbol_once(monkeypatch):
    """An attack makes thousands of passes through one fixed map: within ``pinned_weights``
    each block's Cayley transform (a float64 solve per frequency) is solved on the first pass
    and held, giving the logits and input gradients of the unpinned model bit for bit."""
    torch.manual_seed(0)
    model = build_model("orthogonal_classifier", base_width=4, stages=2, blocks_per_stage=1,
                        num_classes=3, input_size=8).eval()  # fmt: skip
    blocks = sum(isinstance(m, CayleyConv) for m in model.modules())
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.square().sum(), x)
    calls = _count_solves(monkeypatch)
    with pinned_weights(model):
        for _ in range(3):  # passes with a gradient and without
            pinned = model(x)
            (pinned_grad,) = torch.autograd.grad(pinned.square().sum(), x)
            with torch.no_grad():
                assert torch.equal(model(x), logits)
            assert torch.equal(pinned, logits) and torch.equal(pinned_grad, grad)
    assert blocks >= 2 and len(calls) == blocks
    model(x)  # outside the scope: solved afresh each pass, nothing held
    assert len(calls) == 2 * blocks and not any(m in operators._PINS for m in model.modules())


def test_a_cayley_weight_edited_inside_a_pinned_scope_is_reported_and_not_kept(monkeypatch):
    """The symbol held in a scope is the entry weight's: an edit inside it raises on exit
    (its passes used the held map), and the next scope solves the edited weight's map."""
    conv = CayleyConv(3, 3, generator=torch.Generator().manual_seed(2)).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="changed inside pinned_weights"):
        with pinned_weights(conv), torch.no_grad():
            before = conv(x)
            conv.weight.mul_(2.0)
    with pinned_weights(conv), torch.no_grad():
        after = conv(x)
    with torch.no_grad():
        torch.testing.assert_close(after, conv(x), rtol=0, atol=0)
    assert not torch.allclose(after, before)


def _circular_convolution(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The dense matrix of ``y[o, i, j] = sum_{c, a, b} W[o, c, a, b] x[c, i - a, j - b]``,
    indices modulo ``size``: every tap, wherever it wraps to."""
    out, cin, k1, k2 = weight.shape
    n1, n2 = size
    dense = torch.zeros(out, n1, n2, cin, n1, n2, dtype=weight.dtype)
    for a in range(k1):
        for b in range(k2):
            for i in range(n1):
                for j in range(n2):
                    dense[:, i, j, :, (i - a) % n1, (j - b) % n2] += weight[:, :, a, b]
    return dense.reshape(out * n1 * n2, cin * n1 * n2)


@pytest.mark.parametrize("size", [(2, 2), (2, 5), (1, 4), (5, 4)])
def test_a_cayley_convolution_on_a_grid_smaller_than_its_kernel_is_the_circular_one(size):
    """On a grid smaller than the kernel (a 2x2 last stage with 3x3 kernels) ``Q`` is the
    Cayley transform ``(I + K - K^T)^{-1} (I - K + K^T)`` of the circular convolution ``K`` with
    every tap wrapped. Before, ``rfft2(W, s=size)`` cropped the taps beyond the grid (on 2x2, 5
    of 9 were dropped and got no gradient): still orthogonal, but not the documented map. On
    ``(5, 4)``, a grid the kernel fits, it pins the convention (orthogonality alone would not:
    any symbol gives an orthogonal, shift-commuting ``Q``)."""
    g = torch.Generator().manual_seed(3)
    conv = CayleyConv(2, 3, generator=g).double()
    with torch.no_grad():
        conv.weight.mul_(3.0)
        q = _matrix(conv.matvec, (2, *size))
    k = _circular_convolution(conv.weight.detach(), size)
    eye = torch.eye(k.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(eye + k - k.T, eye - k + k.T)
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-12)
    x, r = torch.randn(2, 1, 2, *size, generator=g, dtype=torch.float64)
    conv.weight.grad = None
    (conv(x) * r).sum().backward()  # (||Q x||^2 would not do: it is ||x||^2 for every W)
    # Every tap of a channel pair reaches the map (the diagonal pairs' need not: on a 2x2 grid
    # every symbol is real, and V = A - A^T cancels them).
    assert conv.weight.grad is not None and bool((conv.weight.grad[0, 1] != 0).all())


# --------------------------------------------------------------------------------------------
# Margin loss


def test_margin_loss_reduces_to_cross_entropy_and_shifts_the_true_logit():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 3, 1, 1, 2])
    torch.testing.assert_close(
        margin_loss(logits, target, 0.0, 1.0), F.cross_entropy(logits, target)
    )
    offset, tau = 0.7, 0.25
    manual = logits.clone()
    manual[torch.arange(5), target] -= offset
    expected = tau * F.cross_entropy(manual / tau, target)
    torch.testing.assert_close(margin_loss(logits, target, offset, tau), expected)
    assert margin_loss(logits, target, offset, 1.0) > F.cross_entropy(logits, target)


def test_margin_loss_uses_the_models_lipschitz_estimate_with_gradient():
    torch.manual_seed(0)
    model = build_model("sll_classifier", **SMALL).train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    out = model(x)
    est = model.lipschitz_estimate()
    assert est.requires_grad and float(est.detach()) > 0
    crit = MarginLoss(offset=0.5, temperature=0.25)

    class Fixed(nn.Module):
        def lipschitz_estimate(self) -> torch.Tensor:
            return torch.tensor(2.0)

    expected = margin_loss(out, y, 0.5 * 2.0, 0.25)
    assert torch.equal(crit(Fixed(), out, y), expected)
    loss = crit(model, out, y)
    loss.backward()
    assert model.head.weight.grad is not None and model.lift.weight.grad.abs().sum() > 0
    assert build_loss(None) is None
    assert torch.equal(
        build_loss({"name": "margin", "offset": 0.0})(model, out, y), F.cross_entropy(out, y)
    )
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss({"name": "hinge", "offset": 0.1})
    with pytest.raises(ValueError, match="lipschitz_estimate"):
        build_loss(
            {"name": "margin", "offset": 0.1}, build_model("dncnn", width=4, depth=3, input_size=8)
        )


# --------------------------------------------------------------------------------------------
# Training budget


def test_budget_steps_and_the_recorded_count(tmp_path):
    assert budget.budget_steps(1.0, 0.5) == 120
    assert budget.budget_steps(0.001, 10.0) == 1
    with pytest.raises(ValueError):
        budget.budget_steps(0, 1.0)
    calls = []

    def measure() -> float:
        calls.append(1)
        return 0.25 * len(calls)

    path = tmp_path / "budget.json"
    first = budget.resolve_steps(path, "abc", 2.0, measure, log=lambda s: None)
    assert first == 480 and len(calls) == 1
    again = budget.resolve_steps(path, "abc", 2.0, measure, log=lambda s: None)
    assert again == first and len(calls) == 1  # read back, not measured again
    other = budget.resolve_steps(path, "xyz", 2.0, measure, log=lambda s: None)
    assert other == 240 and len(calls) == 2
    assert json.loads(path.read_text())["config_hash"] == "xyz"


def _tiny_task() -> ClassificationTask:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    return ClassificationTask(x, y, x[:16], y[:16], AugmentConfig(0, False, 0.0), 16)


def test_training_with_a_budget_and_the_margin_loss(tmp_path):
    torch.manual_seed(0)
    model = build_model("cpl_classifier", **{**SMALL, "blocks_per_stage": 1})
    cfg = TrainConfig(
        steps=10_000,
        batch_size=8,
        lr_max=0.05,
        val_every=1000,
        checkpoint_every=1000,
        log_every=1,
        budget_minutes=0.01,  # 0.6 s of training steps
        loss={"name": "margin", "offset": 0.14, "temperature": 0.25},
    )
    logs: list[str] = []
    fresh = copy.deepcopy(model)
    model, state = train(model, _tiny_task(), cfg, tmp_path, "h1", logs.append)
    record = json.loads((tmp_path / "budget.json").read_text())
    assert state.step == record["steps"] < 10_000
    assert any("budget" in line for line in logs)
    # A rerun of the same config (e.g. a resume) reuses the recorded count, even when the
    # checkpoint is gone, and the schedule spans exactly that count.
    (tmp_path / "checkpoint.pt").unlink(missing_ok=True)
    _, again = train(fresh, _tiny_task(), cfg, tmp_path, "h1", logs.append)
    assert again.step == record["steps"]
    assert all(math.isfinite(r["loss"]) for r in again.rows if r["kind"] == "train")


# --------------------------------------------------------------------------------------------
# Configuration


def _paper() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_config_sizes_select_and_family_variants():
    cfg = validate_config(_paper(), SCHEMA)
    variants = cfg["classification"]["variants"]
    for family in FAMILIES:
        for size, width in {"XS": 16, "S": 32, "M": 64, "L": 128}.items():
            v = variants[f"{family}_{size}"]
            assert v["model"] == f"{family}_classifier" and v["kwargs"]["base_width"] == width
            # Prach et al. 2024's loss: offset 2 sqrt(2) eps at eps 36/255, temperature 1/4
            loss = v["train"]["loss"]
            assert loss["name"] == "margin" and loss["temperature"] == 0.25
            assert loss["offset"] == pytest.approx(2 * math.sqrt(2) * 36 / 255, rel=1e-9)
    assert validate_config(cfg, SCHEMA) == cfg  # idempotent
    raw = _paper()
    raw["classification"]["select"] = ["resnet", "aol_S"]
    assert list(validate_config(raw, SCHEMA)["classification"]["variants"]) == ["resnet", "aol_S"]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"variants": {"x": {"model": "lot_classifier"}}}, "'lot_classifier' is not allowed"),
        ({"variants": {"x": {"model": "cpl_classifier", "size": "XXL"}}}, "'XXL' is not a size"),
        (
            {
                "variants": {
                    "x": {"model": "sll_classifier", "size": "S", "kwargs": {"base_width": 8}}
                }
            },
            "either size or kwargs.base_width",
        ),
        ({"select": ["nonexpansive", "nope"]}, r"select: \['nope'\] are not classification"),
        ({"train": {"loss": {"name": "hinge", "offset": 0.1}}}, "'hinge' is not allowed"),
        ({"train": {"budget_minutes": -1}}, "budget_minutes"),
        (
            {"variants": {"x": {"model": "cpl_classifier", "kwargs": {"integrator": "rk4"}}}},
            "one Euler step",
        ),
        (
            {"variants": {"x": {"model": "aol_classifier", "kwargs": {"block": "sll"}}}},
            "aol_classifier takes no 'block'",
        ),
    ],
)
def test_config_errors_name_the_key(patch, message):
    raw = _paper()
    for key, value in patch.items():
        if key == "variants":
            raw["classification"]["variants"].update(value)
        else:
            raw["classification"][key] = (
                value
                if key != "train"
                else {
                    **raw["classification"]["train"],
                    **value,
                }
            )
    with pytest.raises(ConfigError, match=message):
        validate_config(raw, SCHEMA)


def test_denoising_rejects_the_margin_loss_and_sizes():
    raw = _paper()
    raw["denoising"]["train"]["loss"] = {"name": "margin", "offset": 0.1}
    raw["denoising"]["variants"]["euler"]["size"] = "S"
    with pytest.raises(ConfigError, match="classification only") as err:
        validate_config(raw, SCHEMA)
    assert "sizes apply to classification variants only" in str(err.value)


def test_a_kwarg_the_model_does_not_take_is_a_config_error_not_a_failed_job():
    """The schema's kwargs are the union over models; each variant's are checked against its
    own model's constructor before any job runs, and against what its block reads: a setting
    the block ignores (theta on an AOL block) would train a model that is not what it says."""
    raw = _paper()
    raw["denoising"]["variants"]["euler"]["kwargs"]["base_width"] = 32
    raw["denoising"]["variants"]["dncnn"]["kwargs"] = {"integrator": "heun"}
    raw["denoising"]["variants"]["aol"]["kwargs"].update(theta=0.5, torch_bias=False)
    raw["classification"]["variants"]["resnet"]["kwargs"] = {"residual": True, "theta": 0.5}
    raw["classification"]["variants"]["sll_S"]["kwargs"] = {"integrator": "rk4", "theta": 0.5}
    with pytest.raises(ConfigError) as err:
        validate_config(raw, SCHEMA)
    lines = str(err.value).splitlines()[1:]
    by_key = {line.split(": ")[1]: line for line in lines}
    assert len(by_key) == len(lines)  # one line per key
    assert sorted(by_key) == [
        "classification.variants.resnet.kwargs.residual",
        "classification.variants.resnet.kwargs.theta",
        "classification.variants.sll_S.kwargs.integrator",
        "denoising.variants.aol.kwargs.theta",
        "denoising.variants.aol.kwargs.torch_bias",
        "denoising.variants.dncnn.kwargs.integrator",
        "denoising.variants.euler.kwargs.base_width",
    ]
    euler = by_key["denoising.variants.euler.kwargs.base_width"]
    assert "nonexpansive_denoiser takes no 'base_width'" in euler
    assert "'init_norm'" in euler  # the allowed list names what it does take
    assert "the aol block does not use 'theta'" in by_key["denoising.variants.aol.kwargs.theta"]
    assert "the sll block" in by_key["classification.variants.sll_S.kwargs.integrator"]
    assert "the residual block" in by_key["classification.variants.resnet.kwargs.theta"]


def test_each_block_reads_the_settings_the_config_lets_through():
    """What ``unused_arguments`` lets a block keep changes the built model; what it names does
    not (the same seed, the same outputs): the config's check rests on this table."""
    from stablenets.nn.models import MODELS, build_model, unused_arguments

    changes = {
        "integrator": "heun",
        "theta": 0.5,
        "time": 0.3,
        "init_norm": 2.0,
        "torch_bias": False,
    }
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    small = {
        "nonexpansive_denoiser": {"width": 4, "depth": 2, "input_size": 8},
        "classifier": {"base_width": 4, "stages": 1, "blocks_per_stage": 2, "input_size": 8},
    }

    def output(name: str, **kwargs: object) -> torch.Tensor:
        torch.manual_seed(0)
        kind = "nonexpansive_denoiser" if name == "nonexpansive_denoiser" else "classifier"
        model = build_model(name, **small[kind], **kwargs)
        with torch.no_grad():  # norms grown past the start, where theta adds sub-steps
            for op in model.modules():
                if isinstance(op, Conv2dOperator):
                    op.weight.mul_(3.0)
        return model.eval()(x)

    cases = [("nonexpansive_denoiser", {"block": b}) for b in ("nonexpansive", "cpl", "sll", "aol")]
    cases += [(f"{b}_classifier", {}) for b in ("nonexpansive", "resnet", "cpl", "sll", "aol")]
    cases += [("orthogonal_classifier", {})]
    for name, base in cases:
        registered = inspect.signature(MODELS[name]).parameters["torch_bias"].default
        changed = {**changes, "torch_bias": not registered}
        unused = unused_arguments(name, {**base, **changed})
        for key, value in changed.items():
            if (
                "cpl" in (name.removesuffix("_classifier"), base.get("block"))
                and key == "integrator"
            ):
                continue  # refused by the block itself (and by the config)
            same = torch.equal(output(name, **base), output(name, **base, **{key: value}))
            assert same == (key in unused), (name, base, key)
    assert unused_arguments("dncnn", changes) == []  # takes none of them: model_arguments says so
    from stablenets.nn.models import _BLOCK_READS, BLOCKS

    assert set(_BLOCK_READS) == set(BLOCKS)  # a new block must say what it reads


def test_a_power_size_given_to_an_sll_or_aol_denoiser_is_named_unused_and_changes_nothing():
    """SLL and AOL carry a token power grid whatever ``power_size`` says: the config's check
    names it (it reached their unused power vectors before); the paper's block and CPL read it."""
    from stablenets.nn.models import unused_arguments

    small = {"width": 4, "depth": 2, "input_size": [12, 10]}
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    for block in ("nonexpansive", "cpl", "sll", "aol"):
        named = unused_arguments("nonexpansive_denoiser", {"block": block, "power_size": [8, 8]})
        assert named == ([] if block in ("nonexpansive", "cpl") else ["power_size"]), block
        if named:
            outputs = []
            for extra in ({}, {"power_size": [8, 8]}):
                torch.manual_seed(0)
                model = build_model("nonexpansive_denoiser", block=block, **small, **extra)
                with torch.no_grad():
                    outputs.append(model.eval()(x))
            assert torch.equal(*outputs), block


def test_the_registry_keeps_each_constructor_signature_and_its_defaults():
    from stablenets.nn.models import build_model, model_arguments

    assert {"init_norm", "torch_bias", "base_width"} <= set(model_arguments("sll_classifier"))
    assert "base_width" not in model_arguments("nonexpansive_denoiser")
    torch.manual_seed(0)
    scripts = build_model("nonexpansive_classifier", base_width=4, stages=1)
    torch.manual_seed(0)  # the lift is drawn first: the same weights until the rescaling
    plain = build_model("nonexpansive_classifier", init_norm=None, base_width=4, stages=1)
    assert plain.lift.bias.abs().sum() > 0  # the registered torch_bias stays
    assert float(scripts.lift.power_iteration(200)) == pytest.approx(1.0, rel=1e-3)
    ratio = (
        scripts.lift.weight / plain.lift.weight
    ).detach()  # init_norm=None overrides the registered 1
    assert torch.allclose(ratio, ratio.flatten()[0]) and abs(float(ratio.flatten()[0]) - 1) > 1e-3


def test_a_loss_is_labelled_for_tables_by_what_it_is_and_its_settings():
    from stablenets.nn.losses import loss_label

    assert loss_label(None) == "cross-entropy"
    margin = {"name": "margin", "offset": 0.3993073588, "temperature": 0.25}
    assert loss_label(margin) == "margin (offset 0.399, T 0.25)"
    assert loss_label({"name": "margin", "offset": 0.5}) == "margin (offset 0.5, T 1)"
    # a model trained before the offset was named: its eps meant the offset sqrt(2) eps (its
    # evaluation raised a TypeError after its whole sweep)
    legacy = {"name": "margin", "eps": 0.1411764706, "temperature": 0.25}
    assert loss_label(legacy) == "margin (offset 0.2, T 0.25)"
    with pytest.raises(ValueError, match="unknown loss"):
        loss_label({"name": "hinge", "offset": 0.1})
