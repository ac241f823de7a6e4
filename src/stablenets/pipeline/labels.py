"""The noise level as the pipeline's paths spell it (``.../sigma0.15/...``): written by the job
specifications, matched by the rules' ``sigma`` wildcard, read back by the tables and figures;
and a radius as the tables' columns spell it (``certified@36/255``). Only the standard library:
every pipeline module may import this one (the config's checks refuse values whose labels
collide)."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["RADIUS_DENOMINATOR", "SIGMA_LABEL", "radius_label", "sigma_in_path", "sigma_label"]

#: What ``sigma_label`` writes (``0.15``, ``5e-05``, ``1e+06``): the rules' ``sigma`` wildcard.
SIGMA_LABEL = r"[0-9.]+(?:e[-+][0-9]+)?"


def sigma_label(sigma: float) -> str:
    """Noise level as it appears in paths (``0.15`` -> ``"0.15"``)."""
    return f"{sigma:g}"


def sigma_in_path(path: Path) -> str | None:
    """The label of the ``sigma<label>`` folder nearest the file ``path``, None when none."""
    for part in reversed(path.parts[:-1]):
        if re.fullmatch(rf"sigma{SIGMA_LABEL}", part):
            return part.removeprefix("sigma")
    return None


RADIUS_DENOMINATOR = 255  # radii are labelled as multiples of 1/255 when they are


def radius_label(eps: float) -> str:
    """``36/255`` for radii on the 1/255 grid, else a decimal of 6 significant digits."""
    k = eps * RADIUS_DENOMINATOR
    if abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{round(k)}/{RADIUS_DENOMINATOR}"
    return f"{eps:.6g}"
