"""Tests of stablenets.nn.blocks: the step rule, certified bounds, averagedness, and an adversarial
Lipschitz audit of single blocks; the 2^k counterexample for ordinary residual blocks."""

from __future__ import annotations

import math

import pytest
import torch
from audit import adversary, averaged_objective
from torch import nn
from torch.nn import functional as F

from stablenets.nn.activations import build_activation
from stablenets.nn.blocks import TIME_HEADROOM, NonexpansiveBlock, ResidualBlock
from stablenets.nn.integrators import compose_averaged, get_integrator
from stablenets.nn.models import MODELS, build_model
from stablenets.nn.operators import CERTIFICATE_SLACK, Conv2dOperator, DenseOperator

TOL = 1e-9  # relative slack allowed above a certified bound (float64 rounding)


# --------------------------------------------------------------------------------------------
# Construction and the step rule


def _dense_block(integrator="euler", theta=1.0, activation="leaky_relu", n_in=8, n_out=6, seed=0):
    op = DenseOperator(n_in, n_out, generator=torch.Generator().manual_seed(seed))
    return NonexpansiveBlock(op, build_activation(activation), integrator, theta).double()


def _conv_block(integrator="euler", theta=1.0, activation="leaky_relu", seed=0, **conv):
    cfg = {"in_channels": 3, "out_channels": 3, "kernel_size": 3, "input_size": (6, 5)}
    cfg.update({"padding": 1, **conv})
    op = Conv2dOperator(**cfg, generator=torch.Generator().manual_seed(seed))
    return NonexpansiveBlock(op, build_activation(activation), integrator, theta).double()


def _scale(block: NonexpansiveBlock, factor: float) -> None:
    with torch.no_grad():
        block.operator.weight.mul_(factor)


def _design_norm(block: NonexpansiveBlock) -> float:
    """The norm at which one sub-step of the block's time ``T`` meets the step limit:
    ``T L sigma^2 / 2 = r theta``."""
    r, lip = block.tableau.step_radius, block.activation.lipschitz
    return math.sqrt(2 * r * block.theta / (lip * float(block.time)))


def _to_design_norm(block: NonexpansiveBlock) -> None:
    """Scale the weight so that the certified norm is ``sigma_0`` (to 1e-13, below: a bound
    recomputed for the scaled weight may differ from the scaled bound in its last bits): one
    sub-step at the step limit ``h nu = r theta``."""
    _scale(block, _design_norm(block) / block.operator.norm_bound() * (1 - 1e-13))


def test_block_rejects_bad_arguments():
    op = DenseOperator(4, 3)
    act = build_activation("relu")
    for theta in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="theta"):
            NonexpansiveBlock(op, act, "euler", theta)
    for time in (0.0, -1.0):
        with pytest.raises(ValueError, match="integration time"):
            NonexpansiveBlock(op, act, "euler", 1.0, time)
    with pytest.raises(ValueError, match="unknown integrator"):
        NonexpansiveBlock(op, act, "rk45")


@pytest.mark.parametrize("integrator", ["euler", "heun", "ssprk3", "rk4", "midpoint"])
@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_default_time_gives_one_substep_and_the_step_rule(integrator, theta):
    for block, x in (
        (_dense_block(integrator, theta), torch.zeros(2, 8, dtype=torch.float64)),
        (_conv_block(integrator, theta), torch.zeros(2, 3, 6, 5, dtype=torch.float64)),
    ):
        r = block.tableau.step_radius
        estimate = float(block.operator.sigma_estimate)  # the warm start's, as built
        norm0 = estimate * (1 + TIME_HEADROOM)
        expected_time = r / (block.activation.lipschitz * norm0**2)  # the scripts' r / nu_0
        assert float(block.time) == pytest.approx(expected_time, rel=1e-15)
        # The headroom covers the certified bound: one sub-step in eval() too.
        assert estimate <= block.operator.norm_bound() <= norm0
        block.eval()(x)
        assert block.last_substeps == 1
        # The rule: h nu <= r theta with nu = L norm^2 / 2, and n ~ (norm / norm0)^2 / (2 theta).
        time, ell, limit = float(block.time), block.activation.lipschitz, r * theta
        for factor in (0.3, 1.0, 1.3, 1.7, 2.5, 3.1, 10.2):
            norm = norm0 * factor
            n = block.substeps(norm)
            assert (time / n) * (ell * norm**2) / 2 <= limit
            assert n == max(1, math.ceil(factor**2 / (2 * theta)))


