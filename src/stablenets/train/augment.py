"""Batched data augmentation on the device (the paper's CIFAR-10 recipe).

Random erasing, then random crop with zero padding and horizontal flip (the authors' scripts'
order), drawn per sample from one ``torch.Generator`` so that a training step's batch depends
only on ``(seed, step)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["AugmentConfig", "augment"]


@dataclass(frozen=True)
class AugmentConfig:
    """``crop_padding`` pixels of zero padding before a random crop; ``flip`` horizontal flips;
    random erasing with probability ``erase_p`` of a rectangle whose area fraction is uniform in
    ``erase_scale`` and whose aspect ratio is log-uniform in ``erase_ratio`` (filled with 0)."""

    crop_padding: int = 2
    flip: bool = True
    erase_p: float = 0.5
    erase_scale: tuple[float, float] = (0.05, 0.2)
    erase_ratio: tuple[float, float] = (0.3, 3.3)


def _uniform(
    n: int, lo: float, hi: float, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the original size from the zero-padded batch."""
    if padding == 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    xp = torch.gather(xp, 2, rows.expand(n, c, h, w + 2 * padding))
    return torch.gather(xp, 3, cols.expand(n, c, h, w))


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_erase(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Zero one random rectangle per selected sample (torchvision's RandomErasing, batched)."""
    n, _, h, w = x.shape
    dev = x.device
    area = _uniform(n, *cfg.erase_scale, g, dev) * h * w
    log_r = _uniform(n, math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1]), g, dev)
    eh = torch.sqrt(area * torch.exp(log_r)).round().clamp(1, h)
    ew = torch.sqrt(area / torch.exp(log_r)).round().clamp(1, w)
    top = (torch.rand(n, generator=g, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=g, device=dev) * (w - ew + 1)).floor()
    chosen = torch.rand(n, generator=g, device=dev) < cfg.erase_p
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    inside = (
        (ys >= top[:, None, None])
        & (ys < (top + eh)[:, None, None])
        & (xs >= left[:, None, None])
        & (xs < (left + ew)[:, None, None])
        & chosen[:, None, None]
    )
    return x.masked_fill(inside[:, None], 0.0)


def augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Erase, then crop and flip, as the scripts' transforms; all batched on ``x``'s device."""
    if cfg.erase_p > 0:
        x = random_erase(x, cfg, g)
    x = random_crop(x, cfg.crop_padding, g)
    if cfg.flip:
        x = random_flip(x, g)
    return x
