"""The two training tasks: what a step draws (batch, augmentation, noise) and how a model is
validated.

A step's batch (:func:`step_batch`) holds its slice of an epoch's permutation (:func:`epoch_batch`,
seeded by ``(seed, epoch)``), augmented or noised from :func:`step_generator`, seeded by
``(seed, step)``: a run resumed from a checkpoint draws exactly what the uninterrupted run would
have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from stablenets.evaluation.metrics import fixed_noise, psnr
from stablenets.nn.models import (
    StableModel,
)
from stablenets.train.augment import AugmentConfig, augment

# the streams a run draws from, apart: a step's augmentation or noise, an epoch's permutation
_STEP_STREAM, _EPOCH_STREAM = 0, 1


def _stream_seed(seed: int, index: int, stream: int) -> int:
    """A 64-bit seed mixed from ``(seed, index, stream)`` by ``numpy.random.SeedSequence``: two
    triples share one only by a hash collision (``seed * K + index`` gave seed s at step K what
    seed s + 1 drew at step 0, and seed 0's step 0 the stream that initialised the weights)."""
    mixed = np.random.SeedSequence([int(seed), int(index), stream]).generate_state(1, np.uint64)
    return int(mixed[0])


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of one training step: depends only on ``(seed, step)``."""
    return torch.Generator(device=device).manual_seed(_stream_seed(seed, step, _STEP_STREAM))


@lru_cache(maxsize=2)
def _permutation(size: int, seed: int, epoch: int, device: str) -> torch.Tensor:
    """Drawn on the CPU (the same on every device), copied to ``device`` once per epoch: a
    per-step host-to-device copy of the indices would wait for the queued GPU work."""
    g = torch.Generator().manual_seed(_stream_seed(seed, epoch, _EPOCH_STREAM))
    return torch.randperm(size, generator=g).to(device)


def epoch_batch(
    size: int, batch: int, seed: int, step: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Indices of training step ``step``'s images: epochs of a shuffled training set, as the
    authors' scripts draw them (``DataLoader(shuffle=True)``), each image at most once per epoch.
    An epoch holds ``size // batch`` steps: the last ``size % batch`` images of its permutation
    are left out, where the scripts' last batch is smaller (every batch has ``batch`` images, one
    shape for CUDA graphs). The same batches on every device; returned on ``device``."""
    steps = size // batch
    if steps == 0:
        raise ValueError(f"batch_size {batch} is larger than the training set ({size} images)")
    epoch, position = divmod(step, steps)
    order = _permutation(size, seed, epoch, str(torch.device(device)))
    return order[position * batch : (position + 1) * batch].clone()  # the cache stays intact


@dataclass
class ClassificationTask:
    """Cross-entropy on augmented batches; validation accuracy selects the best checkpoint."""

    images: torch.Tensor
    labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval_batch: int = 500
    metric_name: str = "accuracy"

    def steps_per_epoch(self, batch_size: int) -> float:
        """Training steps that draw as many images as the training set holds."""
        return len(self.images) / batch_size

    def batch(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The images ``idx`` (``epoch_batch``, on the images' device), augmented from ``g``."""
        return augment(self.images[idx], self.augment, g), self.labels[idx]

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target)

    def metric(self, out: torch.Tensor, target: torch.Tensor) -> float:
        return float((out.argmax(1) == target).float().mean())

    @torch.no_grad()
    def validate(self, model: StableModel) -> float:
        correct = 0
        for i in range(0, len(self.val_images), self.eval_batch):
            out = model(self.val_images[i : i + self.eval_batch])
            correct += int((out.argmax(1) == self.val_labels[i : i + self.eval_batch]).sum())
        return correct / len(self.val_images)


@dataclass
class DenoisingTask:
    """MSE between the denoised and clean images under Gaussian noise ``sigma`` (not clipped)."""

    images: torch.Tensor
    val_images: torch.Tensor
    sigma: float
    noise_seed: int = 0
    patch: tuple[int, int] | None = None
    eval_batch: int = 5
    metric_name: str = "psnr"

    def steps_per_epoch(self, batch_size: int) -> float:
        """Training steps that draw as many images as the training set holds."""
        return len(self.images) / batch_size

    def batch(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The images ``idx`` (``epoch_batch``, on the images' device), a patch of them and their
        noise from ``g``."""
        clean = self.images[idx]
        if self.patch is not None:
            clean = _random_patch(clean, self.patch, g)
        noise = torch.randn(clean.shape, generator=g, device=clean.device)
        return clean + self.sigma * noise, clean

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, target)

    def metric(self, out: torch.Tensor, target: torch.Tensor) -> float:
        """Mean PSNR of the batch with the paper's per-image peak, as ``validate``: the two are
        drawn on one axis (a peak of 1 put about 1.5 dB between them on BSDS500 alone)."""
        return float(psnr(out.detach(), target).mean())

    @torch.no_grad()
    def validate(self, model: StableModel) -> float:
        noisy = fixed_noise(self.val_images, self.sigma, self.noise_seed)
        scores = [
            psnr(model(noisy[i : i + self.eval_batch]), self.val_images[i : i + self.eval_batch])
            for i in range(0, len(noisy), self.eval_batch)
        ]
        return float(torch.cat(scores).mean())


def _random_patch(x: torch.Tensor, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """One random patch of ``size`` per batch (same offset for the batch: cheap and unbiased)."""
    h, w = x.shape[-2:]
    if size[0] > h or size[1] > w:
        raise ValueError(f"patch {list(size)} is larger than the images ({h} x {w})")
    top = int(torch.randint(0, h - size[0] + 1, (1,), generator=g, device=x.device))
    left = int(torch.randint(0, w - size[1] + 1, (1,), generator=g, device=x.device))
    return x[..., top : top + size[0], left : left + size[1]]


Task = ClassificationTask | DenoisingTask


def step_batch(
    task: Task, batch_size: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of training step ``step`` of a run seeded ``seed``: its slice of the
    epoch's permutation (:func:`epoch_batch`), augmented or noised from its own generator
    (:func:`step_generator`), on the images' device. The loop and the training benchmark both
    draw here, so the benchmark times the batches the runs train on."""
    device = task.images.device
    idx = epoch_batch(len(task.images), batch_size, seed, step, device)
    return task.batch(idx, step_generator(seed, step, device))