def test_construction_computes_no_certified_bound(monkeypatch):
    """The default integration time comes from the warm-started estimate: building any model
    computes no certificate (only ``lipschitz_bound``, ``norm_bound`` and ``eval()`` do)."""

    def refuse(self, input_size=None):
        raise AssertionError(f"certified norm of a {type(self).__name__} at construction")

    monkeypatch.setattr(Conv2dOperator, "_certified_norm", refuse)
    monkeypatch.setattr(DenseOperator, "_certified_norm", refuse)
    small = {
        "classifier": {"base_width": 4, "stages": 2, "blocks_per_stage": 1, "input_size": 8},
        "nonexpansive_denoiser": {"width": 4, "depth": 2, "input_size": (12, 10)},
        "dncnn": {"width": 4, "depth": 3, "input_size": (12, 10)},
    }
    for name in MODELS:
        model = build_model(name, **small.get(name, small["classifier"]))
        with pytest.raises(AssertionError, match="certified norm"):
            model.lipschitz_bound()
    for block in ("nonexpansive", "cpl", "sll", "aol"):
        build_model("nonexpansive_denoiser", block=block, **small["nonexpansive_denoiser"])


def test_substeps_is_the_smallest_feasible_count():
    """``substeps`` promises the *smallest* ``n`` with ``(T / n) L norm^2 / 2 <= r theta``; at
    exact multiples of the initial norm the float64 ceiling must not overshoot by one."""
    block = _dense_block("euler", 0.5)
    norm0 = block.operator.norm_bound()
    time, ell, limit = float(block.time), block.activation.lipschitz, 0.5
    for factor in (1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0):
        norm = norm0 * factor
        n = block.substeps(norm)
        assert (time / n) * (ell * norm**2) / 2 <= limit
        if n > 1:
            assert (time / (n - 1)) * (ell * norm**2) / 2 > limit, (factor, n)


@pytest.mark.parametrize("seed", range(4))
def test_training_mode_starts_with_one_substep(seed):
    """As built (float32), a block's first training-mode forward takes one sub-step: the
    power-iteration estimate is a lower bound of the norm the integration time was set from."""
    g = torch.Generator().manual_seed(seed)
    for op, x in (
        (DenseOperator(8, 6, generator=g), torch.zeros(1, 8)),
        (Conv2dOperator(3, 3, 3, (6, 5), padding=1, generator=g), torch.zeros(1, 3, 6, 5)),
    ):
        block = NonexpansiveBlock(op, build_activation("leaky_relu"), "euler").train()
        block(x)
        estimate, bound = float(op.sigma_estimate), op.norm_bound()
        assert block.last_substeps == 1, (type(op).__name__, estimate / bound - 1)


def test_eval_uses_the_certified_bound_for_the_input_size_and_train_the_estimate():
    block = _conv_block("heun")
    for size in ((6, 5), (9, 7), (4, 4)):
        x = torch.randn(
            2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        )
        block.eval()
        y = block(x)
        assert y.shape == x.shape
        assert block.last_norm == block.operator.norm_bound(size)
        assert block.last_substeps == block.substeps(block.operator.norm_bound(size))
        block.train()
        block(x)
        assert block.last_norm == float(block.operator.sigma_estimate)
    dense = _dense_block().eval()
    dense(torch.randn(3, 8, dtype=torch.float64))
    assert dense.last_norm == dense.operator.norm_bound()


