"""Peak memory of this process (what the training loop logs and a training job records), and
what running out of it looks like."""

from __future__ import annotations

import resource

import torch

__all__ = ["peak_memory_mb", "is_out_of_memory"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, in MiB: allocated GPU memory on CUDA, the resident
    set's high-water mark (Python and torch included) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: ``torch.OutOfMemoryError`` (CUDA), the CPU
    allocator's ``RuntimeError`` ("can't allocate memory") or Python's ``MemoryError``."""
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
