"""Training: the loop, its tasks and checkpoints, CUDA graphs, augmentation and time budgets.

torch and numpy only; imports :mod:`stablenets.nn` and the metrics of
:mod:`stablenets.evaluation`, never the pipeline.

* :mod:`~stablenets.train.loop`: :func:`train` (one-cycle SGD, validation, progress lines with
  an ETA) and its guards against divergence and runaway sub-steps.
* :mod:`~stablenets.train.tasks`: the classification and denoising tasks (what a step draws:
  its slice of a seeded epoch permutation, augmentation and noise seeded by the step; how a model
  is validated).
* :mod:`~stablenets.train.checkpoints`: resumable checkpoints, tied to the configuration's hash.
* :mod:`~stablenets.train.cuda_graphs`: one captured CUDA graph per tuple of sub-step counts.
* :mod:`~stablenets.train.augment`: the data augmentation of the classifiers.
* :mod:`~stablenets.train.budget`: step counts from a time budget.
* :mod:`~stablenets.train.memory`: peak and free memory, out-of-memory errors, and the
  activation cost behind ``max_substeps: auto``.
"""

from stablenets.train.loop import DivergenceError, SubstepLimitError, TrainConfig, train
from stablenets.train.tasks import ClassificationTask, DenoisingTask

__all__ = [
    "ClassificationTask",
    "DenoisingTask",
    "DivergenceError",
    "SubstepLimitError",
    "TrainConfig",
    "train",
]
