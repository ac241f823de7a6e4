"""Tests of PSNR, fixed-seed noise, the discrete gradient/divergence and TV denoising."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import cartoon as piecewise_constant

from stablenets.evaluation.metrics import fixed_noise, psnr
from stablenets.evaluation.tv import (
    GRADIENT_NORM_SQ,
    divergence2d,
    gradient2d,
    project_dual_ball,
    select_tv_weight,
    tv_denoise,
)


def tv_objective(x: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-image ``1/2 ||x - y||^2 + weight * sum |grad x|`` (isotropic, per channel)."""
    tv = gradient2d(x).pow(2).sum(dim=-3).sqrt().flatten(1).sum(dim=1)
    return 0.5 * (x - y).pow(2).flatten(1).sum(dim=1) + weight * tv


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 4), (1, 2, 6, 1), (3, 1, 9, 9)])
def test_gradient_divergence_adjoint(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    p = torch.randn((*shape[:-2], 2, *shape[-2:]), generator=gen, dtype=torch.float64)
    lhs = (gradient2d(x) * p).sum()
    rhs = -(x * divergence2d(p)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("couple_channels", [False, True])
def test_gradient_divergence_and_the_dual_projection_are_differentiable(couple_channels) -> None:
    """Written in place for speed, they still carry exact gradients (a TV loss can use them)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, 5, 7), generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.randn((2, 3, 2, 5, 7), generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gradient2d, (x,))
    assert torch.autograd.gradcheck(divergence2d, (p,))
    assert torch.autograd.gradcheck(lambda q: project_dual_ball(q, 0.5, couple_channels), (p,))


def test_gradient_neumann_and_norm_bound() -> None:
    h, w = 4, 5
    eye = torch.eye(h * w, dtype=torch.float64).reshape(h * w, h, w)
    dense = gradient2d(eye).reshape(h * w, -1).T  # columns are gradients of unit images
    assert torch.linalg.matrix_norm(dense, ord=2) ** 2 <= GRADIENT_NORM_SQ
    ramp = torch.arange(w, dtype=torch.float64).expand(h, w)
    g = gradient2d(ramp)
    assert torch.all(g[0] == 0)  # no vertical change
    assert torch.all(g[1, :, :-1] == 1) and torch.all(g[1, :, -1] == 0)  # Neumann boundary


def test_psnr_known_values() -> None:
    ref = torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64)
    ref[1] = 0.25
    x = ref + 0.1  # MSE = 0.01 for both images
    assert torch.allclose(psnr(x, ref, 1.0), torch.tensor([20.0, 20.0], dtype=torch.float64))
    expected_max = torch.tensor([10 * math.log10(0.25 / 0.01), 10 * math.log10(0.0625 / 0.01)])
    assert torch.allclose(psnr(x, ref, "max"), expected_max.double())
    assert torch.allclose(psnr(x, ref, 2.0), torch.full((2,), 10 * math.log10(400.0)).double())
    assert psnr(x, ref).shape == (2,)
    assert torch.isinf(psnr(ref, ref, 1.0)).all()
    with pytest.raises(ValueError, match="peak"):
        psnr(x, ref, "min")


def test_fixed_noise_deterministic_and_subset_consistent() -> None:
    images = torch.rand(5, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    full = fixed_noise(images, 0.15, seed=7)
    assert torch.equal(full, fixed_noise(images, 0.15, seed=7))
    subset = fixed_noise(images[2:4], 0.15, seed=7, indices=[2, 3])
    assert torch.equal(subset, full[2:4])
    assert not torch.allclose(full, fixed_noise(images, 0.15, seed=8))
    noise = full - images
    assert not torch.allclose(noise[0], noise[1])  # each image gets its own noise
    assert abs(float(noise.std()) - 0.15) < 0.01
    assert float(full.max()) > 1.0 or float(full.min()) < 0.0  # not clipped
    as64 = fixed_noise(images.double(), 0.15, seed=7)
    assert torch.allclose(as64.float(), full, atol=1e-6)  # same noise whatever the dtype


def test_tv_denoise_solves_rof_and_improves_psnr() -> None:
    clean = piecewise_constant()
    noisy = fixed_noise(clean, 0.1, seed=0)
    weight = 0.1
    out = tv_denoise(noisy, weight, iters=300).x
    gain = psnr(out, clean) - psnr(noisy, clean)
    assert torch.all(gain > 8.0), gain
    obj = tv_objective(out, noisy, weight)
    assert torch.all(obj < tv_objective(clean, noisy, weight))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # a minimiser: random perturbations do not decrease the objective
        bumped = out + 1e-3 * torch.randn(out.shape, generator=gen, dtype=out.dtype)
        assert torch.all(obj <= tv_objective(bumped, noisy, weight) + 1e-9)
    assert torch.equal(tv_denoise(noisy, 0.0).x, noisy)


def test_tv_denoise_stops_only_within_tol_of_the_minimiser_as_its_duality_gap_certifies() -> None:
    """Against a reference solved 30x longer: the gap's bound is never below the true distance,
    and a stop at ``tol`` is within ``tol`` (the old relative-change rule stopped 160x away)."""
    noisy = fixed_noise(piecewise_constant(), 0.15, seed=2)
    weight = 0.12
    reference = tv_denoise(noisy, weight, iters=6000, tol=0.0, check_every=6000).x

    def distance(x):
        return ((x - reference).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max()

    for iters in (20, 60, 200):
        run = tv_denoise(noisy, weight, iters=iters, tol=0.0)
        assert run.iterations == iters and run.distance >= float(distance(run.x)) - 1e-7
    stopped = tv_denoise(noisy, weight, iters=6000, tol=1e-3)
    assert stopped.iterations < 6000 and stopped.distance <= 1e-3
    assert distance(stopped.x) <= 1e-3


def test_tv_denoise_large_weight_gives_channel_mean() -> None:
    noisy = fixed_noise(piecewise_constant(n=1, h=12, w=10), 0.1, seed=0)
    out = tv_denoise(noisy, 100.0, iters=2000, tol=0.0).x
    mean = noisy.mean(dim=(-2, -1), keepdim=True).expand_as(noisy)
    assert torch.allclose(out, mean, atol=1e-3)


def test_tv_denoise_batched_matches_single() -> None:
    noisy = fixed_noise(piecewise_constant(), 0.1, seed=0)
    batched = tv_denoise(noisy, 0.05, iters=50, tol=0.0).x
    single = tv_denoise(noisy[1:], 0.05, iters=50, tol=0.0).x
    assert torch.allclose(batched[1:], single, atol=1e-12)


def test_tv_denoise_stops_each_image_on_its_own_so_its_answer_is_its_solve_alone() -> None:
    """A batch ran until its slowest image stopped, so an image's answer (and PSNR, by up to
    0.013 dB on the smoke photos) depended on the images beside it: the group size changed the
    numbers."""
    clean = piecewise_constant()
    noisy = torch.cat([fixed_noise(clean, 0.03, seed=0), fixed_noise(clean, 0.3, seed=1)])
    together = tv_denoise(noisy, 0.05, iters=3000, tol=1e-3)
    alone = [tv_denoise(noisy[i : i + 1], 0.05, iters=3000, tol=1e-3) for i in range(len(noisy))]
    assert len({run.iterations for run in alone}) > 1  # they stop at different iterations
    assert together.iterations == max(run.iterations for run in alone) < 3000
    assert together.distance == max(run.distance for run in alone) <= 1e-3
    torch.testing.assert_close(together.x, torch.cat([run.x for run in alone]), rtol=0, atol=1e-12)


def test_tv_refuses_images_not_shaped_n_c_h_w() -> None:
    """A (N, H, W) batch paired two rows as one pixel's gradient directions in the dual ball's
    projection: an answer 0.27 off, certified at distance 0."""
    from stablenets.evaluation.pnp import GaussianBlur, tv_deblur

    grey = fixed_noise(piecewise_constant(c=1), 0.1, seed=0)
    with pytest.raises(ValueError, match=r"TV needs images shaped \(N, C, H, W\), got shape \(2, "):
        tv_denoise(grey[:, 0], 0.1, iters=20)
    with pytest.raises(ValueError, match=r"TV needs images shaped \(N, C, H, W\)"):
        tv_deblur(grey[:, 0], GaussianBlur(3, 1.0, grey.shape[1:]), 0.1, iters=5)


def test_select_tv_weight_interior() -> None:
    clean = piecewise_constant(c=1, h=24, w=32)
    noisy = fixed_noise(clean, 0.1, seed=3)
    weights, lines = [1e-3, 0.03, 0.1, 0.3, 3.0], []
    chosen, scores = select_tv_weight(noisy, clean, weights, iters=100, log=lines.append)
    assert len(scores) == len(weights)
    assert chosen == weights[max(range(len(scores)), key=scores.__getitem__)]
    assert chosen not in (weights[0], weights[-1])
    assert len(lines) == len(weights)  # a line per weight, no warning: the best is inside
    _, chunked = select_tv_weight(noisy, clean, weights[:2], iters=20, batch_size=1)
    _, whole = select_tv_weight(noisy, clean, weights[:2], iters=20)
    assert chunked == pytest.approx(whole, abs=1e-9)
    with pytest.raises(ValueError):
        select_tv_weight(noisy, clean, [], iters=10)


def test_select_tv_weight_logs_a_line_per_weight_with_its_psnr_and_an_eta() -> None:
    clean = piecewise_constant(c=1, h=24, w=32)
    noisy = fixed_noise(clean, 0.1, seed=3)
    lines: list[str] = []
    chosen, scores = select_tv_weight(noisy, clean, [0.03, 0.1], iters=20, log=lines.append)
    assert len(lines) == 3  # a line per weight, then: the best is at the candidates' edge
    edge = "smallest" if chosen == 0.03 else "largest"
    assert lines[2].startswith(f"TV weight {chosen:g} is the {edge} candidate: the best value")
    for k, (line, w, score) in enumerate(zip(lines[:2], [0.03, 0.1], scores, strict=True), 1):
        assert re.fullmatch(
            rf"TV weight {w:g} \({k}/2\): validation PSNR {score:.2f} dB, elapsed \d+ s, "
            r"ETA \d+ s",
            line,
        ), line
