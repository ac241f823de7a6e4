"""Which benchmark row times a configured variant: the models the training benchmark runs, the
options of a variant's training step, and the lookup of its row. Shared by the training
projection (``training.project_hours``) and the rehearsal's cost (``cost.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from stablenets.nn.integrators import INTEGRATORS
from stablenets.nn.models import Classifier, model_block, model_defaults

__all__ = [
    "MODEL_SPECS",
    "BENCH_NAME",
    "STAGES",
    "classifier_width",
    "variant_width",
    "variant_options",
    "bench_key",
    "substep_theta",
]

# name -> (model, kwargs, task, paper batch, paper size, baseline implementation, warm-up fraction)
_FAMILY = dict(task="classification", batch=128, size=(32, 32), warmup=0.5, kwargs={})
MODEL_SPECS: dict[str, dict] = {
    "classifier": dict(
        model="nonexpansive_classifier", kwargs={"integrator": "euler"}, task="classification",
        batch=128, size=(32, 32), baseline="reference", warmup=0.5,
    ),
    "resnet": dict(
        model="resnet_classifier", kwargs={}, task="classification",
        batch=128, size=(32, 32), baseline=None, warmup=0.2,
    ),
    "denoiser": dict(
        model="nonexpansive_denoiser", kwargs={"integrator": "euler", "power_size": [64, 64]},
        task="denoising", batch=5, size=(321, 481), baseline="reference", warmup=0.5,
    ),
    "dncnn": dict(
        model="dncnn", kwargs={}, task="denoising",
        batch=5, size=(321, 481), baseline=None, warmup=0.5,
    ),
    "cpl": dict(_FAMILY, model="cpl_classifier", baseline="plain"),
    "sll": dict(_FAMILY, model="sll_classifier", baseline=None),
    "aol": dict(_FAMILY, model="aol_classifier", baseline=None),
    "orthogonal": dict(_FAMILY, model="orthogonal_classifier", baseline=None),
}  # fmt: skip
# model name (``build_model``'s) -> the benchmark's name for it
BENCH_NAME = {spec["model"]: name for name, spec in MODEL_SPECS.items()}

# Stages of each integrator's Butcher tableau: evaluations of a block's field per sub-step.
STAGES = {name: tableau.stages for name, tableau in INTEGRATORS.items()}


def classifier_width(kwargs: Mapping[str, Any]) -> int:
    """A classifier's base width: its ``kwargs``'s, else the skeleton's default."""
    default = inspect.signature(Classifier).parameters["base_width"].default
    return int(kwargs.get("base_width", default))


def variant_width(task: str, variant: dict, cfg: dict) -> int | str:
    """Base width of a classification variant (its size preset, kwargs or the default), ''
    for a denoiser."""
    if task != "classification":
        return ""
    if "size" in variant:
        return int(cfg["classification"]["sizes"][variant["size"]])
    return classifier_width(variant.get("kwargs", {}))


def variant_options(train: dict, graphs: bool = True) -> str:
    """The ``options`` of the benchmark rows that time a variant's configured training step:
    its speed settings, and CUDA graphs when it sets them and ``graphs``."""
    opts = [k for k in ("amp", "channels_last", "cudnn_benchmark") if train.get(k)]
    if train.get("cuda_graphs") and graphs:
        opts.append("cuda_graphs replayed")
    if train.get("remat", "auto") != "auto":
        opts.append(f"remat {'on' if train['remat'] else 'off'}")
    return " ".join(opts)


def substep_theta(variant: Mapping[str, Any]) -> float | None:
    """``theta`` of a variant whose blocks take adaptive sub-steps (the paper's non-expansive
    block; its kwargs', else its model's default), ``None`` for other blocks (CPL: one step
    whatever theta; the ResNet, SLL, AOL, ...: none). At the same norms such a block takes
    about ``1 / theta`` times the sub-steps of a ``theta = 1`` one: ``n = ceil(T L ||A||^2 /
    (2 r theta))``, where the default ``T`` does not depend on theta."""
    kwargs = variant.get("kwargs", {})
    if model_block(variant["model"], kwargs) != "nonexpansive":
        return None
    return float(kwargs.get("theta", model_defaults(variant["model"])["theta"]))


def bench_key(
    rows: Mapping[tuple, Any], model: str | None, width: int | str, train: dict
) -> tuple[tuple, bool]:
    """The key ``(model, width, options)`` of the benchmark row that times a variant's
    configured step (``variant_options``; its ``remat off`` row where ``remat`` and
    ``max_substeps`` are ``auto``, which run a pass unchecked while it fits), and whether it is
    the eager row standing in for a missing graphed one (an upper bound: graphs only save time;
    the orthogonal family's capture fails, so it runs eagerly)."""
    key = (model, width, variant_options(train))
    eager = (model, width, variant_options(train, graphs=False))
    if train.get("remat", "auto") == "auto" and train.get("max_substeps", "auto") == "auto":
        # remat auto under a memory limit checkpoints only a pass that would not fit unchecked:
        # at the benchmark's sub-step counts every paper model's fits (the denoiser: 8.5 GB)
        for options, eager_only in ((key[2], False), (eager[2], True)):
            unchecked = (model, width, " ".join(filter(None, [options, "remat off"])))
            if unchecked in rows:
                return unchecked, eager_only and options != key[2]
    if key not in rows and eager in rows:
        return eager, True
    return key, False
