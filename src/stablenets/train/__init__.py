"""Training: the loop, its tasks and checkpoints, CUDA graphs, augmentation and time budgets.

torch and numpy only; imports :mod:`stablenets.nn` and the metrics of
:mod:`stablenets.evaluation`, never the pipeline.

* :mod:`~stablenets.train.loop`: :func:`train` (resumable, checkpointed, with progress lines),
  the classification and denoising tasks and the divergence guards.
* :mod:`~stablenets.train.cuda_graphs`: one captured CUDA graph per substep count.
* :mod:`~stablenets.train.augment`: the data augmentation of the classifiers.
* :mod:`~stablenets.train.budget`: step counts from a time budget.
* :mod:`~stablenets.train.memory`: peak memory of the process.
"""

from stablenets.train.loop import (
    ClassificationTask,
    DenoisingTask,
    DivergenceError,
    SubstepLimitError,
    TrainConfig,
    train,
)

__all__ = [
    "ClassificationTask",
    "DenoisingTask",
    "DivergenceError",
    "SubstepLimitError",
    "TrainConfig",
    "train",
]