def test_an_unbatched_image_gets_the_certified_bound_of_its_own_size():
    """``(C, H, W)`` as ``(1, C, H, W)``: a bound for the construction size would be no bound."""
    block = _conv_block().eval()
    x = torch.randn(3, 12, 11, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert block.schedule(x) == block.schedule(x[None])
    assert block.last_norm == block.operator.norm_bound((12, 11)) != block.operator.norm_bound()


@pytest.mark.parametrize("time", [-3.0, 0.0, math.nan, math.inf])
def test_an_integration_time_loaded_from_a_state_dict_must_be_positive(time):
    """A negative time makes every sub-step gradient ascent: no certificate may come of it."""
    block = _conv_block().eval()
    state = {**block.state_dict(), "time": torch.tensor(time, dtype=torch.float64)}
    block.load_state_dict(state)
    for use in (block.lipschitz_bound, block.averagedness, lambda: block(torch.zeros(1, 3, 6, 5))):
        with pytest.raises(ValueError, match="integration time must be finite and > 0"):
            use()


def test_a_stagewise_bound_too_large_for_a_float_is_infinite():
    block = _conv_block("rk4")
    _scale(block, 60.0)  # thousands of sub-steps of a stage-wise bound above 1
    assert block.lipschitz_bound() == math.inf


@pytest.mark.parametrize(
    ("activation", "potential"),
    [
        ("relu", lambda z: F.relu(z).square() / 2),
        ("leaky_relu", lambda z: torch.where(z > 0, z * z / 2, 0.01 * z * z / 2)),
        ("tanh", lambda z: torch.log(torch.cosh(z))),
    ],
)
def test_field_is_the_negative_gradient_of_the_convex_potential(activation, potential):
    for block, shape in (
        (_dense_block(activation=activation), (4, 8)),
        (_conv_block(activation=activation, stride=1), (2, 3, 6, 5)),
    ):
        with torch.no_grad():
            block.operator.bias.normal_(generator=torch.Generator().manual_seed(2))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        x.requires_grad_()
        (grad,) = torch.autograd.grad(potential(block.operator(x)).sum(), x)
        torch.testing.assert_close(block.field(x), -grad, rtol=1e-12, atol=1e-12)


def test_block_forward_is_the_integrator_applied_n_times():
    block = _dense_block("heun").eval()
    _scale(block, 2.7)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = block(x)
    n = block.last_substeps
    assert n == 4
    h = float(block.time) / n
    z = x
    for _ in range(n):
        k1 = block.field(z)
        z = z + h / 2 * (k1 + block.field(z + h * k1))
    torch.testing.assert_close(y, z, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Certified bounds and averagedness


@pytest.mark.parametrize("integrator", ["euler", "heun", "ssprk3"])
def test_lipschitz_bound_is_one_for_positive_radius(integrator):
    block = _conv_block(integrator)
    assert block.lipschitz_bound() == 1.0
    _scale(block, 3.0)
    assert block.lipschitz_bound((6, 5)) == 1.0
    assert block.lipschitz_bound((11, 13)) == 1.0


@pytest.mark.parametrize("integrator", ["rk4", "midpoint"])
def test_lipschitz_bound_is_stagewise_for_zero_radius(integrator):
    block = _dense_block(integrator)
    _scale(block, 2.0)
    norm = block.operator.norm_bound()
    n = block.substeps(norm)
    h_ell = float(block.time) / n * block.activation.lipschitz * norm**2
    expected = get_integrator(integrator).stagewise_lipschitz(h_ell) ** n
    assert block.lipschitz_bound() == pytest.approx(expected, rel=1e-14)
    assert block.lipschitz_bound() > 1.0


def test_compose_averaged_values():
    assert compose_averaged(0.5, 0.5) == pytest.approx(2 / 3)
    assert compose_averaged(0.3, 0.0) == pytest.approx(0.3)
    assert compose_averaged(0.2, 0.7) == pytest.approx(compose_averaged(0.7, 0.2))
    assert compose_averaged(0.2, 0.7) == pytest.approx((0.9 - 0.28) / (1 - 0.14))


def test_compose_averaged_holds_for_linear_averaged_maps():
    """``T_i = (1-a_i) I + a_i R_i`` with orthogonal ``R_i``: the composition satisfies the
    averagedness inequality with the Combettes-Yamada constant (and is tight-ish)."""
    g = torch.Generator().manual_seed(0)
    worst = -1.0
    for a1, a2 in ((0.5, 0.5), (0.3, 0.8), (0.1, 0.2), (0.9, 0.6)):
        eye = torch.eye(6, dtype=torch.float64)
        q1 = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
        q2 = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
        t = ((1 - a2) * eye + a2 * q2) @ ((1 - a1) * eye + a1 * q1)
        a = compose_averaged(a1, a2)
        dx = torch.randn(2000, 6, generator=g, dtype=torch.float64)
        violation = averaged_objective(a)(dx, dx @ t.T)
        assert float(violation.max()) <= 1e-12
        worst = max(worst, float(violation.max()))
    assert worst > -0.5  # not vacuous


def test_averagedness_of_euler_blocks():
    block = _conv_block("euler", theta=0.5)
    ratio = block.operator.norm_bound() / _design_norm(block)
    assert block.averagedness() == pytest.approx(0.5 * ratio**2, rel=1e-12)
    assert block.averagedness() < 0.5  # the default time leaves headroom
    _to_design_norm(block)
    assert block.averagedness() == pytest.approx(0.5, rel=1e-12)
    _scale(block, 1.9)  # four sub-steps of (0.5 * 1.9^2 / 4)-averaged maps
    a = a_step = 0.5 * 1.9**2 / 4
    for _ in range(3):
        a = compose_averaged(a, a_step)
    assert block.substeps(block.operator.norm_bound()) == 4
    assert block.averagedness() == pytest.approx(a, rel=1e-12)
    for integrator in ("rk4", "midpoint"):  # radius 0: nothing guaranteed
        assert _conv_block(integrator, theta=0.5).averagedness() is None
    block = _conv_block("euler", theta=0.9)
    _to_design_norm(block)
    assert block.averagedness() == pytest.approx(0.9, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Adversarial audit of single blocks (eval mode, float64, weights scaled up)

DENSE_AUDIT = [
    ("euler", "leaky_relu", 8, 6),
    ("heun", "relu", 6, 10),
    ("ssprk3", "tanh", 8, 6),
    ("euler", "sigmoid", 6, 6),
    ("heun", "elu", 8, 6),
    ("ssprk3", "leaky_relu", 6, 10),
]


@pytest.mark.parametrize(("integrator", "activation", "n_in", "n_out"), DENSE_AUDIT)
@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_dense_block_is_nonexpansive_under_attack(integrator, activation, n_in, n_out, theta):
    block = _dense_block(integrator, theta, activation, n_in, n_out, seed=n_in + n_out).eval()
    _scale(block, 3.0)
    with torch.no_grad():
        block(torch.zeros(1, n_in, dtype=torch.float64))
    assert block.last_substeps > 1
    assert block.lipschitz_bound() == 1.0
    ratio = adversary(block, (n_in,), steps=150)
    print(f"dense {integrator} {activation} theta={theta}: max ratio {ratio:.9f} (bound 1)")
    assert ratio <= 1 + TOL
    assert ratio > 0.5  # the attack is not degenerate


CONV_AUDIT = [
    # kernel, padding, dilation, size, seed, bias (a large bias puts every unit in its linear
    # region, where the step along the top singular vector is exactly -1 at the step limit)
    (3, 1, 1, (6, 5), 0, 0.0),
    (3, 1, 1, (6, 5), 0, 3.0),
    (2, 1, 1, (4, 4), 1, 3.0),  # even kernel
    (3, 2, 2, (6, 7), 2, 0.0),  # dilated
]


@pytest.mark.parametrize(("kernel", "padding", "dilation", "size", "seed", "bias"), CONV_AUDIT)
@pytest.mark.parametrize("integrator", ["euler", "heun", "ssprk3"])
def test_conv_block_is_nonexpansive_under_attack(
    kernel, padding, dilation, size, seed, bias, integrator
):
    block = _conv_block(
        integrator,
        1.0,
        "relu",
        seed,
        kernel_size=kernel,
        padding=padding,
        dilation=dilation,
        input_size=size,
        in_channels=2,
        out_channels=2,
    )
    block.eval()
    _scale(block, 2.0)
    with torch.no_grad():
        block.operator.bias.fill_(bias)
        block(torch.zeros(1, 2, *size, dtype=torch.float64))
    assert block.last_substeps > 1
    assert block.lipschitz_bound(size) == 1.0
    ratio = adversary(block, (2, *size), steps=60, starts=6)
    print(f"conv k{kernel} d{dilation} {size} bias {bias} {integrator}: max ratio {ratio:.9f}")
    assert ratio <= 1 + TOL
    assert ratio > 0.5


@pytest.mark.parametrize(
    ("kind", "integrator", "theta"),
    [("dense", "euler", 0.5), ("conv", "euler", 0.5), ("dense", "heun", 0.5),
     ("conv", "heun", 1.0), ("dense", "ssprk3", 1.0), ("conv", "ssprk3", 0.5)],
)  # fmt: skip
def test_averaged_block_satisfies_the_averagedness_inequality_under_attack(kind, integrator, theta):
    """Euler's sub-steps, and Heun's and SSPRK3's (convex combinations of Euler steps: averaged
    even at theta 1, where an Euler step is merely non-expansive)."""
    block = (_dense_block if kind == "dense" else _conv_block)(integrator, theta)
    shape = (8,) if kind == "dense" else (3, 6, 5)
    block.eval()
    for factor in (1.0, 1.5):
        _scale(block, factor)
        alpha = block.averagedness()
        assert alpha is not None and 0 < alpha < 1
        worst = adversary(block, shape, averaged_objective(alpha), steps=80, starts=6)
        print(f"{kind} {integrator} theta={theta} alpha={alpha:.4f}: max violation {worst:.3e}")
        assert worst <= TOL
        # With a smaller claimed alpha the inequality fails: the audit can detect violations.
        assert adversary(block, shape, averaged_objective(alpha / 3), steps=30) > 0


def test_averagedness_is_tight_for_one_euler_step_in_the_linear_region():
    """ReLU with a large bias: the block is ``x - h A^T (A x + b)``, and along the top singular
    vector of ``A`` the inequality holds with equality at ``alpha = h L ||A||^2 / 2``."""
    block = _dense_block("euler", 0.5, "relu", 8, 6).eval()
    _to_design_norm(block)
    with torch.no_grad():
        block.operator.bias.fill_(50.0)
    alpha = block.averagedness()
    assert alpha == pytest.approx(0.5, rel=1e-12)
    worst = adversary(block, (8,), averaged_objective(alpha), steps=150)
    print(f"linear-region Euler block: max violation {worst:.3e} at alpha={alpha}")
    assert -1e-3 < worst <= TOL
    assert adversary(block, (8,), averaged_objective(0.95 * alpha), steps=150) > 0


class _OneStepBlock(NonexpansiveBlock):
    """A deliberately broken block that ignores the step rule (always one sub-step)."""

    def substeps(self, norm: float) -> int:
        return 1


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_adversary_detects_a_block_that_breaks_the_step_rule(kind):
    if kind == "dense":
        op, shape = DenseOperator(8, 6, generator=torch.Generator().manual_seed(0)), (8,)
    else:
        op = Conv2dOperator(3, 3, 3, (6, 5), padding=1, generator=torch.Generator().manual_seed(0))
        shape = (3, 6, 5)
    block = _OneStepBlock(op, build_activation("leaky_relu"), "euler").double().eval()
    _scale(block, 3.0)  # h nu = 9 with one step
    ratio = adversary(block, shape, steps=60)
    print(f"broken {kind} block: max ratio {ratio:.3f}")
    assert ratio > 2.0


@pytest.mark.parametrize("integrator", ["rk4", "midpoint"])
def test_zero_radius_block_is_audited_against_its_stagewise_bound(integrator):
    block = _dense_block(integrator, 1.0, "relu", 8, 6).eval()
    _to_design_norm(block)
    _scale(block, 3.0)  # nine sub-steps at the step limit
    bound = block.lipschitz_bound()
    ratio = adversary(block, (8,), steps=150)
    print(f"dense {integrator}: max ratio {ratio:.9f}, stage-wise bound {bound:.3g}")
    assert bound > 1.0
    assert ratio <= bound * (1 + TOL)
    if integrator == "midpoint":  # radius 0 is real: at the paper's step rule it expands
        assert ratio > 1.5


# --------------------------------------------------------------------------------------------
# Residual blocks


def _identity_residual_block(d: int, bias: float) -> ResidualBlock:
    """``x - B relu(A x + b)`` with ``A = I``, ``B = -I``: ``2 x + b`` where ``x + b > 0``."""
    a, b = DenseOperator(d, d).double(), DenseOperator(d, d).double()
    with torch.no_grad():
        a.weight.copy_(torch.eye(d))
        b.weight.copy_(-torch.eye(d))
        a.bias.fill_(bias)
        b.bias.zero_()
    return ResidualBlock(a, b, build_activation("relu"))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_resnet_counterexample_reaches_two_to_the_k(k):
    d = 5
    blocks = [_identity_residual_block(d, bias=10.0) for _ in range(k)]
    for block in blocks:
        assert block.first.norm_bound() == pytest.approx(1.0, abs=2 * CERTIFICATE_SLACK)
        assert block.second.norm_bound() == pytest.approx(1.0, abs=2 * CERTIFICATE_SLACK)
    stack = nn.Sequential(*blocks)
    g = torch.Generator().manual_seed(k)
    x = torch.rand(4, d, generator=g, dtype=torch.float64)  # positive region
    y = x + 1e-3 * torch.randn(4, d, generator=g, dtype=torch.float64)
    ratio = (stack(x) - stack(y)).norm(dim=1) / (x - y).norm(dim=1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0**k), rtol=1e-9, atol=0)
    bound = math.prod(block.lipschitz_bound() for block in blocks)
    assert bound >= 2.0**k
    assert bound == pytest.approx(2.0**k, rel=1e-6)
    # The adversary finds it too (starts at x ~ N(5, 1), in the positive region).
    found = adversary(stack, (d,), steps=20, offset=5.0)
    assert found == pytest.approx(2.0**k, rel=1e-6)


def test_residual_block_forward_and_bound():
    g = torch.Generator().manual_seed(5)
    a = Conv2dOperator(2, 3, 3, (5, 6), padding=1, generator=g).double()
    b = Conv2dOperator(3, 2, 3, (5, 6), padding=1, generator=g).double()
    with torch.no_grad():
        a.bias.normal_(generator=g)
        b.bias.normal_(generator=g)
    block = ResidualBlock(a, b, build_activation("leaky_relu"))
    x = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64)
    expected = x - (b.matvec(F.leaky_relu(a(x), 0.01)) + b.bias.view(1, 2, 1, 1))
    torch.testing.assert_close(block(x), expected, rtol=1e-14, atol=1e-14)
    bound = block.lipschitz_bound((5, 6))
    assert bound == pytest.approx(1 + a.norm_bound((5, 6)) * b.norm_bound((5, 6)), rel=1e-14)
    with torch.no_grad():
        a.weight.mul_(3)
    assert block.lipschitz_bound((5, 6)) > bound
    ratio = adversary(block, (2, 5, 6), steps=60)
    print(f"residual conv block: max ratio {ratio:.6f}, bound {block.lipschitz_bound((5, 6)):.6f}")
    assert 1.0 < ratio <= block.lipschitz_bound((5, 6)) * (1 + TOL)
    with pytest.raises(ValueError, match="lipschitz"):
        ResidualBlock(a, b, nn.ReLU()).lipschitz_bound()
