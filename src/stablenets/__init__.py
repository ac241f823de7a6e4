"""stablenets: exact non-expansive and averaged networks (Sherry et al., Physica D 2024).

The public API: ``build_model``, ``load_model``, ``save_model`` and the subpackages, one per
layer (lowest first; a layer imports only those below it):

* :mod:`stablenets.nn`: operators, activations, integrators, blocks, families, models, losses;
* :mod:`stablenets.evaluation`: robustness (certificates, attacks, the radius sweep), metrics,
  total variation, Plug-and-Play;
* :mod:`stablenets.data`: downloads, safe extraction, the HDF5 layout, the datasets;
* :mod:`stablenets.train`: the training loop, CUDA graphs, augmentation, budgets;
* :mod:`stablenets.pipeline`: what the Snakemake rules call (config, job specs, entry points,
  reports);
* :mod:`stablenets.bench`: benchmarks against a plain reference, and the rehearsal's cost.

``nn``, ``evaluation`` and ``train`` need torch and numpy only; ``data``, ``pipeline`` and
``bench`` need the ``pipeline`` extra. Everything is imported on first use, so that
``python -m stablenets table|figure|summary`` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the type checker; imported lazily by __getattr__
    from stablenets.nn.models import build_model, load_model, save_model

__all__ = ["build_model", "load_model", "save_model"]
__version__ = "0.1.0"

SUBPACKAGES = ("nn", "evaluation", "data", "train", "pipeline", "bench")


def __getattr__(name: str) -> Any:
    """The model functions of :mod:`stablenets.nn.models` and the subpackages, on first use."""
    if name in __all__:
        from stablenets.nn import models

        return getattr(models, name)
    if name in SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'stablenets' has no attribute {name!r}")
