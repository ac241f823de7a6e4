"""The noise level as the pipeline's paths spell it (``.../sigma0.15/...``): written by the job
specifications, matched by the rules' ``sigma`` wildcard, read back by the tables and figures.
Only the standard library: every pipeline module may import this one."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["SIGMA_LABEL", "sigma_label", "sigma_in_path"]

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
