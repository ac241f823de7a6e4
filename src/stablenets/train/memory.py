"""Peak memory of this process: what the training loop logs and a training job records."""

from __future__ import annotations

import resource

import torch

__all__ = ["peak_memory_mb"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, in MiB: allocated GPU memory on CUDA, the resident
    set's high-water mark (Python and torch included) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
