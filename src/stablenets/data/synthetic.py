"""Offline stand-ins: a synthetic classification set (classes by hue and grating
orientation) and smoke photographs bundled with scikit-image, in the HDF5 layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stablenets.data.format import SPLITS, DataError, write_h5

# --------------------------------------------------------------------------------------------
# synthetic classification set
# --------------------------------------------------------------------------------------------

# Generator design (what makes a class), not run parameters. A class is a hue (one of
# ceil(K / 2)) combined with one of two grating orientation families. A grating's random
# phase averages to zero, so a pixel-space linear model sees only the colour (about half the
# classes); a small CNN also sees the orientation.
_SYN_ORIENTATIONS = 2
_SYN_HUE_JITTER = 0.4  # fraction of the hue spacing
_SYN_ANGLE_JITTER = 0.4  # fraction of the orientation spacing
_SYN_SATURATION = (0.45, 0.9)
_SYN_VALUE = (0.35, 0.75)
_SYN_GRADIENT = 0.35  # largest relative brightness ramp across the image
_SYN_CONTRAST = (0.02, 0.2)  # grating amplitude
_SYN_CYCLES = (2.0, 5.0)  # grating cycles per image width
_SYN_DISTRACTOR_P = 0.5  # chance of a random-colour disc
_SYN_DISTRACTOR_RADIUS = (0.1, 0.25)  # fraction of the image size
_SYN_CHUNK = 2048  # images generated at once, bounds memory


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) to RGB, shape (..., 3)."""
    from skimage.color import hsv2rgb

    return hsv2rgb(np.stack([h % 1.0, s, v], axis=-1))


def _synthetic_images(
    labels: np.ndarray, num_classes: int, size: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Render one chunk of synthetic images (N, 3, size, size) uint8 for ``labels``."""
    n = len(labels)
    n_hues = -(-num_classes // _SYN_ORIENTATIONS)
    hue_idx, orient_idx = labels % n_hues, labels // n_hues

    def u(lo: float, hi: float) -> np.ndarray:
        """One uniform draw per image, broadcastable over (H, W)."""
        return rng.uniform(lo, hi, n)[:, None, None]

    coords = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    hue = (hue_idx + rng.uniform(-_SYN_HUE_JITTER, _SYN_HUE_JITTER, n)) / n_hues
    colour = _hsv_to_rgb(hue, rng.uniform(*_SYN_SATURATION, n), rng.uniform(*_SYN_VALUE, n))
    ramp_dir = u(0, 2 * np.pi)
    ramp = 1 + u(-_SYN_GRADIENT, _SYN_GRADIENT) * 2 * (
        xx * np.cos(ramp_dir) + yy * np.sin(ramp_dir)
    )
    img = colour[:, :, None, None] * ramp[:, None]

    spacing = np.pi / _SYN_ORIENTATIONS
    theta = (orient_idx + rng.uniform(-_SYN_ANGLE_JITTER, _SYN_ANGLE_JITTER, n)) * spacing
    theta = theta[:, None, None]
    phase_arg = xx * np.cos(theta) + yy * np.sin(theta)
    grating = u(*_SYN_CONTRAST) * np.sin(2 * np.pi * u(*_SYN_CYCLES) * phase_arg + u(0, 2 * np.pi))
    img = img + grating[:, None]

    centre_y, centre_x = u(-0.5, 0.5), u(-0.5, 0.5)
    disc = (yy - centre_y) ** 2 + (xx - centre_x) ** 2 < u(*_SYN_DISTRACTOR_RADIUS) ** 2
    disc &= rng.random(n)[:, None, None] < _SYN_DISTRACTOR_P
    disc_colour = _hsv_to_rgb(rng.random(n), rng.uniform(*_SYN_SATURATION, n), rng.random(n))
    img = np.where(disc[:, None], disc_colour[:, :, None, None], img)

    img = img + noise * rng.standard_normal(img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _synthetic_split(
    n: int, num_classes: int, size: int, noise: float, seed: np.random.SeedSequence
) -> dict[str, np.ndarray]:
    """A balanced, shuffled split of ``n`` synthetic images."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    chunks = [
        _synthetic_images(labels[i : i + _SYN_CHUNK], num_classes, size, noise, rng)
        for i in range(0, n, _SYN_CHUNK)
    ]
    empty = np.zeros((0, 3, size, size), np.uint8)
    return {"images": np.concatenate(chunks) if chunks else empty, "labels": labels}


