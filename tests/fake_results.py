"""Fake result files in the pipeline's schema, shared by test_figures.py and test_tables.py.

Each writer fills in what every result file of its kind has (names, paths, the fixed blur
settings, NaN for absent bounds) and takes the file's numbers from the caller.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stablenets.pipeline.runtime import write_results

STANDARD_EPS = np.array([36, 72, 108]) / 255
BLUR = {"eta": 1.0, "relax": 1.0, "noise": 0.01, "blur_size": 9, "blur_sigma": 1.6}


def write_h5(path: Path, attrs: dict, datasets: dict) -> Path:
    """An HDF5 result file written by the pipeline's own writer (None -> NaN, nested dataset
    names)."""
    write_results(path, attrs, datasets)
    return path


def write_classification(root: Path, variant: str, seed: int, attrs: dict, datasets: dict) -> Path:
    """``eval/classification/<variant>/seed<seed>.h5`` at the standard radii."""
    attrs = {"variant": variant, "seed": seed, **attrs}
    datasets = {"standard_eps": STANDARD_EPS, **datasets}
    return write_h5(root / f"eval/classification/{variant}/seed{seed}.h5", attrs, datasets)


def write_denoising(
    root: Path, variant: str, seed: int, sigma: float, attrs: dict, datasets: dict
) -> Path:
    """``eval/denoising/sigma<sigma>/`` ``tv.h5`` or ``<variant>/seed<seed>.h5``; no Lipschitz
    numbers for TV."""
    tv = variant == "tv"
    attrs = {
        "variant": variant,
        "sigma": sigma,
        "seed": seed,
        "lipschitz_bound": None if tv else 1.0,
        "empirical_lipschitz": None if tv else 0.9,
        **attrs,
    }
    name = "tv.h5" if tv else f"{variant}/seed{seed}.h5"
    return write_h5(root / f"eval/denoising/sigma{sigma:g}/{name}", attrs, datasets)


def write_pnp(root: Path, variant: str, seed: int, attrs: dict, datasets: dict) -> Path:
    """``pnp/`` ``tv.h5`` or ``sigma0.05/<variant>/seed<seed>.h5``; the fixed blur settings, no
    Lipschitz bound for TV."""
    tv = variant == "tv"
    attrs = {
        "method": "tv" if tv else "pnp",
        "variant": variant,
        "seed": seed,
        **BLUR,
        "lipschitz_bound": None if tv else 1.0,
        **attrs,
    }
    name = "tv.h5" if tv else f"sigma0.05/{variant}/seed{seed}.h5"
    return write_h5(root / "pnp" / name, attrs, datasets)
