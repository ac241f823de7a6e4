"""The layers: exact non-expansive (1-Lipschitz) and averaged networks, torch and numpy only.

Lowest layer of the package; it imports nothing from the rest of stablenets but the
standard-library :mod:`stablenets.atomic` writer.

* :mod:`~stablenets.nn.operators`: convolutions and dense maps with certified spectral norms.
* :mod:`~stablenets.nn.activations`: monotone 1-Lipschitz activations.
* :mod:`~stablenets.nn.integrators`: explicit Runge-Kutta integrators of the gradient flow and
  their step-size thresholds.
* :mod:`~stablenets.nn.blocks`: non-expansive and averaged blocks built from them.
* :mod:`~stablenets.nn.families`: the 1-Lipschitz layer families compared in the paper.
* :mod:`~stablenets.nn.models`: the classifiers and denoisers, one registry, checkpoints.
* :mod:`~stablenets.nn.losses`: the margin loss.
"""

from stablenets.nn.models import (
    CLASSIFIERS,
    DENOISERS,
    MODELS,
    CheckpointError,
    Classifier,
    DnCNN,
    NonexpansiveDenoiser,
    StableModel,
    build_model,
    load_model,
    save_model,
)

__all__ = [
    "CLASSIFIERS",
    "DENOISERS",
    "MODELS",
    "CheckpointError",
    "Classifier",
    "DnCNN",
    "NonexpansiveDenoiser",
    "StableModel",
    "build_model",
    "load_model",
    "save_model",
]
