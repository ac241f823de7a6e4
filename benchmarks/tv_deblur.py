"""The TV deblurring iteration against its former implementation, in one run (session 20).

    .venv/bin/python benchmarks/tv_deblur.py                    # 20 images of 321x481
    .venv/bin/python benchmarks/tv_deblur.py --images 5 --iters 10

One Chambolle-Pock iteration of ``pnp.tv_deblur`` (the paper's blur, 9x9 and σ 1.6) timed as the
library runs it and as it ran before session 20 (the reference below: the data prox recomputing
``F y`` and ``1 + tau |h|^2`` at every call, differences by ``diff`` and ``cat``, the dual ball's
norm as a sum of squares). Both end at the same iterate (printed: the largest difference). One
thread: the ratio, not the milliseconds, is the result.
"""

from __future__ import annotations

import argparse
import time

import torch

from stablenets.evaluation import pnp, tv


def _reference_gradient(x: torch.Tensor) -> torch.Tensor:
    def diff(z: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([torch.diff(z, dim=dim), torch.zeros_like(z.narrow(dim, 0, 1))], dim=dim)

    return torch.stack([diff(x, -2), diff(x, -1)], dim=-3)


def _reference_divergence(p: torch.Tensor) -> torch.Tensor:
    def adjoint(q: torch.Tensor, dim: int) -> torch.Tensor:
        zero = torch.zeros_like(q.narrow(dim, 0, 1))
        q = q.narrow(dim, 0, q.shape[dim] - 1)
        return torch.cat([q, zero], dim=dim) - torch.cat([zero, q], dim=dim)

    return adjoint(p[..., 0, :, :], -2) + adjoint(p[..., 1, :, :], -1)


def _reference_iteration(blur: pnp.CircularBlur, y: torch.Tensor, weight: float):
    h = blur._transfer_like(y)
    size = (blur.height, blur.width)

    def step(x: torch.Tensor, x_bar: torch.Tensor, p: torch.Tensor):
        p = p + _reference_gradient(x_bar) / tv.GRADIENT_NORM_SQ
        p = p / torch.clamp(p.pow(2).sum(dim=2, keepdim=True).sqrt() / weight, min=1.0)
        v = x + _reference_divergence(p)
        spectrum = (torch.fft.rfft2(v) + h.conj() * torch.fft.rfft2(y)) / (1.0 + h.abs().pow(2))
        x_new = torch.fft.irfft2(spectrum, s=size)
        return x_new, 2.0 * x_new - x, p

    return step


def _library_iteration(blur: pnp.CircularBlur, y: torch.Tensor, weight: float):
    prox = blur.data_prox(y, 1.0)

    def step(x: torch.Tensor, x_bar: torch.Tensor, p: torch.Tensor):
        p = tv.project_dual_ball(p + tv.gradient2d(x_bar) / tv.GRADIENT_NORM_SQ, weight)
        x_new = prox(x + tv.divergence2d(p))
        return x_new, 2.0 * x_new - x, p

    return step


def _run(step, y: torch.Tensor, iters: int) -> tuple[float, torch.Tensor]:
    x, x_bar, p = y.clone(), y.clone(), torch.zeros_like(tv.gradient2d(y))
    start = time.perf_counter()
    for _ in range(iters):
        x, x_bar, p = step(x, x_bar, p)
    return time.perf_counter() - start, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--weight", type=float, default=0.001)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    blur = pnp.GaussianBlur(9, 1.6, (321, 481))
    y = pnp.observe(torch.rand(args.images, 3, 321, 481), blur, 0.01, 0)
    per = 1e3 / (args.images * args.iters)
    ref_s, ref_x = _run(_reference_iteration(blur, y, args.weight), y, args.iters)
    lib_s, lib_x = _run(_library_iteration(blur, y, args.weight), y, args.iters)
    print(f"reference {ref_s * per:.1f} ms, library {lib_s * per:.1f} ms per image-iteration "
          f"(1 thread): {ref_s / lib_s:.2f}x faster; largest difference of the iterates "
          f"{float((ref_x - lib_x).abs().max()):.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
