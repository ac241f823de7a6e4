"""Tests of stablenets.robustness against analytic answers and an independent reference PGD."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from stablenets.robustness import (
    InvariantError,
    accuracy,
    auc,
    autoattack_l2,
    certified_accuracy,
    certified_radius,
    check_invariant,
    margins,
    pgd_l2,
    robust_accuracy_curve,
)

SHAPE = (3, 4, 4)
DIM = math.prod(SHAPE)
BALL_TOL = 1e-6


# --------------------------------------------------------------------------------------------
# fixtures: models with known geometry


def linear_model(weight: Tensor, bias: Tensor) -> nn.Module:
    """Logits z = W vec(x) + b."""
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), layer)


def random_linear(n_classes: int, seed: int, scale: float = 1.0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    weight = scale * torch.randn(n_classes, DIM, generator=g)
    bias = -weight.sum(dim=1) * 0.5 + 0.1 * torch.randn(n_classes, generator=g)
    return linear_model(weight, bias)


def exact_distance(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Exact L2 distance to the decision boundary of a linear classifier (float64).

    The class-y region is the polyhedron {z_y >= z_j for all j}; the distance from an interior
    point to its complement is min_{j != y} (z_y - z_j) / ||w_y - w_j||.
    """
    layer = model[1]
    w, b = layer.weight.double(), layer.bias.double()
    z = x.flatten(1).double() @ w.T + b
    diff_w = w[y][:, None, :] - w[None, :, :]  # (N, K, D): w_y - w_j
    dist = (z.gather(1, y[:, None]) - z) / diff_w.norm(dim=2).clamp_min(1e-300)
    dist.scatter_(1, y[:, None], math.inf)
    return dist.min(dim=1).values


def inner_points(n: int, seed: int, half_width: float = 0.15) -> Tensor:
    """Points in [0.5 - w, 0.5 + w]^n: a ball of radius <= 0.5 - w stays inside [0, 1]^n."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 + half_width * (2 * torch.rand(n, *SHAPE, generator=g) - 1)


def predictions(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


def small_net(seed: int, gain: float = 10.0) -> nn.Module:
    """A small conv net whose head is scaled by ``gain`` so that its predictions are confident."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.LeakyReLU(0.01),
        nn.Flatten(),
        nn.Linear(8 * DIM // 3, 10),
    )
    with torch.no_grad():
        net[4].weight.mul_(gain)
    return net


def distances(x_adv: Tensor, x: Tensor) -> Tensor:
    return (x_adv - x).flatten(1).norm(dim=1)


# --------------------------------------------------------------------------------------------
# (1) PGD stays in the ε-ball and in [0, 1]; is deterministic; leaves the model untouched


@pytest.mark.parametrize(("eps", "steps"), [(0.05, 5), (0.5, 5), (4.0, 5), (4.0, 0)])
def test_pgd_respects_ball_and_box(eps: float, steps: int) -> None:
    model = small_net(0).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, *SHAPE, generator=g)
    x[:, 0, 0, 0] = 0.0  # pixels on the box boundary
    x[:, 1, 0, 0] = 1.0
    y = predictions(model, x)
    x_adv = pgd_l2(model, x, y, eps, steps=steps, restarts=2)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.all(distances(x_adv, x) <= eps + BALL_TOL)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # the attack actually moved: most points travelled at least half the radius (or hit the box)
    assert (distances(x_adv, x) > 0.5 * min(eps, 1.0)).float().mean() > 0.9


def test_pgd_eps_zero_and_determinism_and_model_state() -> None:
    model = small_net(0)
    model.train()  # BatchNorm would update its running statistics if PGD used train mode
    running_mean = model[1].running_mean.clone()
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(2))
    y = predictions(model.eval(), x)
    model.train()
    assert torch.equal(pgd_l2(model, x, y, 0.0), x)
    first = pgd_l2(model, x, y, 0.3, generator=torch.Generator().manual_seed(5))
    again = pgd_l2(model, x, y, 0.3, generator=torch.Generator().manual_seed(5))
    other = pgd_l2(model, x, y, 0.3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert model.training and model[1].training  # mode restored
    assert torch.equal(model[1].running_mean, running_mean)  # no state updated
    assert model[0].weight.grad is None  # no parameter gradients accumulated


def test_pgd_returns_misclassified_points_unchanged() -> None:
    model = small_net(0).eval()
    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(3))
    y = (predictions(model, x) + 1) % 10  # every point misclassified
    assert torch.equal(pgd_l2(model, x, y, 0.5), x)


