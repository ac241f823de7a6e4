"""Denoising metrics and fixed-seed noise.

Conventions: images are tensors of shape ``(N, C, H, W)``; every function works on the device
and dtype of its inputs and is deterministic.

* PSNR (per image ``n``): ``PSNR_n = 10 log10(peak_n^2 / MSE_n)``, with
  ``MSE_n = mean((x_n - ref_n)^2)`` and ``peak_n = max(ref_n)`` (the paper's definition) or a fixed
  number (``1.0`` gives the usual PSNR of images in [0, 1]).
* Fixed noise: ``y_n = x_n + sigma * z_n`` with ``z_n ~ N(0, I)`` drawn from a generator seeded
  by ``(seed, index_n)``, so that every model sees the same noisy images and any subset of the
  images receives the same noise as in the full set. The noise is not clipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Metrics and noise
# --------------------------------------------------------------------------------------------


def per_image(v: Tensor, like: Tensor) -> Tensor:
    """An ``(N,)`` vector (a value or mask per image) shaped to broadcast over ``like`` of shape
    ``(N, ...)``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def psnr(x: Tensor, ref: Tensor, peak: str | float = "max") -> Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(peak^2 / MSE)``, in dB.

    ``x`` and ``ref`` have shape ``(N, ...)``; the result has shape ``(N,)``. ``peak="max"`` uses
    the paper's per-image peak ``max(ref_n)`` (so ``peak^2 = max(ref_n)^2``); a number uses that
    fixed peak (``1.0`` for images in [0, 1]). An exact match gives ``+inf``.
    """
    if x.shape != ref.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(x.shape)} vs {tuple(ref.shape)}")
    diff = (x - ref).flatten(1)
    mse = diff.pow(2).mean(dim=1)
    if isinstance(peak, str):
        if peak != "max":
            raise ValueError(f"psnr: peak must be 'max' or a number, got {peak!r}")
        peak_sq = ref.flatten(1).amax(dim=1).pow(2)
    else:
        peak_sq = torch.full_like(mse, float(peak) ** 2)
    return 10.0 * torch.log10(peak_sq / mse)


def noise_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator seeded by ``(seed, index)``, mixed by ``numpy.random.SeedSequence``."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got ({seed}, {index})")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)
    return torch.Generator(device="cpu").manual_seed(int(state[0]))


def _as_indices(n: int, indices: Sequence[int] | Tensor | None) -> list[int]:
    """Dataset indices of a batch of ``n`` images (``0..n-1`` by default)."""
    if indices is None:
        return list(range(n))
    out = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
    if len(out) != n:
        raise ValueError(f"got {len(out)} indices for a batch of {n} images")
    return out


def fixed_noise(
    images: Tensor,
    sigma: float,
    seed: int,
    indices: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Return ``images + sigma * z`` with reproducible, unclipped Gaussian noise ``z``.

    Image ``n`` of the batch gets noise from :func:`noise_generator` ``(seed, indices[n])``
    (``indices`` defaults to ``0..N-1``: pass the dataset indices of a subset to reproduce the
    noise of the full set). The noise is drawn in float64 on the CPU, then cast to the dtype and
    device of ``images``, so it does not depend on the device.
    """
    noise = torch.empty(images.shape, dtype=torch.float64)
    for n, index in enumerate(_as_indices(images.shape[0], indices)):
        noise[n] = torch.randn(
            images.shape[1:], generator=noise_generator(seed, index), dtype=torch.float64
        )
    return images + sigma * noise.to(device=images.device, dtype=images.dtype)
