"""Training helpers: augmentation is batched and seeded. (Kill and resume, signals, foreign
checkpoints and divergence are in test_reliability.py.)"""

from __future__ import annotations

import torch

from stablenets.augment import AugmentConfig, augment


def test_augmentation_is_seeded_batched_and_shape_preserving():
    x = torch.rand(32, 3, 32, 32)
    cfg = AugmentConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(1))
    b = augment(x, cfg, torch.Generator().manual_seed(1))
    c = augment(x, cfg, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    only_erase = augment(x, AugmentConfig(crop_padding=0, flip=False), torch.Generator())
    erased = (only_erase == 0).flatten(1).float().mean(1)
    assert 0.3 < (erased > 0.02).float().mean() < 0.95  # about half the images have a hole
    shifted = augment(x, AugmentConfig(flip=False, erase_p=0.0), torch.Generator().manual_seed(0))
    assert not torch.equal(shifted, x)  # cropping moved at least one image
