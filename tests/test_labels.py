"""The noise level as the pipeline's paths spell it (``stablenets.pipeline.labels``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stablenets.pipeline.labels import SIGMA_LABEL, sigma_in_path, sigma_label


@pytest.mark.parametrize("sigma", [0.15, 0.05, 1.0, 25.0, 5.0e-5, 1.0e-12, 1.0e6, 0.123456789])
def test_every_noise_levels_label_matches_the_rules_wildcard_and_reads_back(sigma):
    """A label the ``sigma`` wildcard missed (``5e-05`` did) failed the DAG: its jobs' outputs
    matched no rule."""
    label = sigma_label(sigma)
    assert re.fullmatch(SIGMA_LABEL, label), label
    path = Path("results/paper/pnp") / f"sigma{label}" / "averaged" / "seed0.h5"
    assert sigma_in_path(path) == label and float(label) == pytest.approx(sigma, rel=1e-5)


def test_a_path_without_a_noise_level_folder_has_none():
    assert sigma_in_path(Path("results/paper/pnp/tv/seed0.h5")) is None
    assert sigma_in_path(Path("sigma0.15")) is None  # the file itself is not its folder