def test_pgd_restarts_only_add_adversarial_examples() -> None:
    model = random_linear(10, seed=27, scale=0.2)
    x = inner_points(200, seed=28)
    y = predictions(model, x)
    eps = exact_distance(model, x, y).median().item()
    fooled = {}
    for restarts in (1, 4):
        gen = torch.Generator().manual_seed(3)
        x_adv = pgd_l2(model, x, y, eps, steps=2, rel_step=0.1, restarts=restarts, generator=gen)
        assert torch.all(distances(x_adv, x) <= eps + BALL_TOL)
        fooled[restarts] = predictions(model, x_adv) != y
    assert torch.all(fooled[4][fooled[1]])  # the first run is the same; later runs only add
    assert fooled[4].sum() > fooled[1].sum()  # and they help a weak attack


# --------------------------------------------------------------------------------------------
# (2) agreement with a plain per-sample reference and with the analytic linear answer


def reference_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    rel_step: float,
    random_start: bool,
    seed: int = 0,
) -> Tensor:
    """Textbook L2 PGD, one sample at a time, random start r·u with u on the sphere, r ~ U^(1/n)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for xi, yi in zip(x, y, strict=True):
        if random_start:
            direction = torch.randn(xi.shape, generator=g)
            radius = eps * torch.rand(1, generator=g).item() ** (1.0 / xi.numel())
            xa = (xi + radius * direction / direction.norm()).clamp(0, 1)
        else:
            xa = xi.clone()
        for _ in range(steps):
            xa = xa.detach().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(xa[None]), yi[None])
            (grad,) = torch.autograd.grad(loss, xa)
            xa = xa.detach() + rel_step * eps * grad / grad.norm()
            delta = xa - xi
            if delta.norm() > eps:
                delta = delta * (eps / delta.norm())
            xa = (xi + delta).clamp(0, 1)
        out.append(xa)
    return torch.stack(out)


def test_pgd_matches_reference_implementation() -> None:
    model = small_net(0).eval()
    x = torch.rand(48, *SHAPE, generator=torch.Generator().manual_seed(4))
    y = predictions(model, x)
    # the paper's protocol without random start: both deterministic, equal up to rounding
    ours = pgd_l2(model, x, y, 0.5, steps=10, rel_step=0.025, random_start=False)
    ref = reference_pgd(model, x, y, 0.5, 10, 0.025, random_start=False)
    assert torch.allclose(ours, ref, atol=1e-5)
    # random starts with different draws: a converged attack (10 10-% steps would barely leave
    # the random start) must reach the same outcome per point and the same loss
    eps, steps, rel = 0.2, 50, 0.1
    ours = pgd_l2(model, x, y, eps, steps=steps, rel_step=rel, seed=0)
    ref = reference_pgd(model, x, y, eps, steps, rel, random_start=True, seed=1)
    robust_ours = predictions(model, ours) == y
    robust_ref = predictions(model, ref) == y
    assert 0.3 < robust_ref.float().mean() < 0.8  # the radius makes the comparison informative
    assert (robust_ours == robust_ref).float().mean() >= 0.95
    with torch.no_grad():
        loss_ours = nn.functional.cross_entropy(model(ours), y).item()
        loss_ref = nn.functional.cross_entropy(model(ref), y).item()
        loss_clean = nn.functional.cross_entropy(model(x), y).item()
    assert loss_ours > loss_clean + 0.1  # the ascent made progress
    assert loss_ours == pytest.approx(loss_ref, rel=0.01)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_finds_exact_distance_binary_linear(random_start: bool) -> None:
    model = random_linear(2, seed=7, scale=0.2)
    x = inner_points(200, seed=8)
    y = predictions(model, x)
    dist = exact_distance(model, x, y)
    eps = 0.1
    assert 0.2 < (dist < eps).float().mean() < 0.8
    x_adv = pgd_l2(model, x, y, eps, steps=100, rel_step=0.05, random_start=random_start)
    flipped = predictions(model, x_adv) != y
    band = 1e-4 if not random_start else 1e-2  # straight line vs convergence on the sphere
    assert torch.all(flipped[dist < eps * (1 - band)])
    assert not torch.any(flipped[dist > eps * (1 + 1e-4)])


def test_pgd_multiclass_linear_flips_near_and_never_far_points() -> None:
    model = random_linear(10, seed=9, scale=0.2)
    x = inner_points(200, seed=10)
    y = predictions(model, x)
    dist = exact_distance(model, x, y)
    eps = dist.median().item()
    assert eps < 0.35  # the ball stays inside [0, 1]^n, so the exact distance applies
    x_adv = pgd_l2(model, x, y, eps, steps=100, rel_step=0.05, restarts=3)
    flipped = predictions(model, x_adv) != y
    # cross-entropy ascent is not the minimal-distance direction with 10 classes, so only points
    # well inside the ball must fall; none beyond the exact distance may (soundness)
    assert torch.all(flipped[dist < 0.5 * eps])
    assert not torch.any(flipped[dist > eps * (1 + 1e-4)])
    assert (~flipped).float().mean() >= (dist > eps).float().mean()


# --------------------------------------------------------------------------------------------
# margins, accuracy and the robust-accuracy curve


def test_margins_and_accuracy_match_manual_computation() -> None:
    model = random_linear(10, seed=11)
    x = inner_points(50, seed=12)
    y = torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        z = model(x)
    m, correct = margins(model, x, y, batch_size=7)
    for i in range(len(x)):
        others = torch.cat([z[i, : y[i]], z[i, y[i] + 1 :]])
        assert m[i].item() == pytest.approx((z[i, y[i]] - others.max()).item(), abs=1e-5)
    assert torch.equal(correct, z.argmax(1) == y)
    assert torch.equal(correct, m > 0)
    assert accuracy(model, x, y, batch_size=7) == pytest.approx(correct.float().mean().item())
    assert accuracy(model, x, y, batch_size=64) == accuracy(model, x, y, batch_size=7)


def test_robust_accuracy_curve_properties() -> None:
    model = small_net(0).eval()
    x = torch.rand(40, *SHAPE, generator=torch.Generator().manual_seed(14))
    y = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(15))
    y[:20] = predictions(model, x[:20])  # half correct, half (mostly) wrong
    clean = accuracy(model, x, y, batch_size=16)
    attack = partial(pgd_l2, steps=5, random_start=False)
    grid = np.array([0.0, 0.1, 0.3, 1.0])
    curve = robust_accuracy_curve(model, x, y, grid, attack, batch_size=16)
    assert curve.shape == grid.shape
    assert curve[0] == pytest.approx(clean)
    assert np.all(curve <= clean) and curve[-1] < clean
    assert np.array_equal(curve, robust_accuracy_curve(model, x, y, grid, attack, batch_size=40))


def test_robust_accuracy_never_counts_points_misclassified_when_clean() -> None:
    # a "helpful" attack that pushes each point towards its label's side of a binary boundary
    model = random_linear(2, seed=29, scale=0.2)
    w = model[1].weight.detach()
    x = inner_points(100, seed=30)
    y = torch.randint(0, 2, (100,), generator=torch.Generator().manual_seed(31))

    def helpful(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        towards = (w[y] - w[1 - y]).view(-1, *SHAPE)
        return (
            x + eps * towards / distances(towards, torch.zeros_like(towards))[:, None, None, None]
        )

    clean = accuracy(model, x, y, batch_size=100)
    assert (predictions(model, helpful(model, x, y, 0.3)) == y).float().mean() > clean
    curve = robust_accuracy_curve(model, x, y, [0.0, 0.3], helpful, batch_size=32)
    assert curve[0] == pytest.approx(clean) and curve[1] <= clean


def test_robust_accuracy_curve_rejects_attack_leaving_ball() -> None:
    model = small_net(0).eval()
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(16))

    def cheat(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        return torch.full_like(x, 0.5)  # far outside a ball of radius 0.01

    with pytest.raises(ValueError, match="ball"):
        robust_accuracy_curve(model, x, predictions(model, x), [0.01], cheat, batch_size=4)


# --------------------------------------------------------------------------------------------
# (3) certificates against the analytic distance, PGD and AutoAttack


def spectral_norm(model: nn.Module) -> float:
    return torch.linalg.matrix_norm(model[1].weight.double(), ord=2).item()


def test_certified_radius_is_a_lower_bound_of_exact_distance() -> None:
    model = random_linear(10, seed=17, scale=0.2)
    x = inner_points(300, seed=18)
    y = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(19))
    y[:200] = predictions(model, x[:200])
    m, correct = margins(model, x, y, batch_size=64)
    radius = certified_radius(m, correct, spectral_norm(model))
    assert torch.all(radius[~correct] == 0)
    dist = exact_distance(model, x[correct], y[correct])
    assert torch.all(radius[correct] <= dist + 1e-6)
    assert torch.all(radius[correct] > 0)


def test_certified_radius_is_exact_when_the_bound_is_tight() -> None:
    # z = (w·x + c, -w·x - c): ||W||_2 = sqrt(2)||w|| and ||w_0 - w_1|| = 2||w|| = sqrt(2) L
    g = torch.Generator().manual_seed(20)
    w = 0.2 * torch.randn(DIM, generator=g)
    c = -0.5 * w.sum()
    model = linear_model(torch.stack([w, -w]), torch.stack([c, -c]))
    x = inner_points(100, seed=21)
    y = predictions(model, x)
    m, correct = margins(model, x, y, batch_size=100)
    radius = certified_radius(m, correct, spectral_norm(model))
    assert torch.allclose(radius, exact_distance(model, x, y), rtol=1e-4, atol=1e-6)


def test_certified_accuracy_counts_and_is_never_beaten_by_pgd() -> None:
    model = random_linear(10, seed=22, scale=0.2)
    x = inner_points(120, seed=23)
    y = torch.randint(0, 10, (120,), generator=torch.Generator().manual_seed(24))
    y[:100] = predictions(model, x[:100])
    lip = spectral_norm(model)
    m, correct = margins(model, x, y, batch_size=32)
    grid = np.linspace(0.0, 0.3, 7)
    cert = certified_accuracy(m, correct, lip, grid)
    manual = [
        (correct & (m.double() > math.sqrt(2) * lip * e)).double().mean().item() for e in grid
    ]
    assert np.allclose(cert, manual)
    assert np.all(np.diff(cert) <= 0) and cert[0] == pytest.approx(correct.double().mean().item())
    strong = partial(pgd_l2, steps=50, rel_step=0.05, restarts=2)
    empirical = robust_accuracy_curve(model, x, y, grid, strong, batch_size=64)
    check_invariant(grid, cert, empirical, accuracy(model, x, y, 64), "linear")
    radius = certified_radius(m, correct, lip)
    for e in grid[1:]:
        x_adv = strong(model, x, y, float(e))
        flipped = predictions(model, x_adv) != y
        assert not torch.any(flipped & (radius > e))


def test_autoattack_wrapper_on_tiny_linear_model() -> None:
    model = random_linear(5, seed=25, scale=0.2)
    x = inner_points(16, seed=26)
    y = predictions(model, x)
    dist = exact_distance(model, x, y)
    eps = dist.median().item()
    m, correct = margins(model, x, y, batch_size=16)
    radius = certified_radius(m, correct, spectral_norm(model))
    rng_state = torch.get_rng_state()
    x_adv = autoattack_l2(
        model, x, y, eps, batch_size=16, version="custom", attacks=["apgd-ce", "apgd-t"]
    )
    assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched
    assert x_adv.shape == x.shape and x_adv.device == x.device
    assert torch.all(distances(x_adv, x) <= eps + 1e-5)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    flipped = predictions(model, x_adv) != y
    assert torch.all(flipped[dist < 0.95 * eps])  # the analytic minimal distance is found
    assert not torch.any(flipped[dist > eps * (1 + 1e-4)])
    assert not torch.any(flipped[radius > eps])  # certified points survive
    assert torch.equal(autoattack_l2(model, x, y, 0.0, batch_size=16), x)


def test_autoattack_rejects_inconsistent_arguments() -> None:
    model = random_linear(5, seed=25)
    x = inner_points(2, seed=26)
    with pytest.raises(ValueError, match="custom"):
        autoattack_l2(model, x, predictions(model, x), 0.1, batch_size=2, attacks=["apgd-ce"])


# --------------------------------------------------------------------------------------------
# (4) the invariant and (5) the area under the curve


def test_check_invariant_passes_on_valid_input() -> None:
    grid = [0.0, 0.5, 1.0]
    check_invariant(grid, [0.8, 0.4, 0.1], [0.9, 0.6, 0.1], 0.9, "ok-model")
    check_invariant(grid, [0.8, 0.41, 0.1], [0.9, 0.4, 0.1], 0.9, "ok-model", atol=0.02)


def test_check_invariant_raises_on_unsound_certificate() -> None:
    with pytest.raises(InvariantError) as info:
        check_invariant([0.0, 0.5, 1.0], [0.8, 0.7, 0.1], [0.9, 0.6, 0.1], 0.9, "resnet-seed0")
    message = str(info.value)
    assert "resnet-seed0" in message and "eps=0.5" in message
    assert "0.7" in message and "0.6" in message and "certified" in message


def test_check_invariant_raises_when_empirical_exceeds_clean() -> None:
    with pytest.raises(InvariantError, match=r"'cpl'.*eps=0\b.*0\.95.*0\.9"):
        check_invariant([0.0, 1.0], [0.5, 0.1], [0.95, 0.2], 0.9, "cpl")


def test_check_invariant_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        check_invariant([0.0, 1.0], [0.5], [0.6, 0.2], 0.9, "m")


def test_auc_of_known_curves() -> None:
    grid = np.linspace(0.0, 1.0, 40)
    assert auc(grid, 1.0 - grid) == pytest.approx(0.5, abs=1e-12)
    assert auc(grid, np.full(40, 0.7)) == pytest.approx(0.7, abs=1e-12)
    fine = np.linspace(0.0, 1.0, 2001)
    assert auc(fine, np.exp(-fine)) == pytest.approx(1 - math.exp(-1), abs=1e-6)
    assert auc([0.0, 1.0, 3.0], [1.0, 0.0, 0.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        auc(grid, grid[:-1])