def make_synthetic_classification(
    out: Path,
    n_train: int,
    n_val: int,
    n_test: int,
    num_classes: int,
    image_size: int,
    noise: float,
    seed: int,
    *,
    extra_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write a CIFAR-like offline classification set: learnable, but not trivially.

    Each class is a hue combined with a grating orientation; brightness ramps, grating
    contrast/frequency/phase, a random-colour distractor disc and Gaussian pixel noise of
    standard deviation ``noise`` (in [0, 1] units) vary per image. Classes are balanced.
    Each split has its own seed stream, so changing one split's size leaves the others alone.
    """
    if num_classes < 2 or image_size < 1 or noise < 0 or min(n_train, n_val, n_test) < 0:
        raise DataError(
            f"invalid synthetic parameters: num_classes={num_classes}, "
            f"image_size={image_size}, noise={noise}, sizes={(n_train, n_val, n_test)}"
        )
    streams = np.random.SeedSequence(seed).spawn(len(SPLITS))
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
    splits = {
        name: _synthetic_split(sizes[name], num_classes, image_size, noise, stream)
        for name, stream in zip(SPLITS, streams, strict=True)
    }
    attrs = {
        "source": "synthetic",
        "task": "classification",
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "num_classes": num_classes,
        "image_size": image_size,
        "noise": float(noise),
        "seed": int(seed),
        "class_names": [f"class{k}" for k in range(num_classes)],
        **(extra_attrs or {}),
    }
    write_h5(Path(out), splits, attrs)


# --------------------------------------------------------------------------------------------
# smoke photographs from scikit-image
# --------------------------------------------------------------------------------------------


# RGB photographs bundled inside the scikit-image wheel (no network needed), mapped to their
# ``skimage.data`` loader. ``cat`` is the same photograph as ``chelsea`` and is left out so it
# cannot leak across splits; ``camera`` is grey and is replicated to RGB.
_PHOTOS = {
    "astronaut": "astronaut",
    "coffee": "coffee",
    "rocket": "rocket",
    "immunohistochemistry": "immunohistochemistry",
    "chelsea": "chelsea",
    "motorcycle": "stereo_motorcycle",  # returns (left, right, disparity): left is used
    "camera": "camera",
}
SMOKE_TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry")
SMOKE_TEST_PHOTOS = ("chelsea", "motorcycle")
# draws of one crop before its photo is declared black where crops are drawn (80 smoke sets of
# 8x8 and 16x24 crops, seeds 0-39, needed 3 at most)
_CROP_TRIES = 100


def _load_photo(name: str) -> np.ndarray:
    """A bundled photograph as uint8 (H, W, 3); grey ones are replicated to RGB."""
    if name not in _PHOTOS:
        raise DataError(f"unknown smoke photo {name!r}; choose from {sorted(_PHOTOS)}")
    from skimage import data

    loaded = getattr(data, _PHOTOS[name])()
    image = np.asarray(loaded[0] if isinstance(loaded, tuple) else loaded)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)


def _crops(
    photos: Sequence[np.ndarray],
    names: Sequence[str],
    rows: Sequence[tuple[int, int]],
    size: tuple[int, int],
    n: int,
    rng: np.random.Generator,
    scored: bool = False,
) -> dict[str, np.ndarray]:
    """``n`` random crops, cycling through the photos (named ``names``), none all black where
    ``scored`` (``_draw_crop``); ``rows[i]`` bounds photo i's rows."""
    th, tw = size
    images = np.zeros((n, 3, th, tw), np.uint8)
    origin = np.zeros((n, 3), np.int64)
    for i in range(n):
        k = i % len(photos)
        (lo, hi), width = rows[k], photos[k].shape[1]
        if hi - lo < th or width < tw:
            raise DataError(f"crop size {size} does not fit photo rows {lo}:{hi} x {width}")
        images[i], top, left = _draw_crop(photos[k], names[k], rows[k], size, rng, scored)
        origin[i] = (k, top, left)
    return {"images": images, "crop_origin": origin}


def _draw_crop(
    photo: np.ndarray,
    name: str,
    rows: tuple[int, int],
    size: tuple[int, int],
    rng: np.random.Generator,
    scored: bool,
) -> tuple[np.ndarray, int, int]:
    """A random crop (C, H, W) of ``size`` within ``rows`` of ``photo``, with its top and left.
    A ``scored`` crop (validation, test) is scored by a PSNR peaked at its maximum, so
    ``write_h5`` refuses a black one (astronaut's bottom rows hold a black area that small crops
    fell into for some seeds): a black draw is drawn again from the same ``rng``, up to
    ``_CROP_TRIES`` times; a seed that never drew black draws exactly what it drew before. A
    training crop is cut into patches, where a black one is harmless: drawn once, as before."""
    (lo, hi), (th, tw) = rows, size
    for _ in range(_CROP_TRIES if scored else 1):
        top = int(rng.integers(lo, hi - th + 1))
        left = int(rng.integers(0, photo.shape[1] - tw + 1))
        crop = photo[top : top + th, left : left + tw]
        if crop.max() > 0 or not scored:
            return crop.transpose(2, 0, 1), top, left
    raise DataError(
        f"smoke photo {name!r}: {_CROP_TRIES} random {th}x{tw} crops within its rows {lo}:{hi} "
        "were all black; choose another crop size or photo"
    )


def make_smoke_photos(
    out: Path,
    size: tuple[int, int],
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    *,
    train_photos: Sequence[str] = SMOKE_TRAIN_PHOTOS,
    test_photos: Sequence[str] = SMOKE_TEST_PHOTOS,
    val_rows_fraction: float = 0.25,
    extra_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write an offline denoising set of crops of ``size`` (H, W) from scikit-image photos.

    Train and validation crops come from ``train_photos`` (validation from the bottom
    ``val_rows_fraction`` of each photo's rows, train from the rest, so they never overlap);
    test crops come from the held-out ``test_photos``; no validation or test crop is all black
    (``_draw_crop``). ``crop_origin`` records (photo index within the split's list, top, left)
    of every crop.
    """
    if set(train_photos) & set(test_photos):
        raise DataError(f"train and test photos overlap: {set(train_photos) & set(test_photos)}")
    if not train_photos or not test_photos or not 0.0 < val_rows_fraction < 1.0:
        raise DataError("need train and test photos and 0 < val_rows_fraction < 1")
    size = (int(size[0]), int(size[1]))
    train_imgs = [_load_photo(name) for name in train_photos]
    test_imgs = [_load_photo(name) for name in test_photos]
    # Photos too small for a crop (the rehearsal's 321x481: the validation rows are a quarter
    # of a photo) are enlarged by one integer factor, repeating pixels; 1 at smoke sizes.
    share = min(val_rows_fraction, 1.0 - val_rows_fraction)
    need = [size[0] / (share * im.shape[0]) for im in train_imgs]
    need += [size[0] / im.shape[0] for im in test_imgs]
    need += [size[1] / im.shape[1] for im in train_imgs + test_imgs]
    factor = max(1, math.ceil(max(need)))
    if factor > 1:
        train_imgs = [im.repeat(factor, 0).repeat(factor, 1) for im in train_imgs]
        test_imgs = [im.repeat(factor, 0).repeat(factor, 1) for im in test_imgs]
    cuts = [img.shape[0] - int(round(val_rows_fraction * img.shape[0])) for img in train_imgs]
    rng_train, rng_val, rng_test = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(SPLITS))
    )
    val_rows = [(c, im.shape[0]) for c, im in zip(cuts, train_imgs, strict=True)]
    test_rows = [(0, im.shape[0]) for im in test_imgs]
    splits = {
        "train": _crops(train_imgs, train_photos, [(0, c) for c in cuts], size, n_train, rng_train),
        "val": _crops(train_imgs, train_photos, val_rows, size, n_val, rng_val, scored=True),
        "test": _crops(test_imgs, test_photos, test_rows, size, n_test, rng_test, scored=True),
    }
    attrs = {
        "source": "skimage",
        "task": "denoising",
        "photos": {
            "train": list(train_photos),
            "val": list(train_photos),
            "test": list(test_photos),
        },
        "size": list(size),
        "val_rows_fraction": float(val_rows_fraction),
        "upscale": factor,
        "seed": int(seed),
        **(extra_attrs or {}),
    }
    write_h5(Path(out), splits, attrs)
