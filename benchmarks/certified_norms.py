"""Certified convolution norms, old against new (issue 20), in one run.

    .venv/bin/python benchmarks/certified_norms.py                # every layer kind + models
    .venv/bin/python benchmarks/certified_norms.py --quick        # the small layer kinds only
    .venv/bin/python benchmarks/certified_norms.py --threads 2    # default 1 (see below)

For each layer kind of the paper's models (default initialisation, seeded): the old certificate
(the exact norm of the circular convolution on the grid ``n + d (k - 1)``, every DFT frequency,
plus the dense Cholesky refinement up to 1024 inputs; re-implemented here as it was before issue
20), the new one (``Conv2dOperator.norm_bound``: the torus bound, the circulant bound on small
grids, the dense bound up to 4096 inputs), a converged power iteration (a lower bound of the
norm: warm-started from the symbol's peak, then iterated until it moves by less than 1e-10, on the
whole grid), the gaps of both bounds above it and the time of each. Then ``build_model`` with its
defaults for every model name, and ``lipschitz_bound()`` of the paper's denoiser (321x481).

One thread by default: on a shared 2-core machine, two threads make batched eigen-solves of small
matrices wait on each other (the new code pins them to one thread; the old one did not).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch.nn import functional as F

from stablenets.nn import operators
from stablenets.nn.families import AOLConv
from stablenets.nn.models import MODELS, build_model
from stablenets.nn.operators import Conv2dOperator

_OLD_CHUNK_ELEMENTS = 1 << 22
_OLD_DENSE_MAX_DIM = 1024
_OLD_DENSE_POWER_ITERS = 300
_OLD_DENSE_MARGINS = (1e-4, 1e-3, 1e-2)


@torch.no_grad()
def old_certificate(op: Conv2dOperator, w: torch.Tensor, n: tuple[int, int]) -> float:
    """The certificate before issue 20, for the float64 kernel ``w`` on an ``n`` grid."""
    grid = [ni + d * (k - 1) for ni, d, k in zip(n, op.dilation, op.kernel_size, strict=True)]
    phases = [
        torch.exp(
            -2j
            * math.pi
            * torch.outer(torch.arange(count, dtype=torch.float64), d * torch.arange(k))
            / big
        )
        for count, big, d, k in zip(
            (grid[0], grid[1] // 2 + 1), grid, op.dilation, op.kernel_size, strict=True
        )
    ]
    wc = w.to(torch.complex128)
    c_out, c_in = w.shape[:2]
    rows = max(1, _OLD_CHUNK_ELEMENTS // (phases[1].shape[0] * c_out * c_in))
    top = torch.zeros((), dtype=torch.float64)
    for start in range(0, grid[0], rows):
        symbol = torch.einsum("fa,gb,oiab->fgoi", phases[0][start : start + rows], phases[1], wc)
        gram = symbol.mH @ symbol if c_out >= c_in else symbol @ symbol.mH
        top = torch.maximum(top, torch.linalg.eigvalsh(gram)[..., -1].max())
    bound = float(top.clamp_min(0.0).sqrt())
    dim = op.in_channels * n[0] * n[1]
    if dim > _OLD_DENSE_MAX_DIM:
        return bound
    basis = torch.eye(dim, dtype=torch.float64).view(dim, -1, *n)
    at = F.conv2d(basis, w, None, op.stride, op.padding, op.dilation).reshape(dim, -1)
    gram = at @ at.T
    v = torch.ones(dim, dtype=torch.float64)
    for _ in range(_OLD_DENSE_POWER_ITERS):
        v = gram @ v
        v = v / v.norm()
    s = float((v @ gram @ v).clamp_min(0).sqrt())
    eye = torch.eye(dim, dtype=torch.float64)
    for margin in _OLD_DENSE_MARGINS:
        candidate = s * (1 + margin)
        if candidate >= bound:
            break
        if int(torch.linalg.cholesky_ex(candidate**2 * eye - gram).info) == 0:
            return candidate
    return bound


def converged_lower_bound(op: Conv2dOperator, max_iters: int, chunk: int = 20) -> float:
    """Power iteration on the whole grid, warm-started from the plane wave at the symbol's peak,
    until an iteration chunk moves the estimate by less than 1e-10 (relative) or ``max_iters``.
    Every value is a Rayleigh quotient computed in float64: a lower bound of the norm."""
    saved = operators.WARM_GRID
    operators.WARM_GRID = max(op.u.shape[-2:])  # warm start on the whole grid
    try:
        estimate = float(op.warm_start(chunk))
    finally:
        operators.WARM_GRID = saved
    done = chunk
    while done < max_iters:
        new = float(op.power_iteration(chunk))
        done += chunk
        if new - estimate <= 1e-10 * new:
            return max(new, estimate)
        estimate = new
    return estimate


def _conv(c_in, c_out, k, size, seed, cls=Conv2dOperator, **kw) -> Conv2dOperator:
    g = torch.Generator().manual_seed(seed)
    return cls(c_in, c_out, k, size, generator=g, **kw)


def layer_kinds(quick: bool) -> list[tuple[str, Conv2dOperator, int]]:
    """(name, operator, power-iteration cap); float32 for the 321x481 one (its iterations), the
    Rayleigh quotients are float64 either way."""
    kinds = [
        ("classifier lift 1x1 3->16 @32x32", _conv(3, 16, 1, 32, 1), 200),
        ("classifier block 3x3 16ch pad1 @32x32", _conv(16, 16, 3, 32, 2, padding=1), 3000),
        ("classifier block 3x3 32ch pad1 @16x16", _conv(32, 32, 3, 16, 3, padding=1), 3000),
        ("classifier block 3x3 64ch pad1 @8x8", _conv(64, 64, 3, 8, 4, padding=1), 3000),
        ("classifier transition 1x1 64->128 @8x8", _conv(64, 128, 1, 8, 5), 200),
        (
            "strided 3x3 16->32 stride2 pad1 @32x32",
            _conv(16, 32, 3, 32, 6, padding=1, stride=2),
            3000,
        ),
        ("AOL-rescaled 3x3 16ch pad1 @32x32", _conv(16, 16, 3, 32, 7, AOLConv, padding=1), 3000),
        ("AOL-rescaled 3x3 64ch pad1 @8x8", _conv(64, 64, 3, 8, 8, AOLConv, padding=1), 3000),
    ]
    kinds = [(name, op.double(), cap) for name, op, cap in kinds]
    if not quick:
        kinds += [
            ("DnCNN first 3x3 3->64 pad1 @321x481", _conv(3, 64, 3, (321, 481), 9, padding=1), 200),
            (
                "denoiser block 3x3 64ch pad1 @321x481",
                _conv(64, 64, 3, (321, 481), 10, padding=1),
                200,
            ),
        ]
    return kinds


def certificate_rows(quick: bool) -> None:
    print(
        f"{'layer kind':42s} {'old bound':>10s} {'new bound':>10s} {'power it.':>10s} "
        f"{'old gap':>9s} {'new gap':>9s} {'old s':>8s} {'new s':>8s}"
    )
    for name, op, cap in layer_kinds(quick):
        n = op.input_size
        w = op._certificate_weight()
        start = time.perf_counter()
        old = old_certificate(op, w, n) * (1 + operators.CERTIFICATE_SLACK)
        if isinstance(op, AOLConv):
            old = min(1.0, old)
        t_old = time.perf_counter() - start
        start = time.perf_counter()
        new = op.norm_bound(n)
        t_new = time.perf_counter() - start
        lower = converged_lower_bound(op, cap)
        assert new >= lower and old >= lower, (name, old, new, lower)
        print(
            f"{name:42s} {old:10.6f} {new:10.6f} {lower:10.6f} {old / lower - 1:9.4%} "
            f"{new / lower - 1:9.4%} {t_old:8.2f} {t_new:8.2f}",
            flush=True,
        )


def model_rows() -> None:
    build_model("resnet_classifier")  # import and first-call costs out of the timings
    for name in MODELS:
        start = time.perf_counter()
        model = build_model(name)
        print(f"build_model({name!r}): {time.perf_counter() - start:.2f} s", flush=True)
        if name == "nonexpansive_denoiser":
            start = time.perf_counter()
            bound = model.lipschitz_bound()
            took = time.perf_counter() - start
            print(f"  lipschitz_bound() at 321x481: {bound:.6g} in {took:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small layer kinds, no models")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    certificate_rows(args.quick)
    if not args.quick:
        model_rows()


if __name__ == "__main__":
    main()
