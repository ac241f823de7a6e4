"""From a validated config to the pipeline's job specifications and target lists.

The Snakefile stays thin: its rules ask ``Jobs`` for a job's JSON spec (what the entry point
needs, nothing more, so the spec's hash changes exactly when the job's result would) and for the
list of files every variant, seed and noise level expands to.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

from stablenets.pipeline import outputs
from stablenets.pipeline.labels import sigma_label

__all__ = [
    "Jobs",
    "RULE_KINDS",
    "RUN_ONLY",
    "JOB_RUN_ONLY",
    "SEARCH_SETTINGS",
    "data_label",
    "run_only",
]

#: Each rule's resource kind (``config.resources.<kind>``), the one place it is written: what the
#: rule asks SLURM for (``Jobs.resources``), where its job computes under ``device: auto``
#: (``Jobs.device``) and which runtime limit its projected cost is held to (``bench.cost``).
RULE_KINDS = {
    "prepare_data": "data",
    "train_classifier": "train",
    "evaluate_classifier": "evaluate",
    "train_denoiser": "train",
    "evaluate_denoiser": "evaluate",
    "evaluate_tv_denoising": "data",
    "pnp_deblur": "evaluate",
    "tv_deblur": "data",
    "table": "report",
    "figure": "report",
    "summary": "report",
    "cost": "report",
}
#: What a data job reads of its ``data.<dataset>`` section where the archive is downloaded:
#: the archive, its checksums, and how it is split (CIFAR-10) or cropped (BSDS500).
_DOWNLOAD_READS = ("archive", "md5", "sha256", "val_fraction", "split_seed", "size")
#: The dataset behind each target list (``Jobs.<source>``) a table or figure is built from.
_SOURCE_DATASET = {
    "classification_evals": "cifar10",
    "robustness_evals": "cifar10",
    "classification_logs": "cifar10",
    "denoising_evals": "bsds500",
    "denoising_logs": "bsds500",
    "pnp_runs": "bsds500",
}
#: A task's models in rule names (``train_classifier``, ``evaluate_denoiser``).
MODEL_NOUN = {"classification": "classifier", "denoising": "denoiser"}


def _model_kwargs(model: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A variant's model arguments for its job: a null that is the model's default is left out
    (the model is the same, and so is the spec), one that is not is kept (``init_norm: null``
    builds PyTorch's initialisation, not the default rescaling)."""
    from stablenets.nn.models import model_defaults  # torch: only where a spec is made

    defaults = model_defaults(model)
    return {k: v for k, v in kwargs.items() if v is not None or defaults.get(k) is not None}


def data_label(dataset: str, spec: dict[str, Any]) -> str:
    """What a caption calls the data of ``data.<dataset>`` (``spec``): ``CIFAR-10`` where the
    real archive is downloaded, ``synthetic stand-in for CIFAR-10`` where it is not, so that a
    table pasted elsewhere does not claim data it was not computed on."""
    from stablenets.data.shapes import DATASET_NAMES  # torch: only where a spec is made

    name = DATASET_NAMES[dataset]
    return name if spec["source"] == "download" else f"{spec['source']} stand-in for {name}"


def _sigma(task: str, sigma: str | None) -> float:
    """The noise level of a job that needs one (a ``sigma`` path label as a number)."""
    if sigma is None:
        raise ValueError(f"a {task} job needs a noise level (sigma), got None")
    return float(sigma)


#: Settings that change no number a job computes, so saved progress made under other values
#: resumes (``pipeline.jobs`` hashes a spec without them): where it runs (device and threads, and
#: whether training steps or attacks replay CUDA graphs, how many graphs training keeps, whether
#: its sub-steps are recomputed in backward: all up to rounding), how many images a training job
#: validates at once (``eval_batch``: memory, up to rounding), how often it says so or saves,
#: and the limits that only stop a run (a run stopped by one resumes from its last good
#: checkpoint when rerun with a higher limit; ``stop_after`` ends the full run's schedule early,
#: so a later stop goes on from the earlier one). A rerun that Snakemake starts because one of
#: them changed therefore resumes: a finished training from its last checkpoint in seconds.
RUN_ONLY: dict[str, tuple[str, ...]] = {
    "": ("device", "threads", "eval_batch"),
    "train": (
        "log_every",
        "checkpoint_every",
        "max_norm",
        "max_substeps",
        "memory_fraction",
        "stop_after",
        "remat",
        "cuda_graphs",
        "cuda_graph_cache",
        "channels_last",
        "cudnn_benchmark",
    ),
    # group_size: images solved at once, each on its own; groups saved with another size are
    # solved again (``resume.in_groups``), the validation scores and search saved beside them kept
    "evaluate": (
        "log_every_s",
        "save_every_s",
        "cuda_graphs",
        "cuda_graph_max_batch",
        "group_size",
    ),
    "pnp": ("log_every", "batch_size", "group_size"),  # batch_size: images per denoiser call
    "tv": ("group_size",),
}


#: Where a spec keeps the settings of its job's empirical Lipschitz search (both evaluations).
#: Saved progress records them with the search's own state and bound, not in the job's progress
#: key: changing them (fewer images after running out of memory) redoes the search alone and
#: keeps the saved sweep or image groups.
SEARCH_SETTINGS = ("evaluate", "lipschitz_search")


#: ``RUN_ONLY`` settings of one job alone (by its command's name): a denoiser's evaluation
#: denoises each image on its own, so its batch size bounds memory alone (up to rounding), where
#: a classifier's evaluation seeds each batch's attacks by the batch.
JOB_RUN_ONLY: dict[str, tuple[tuple[str, ...], ...]] = {
    "evaluate-denoiser": (("evaluate", "batch_size"),),
}


def run_only(path: tuple[str, ...], job: str | None = None) -> bool:
    """Whether the spec's setting at ``path`` (``("threads",)``, ``("train", "max_norm")``) is
    one of the ``RUN_ONLY`` settings, or of ``job``'s (``JOB_RUN_ONLY``)."""
    if path in JOB_RUN_ONLY.get(job or "", ()):
        return True
    return path[-1] in RUN_ONLY.get(path[0] if len(path) > 1 else "", ())


# What the TV denoising job reads of ``denoising.evaluate`` (the test images, their noise and
# crops): the trained denoisers' settings there would rerun it for nothing.
_TV_EVALUATE = ("n_test", "noise_seed", "crops", "crop_size")

# What a deblurring job reads of ``pnp``: the problem and its bookkeeping (both jobs), then the
# PnP iteration (``pnp_deblur``) or the TV baseline (``tv_deblur``). Neither job's spec holds the
# other's settings, nor the list of denoisers: changing them reruns the jobs they concern alone.
_DEBLUR_PROBLEM = (
    *("n_images", "n_show", "group_size", "log_every", "blur", "noise", "seed"),
    *("val_images", "val_noise_seed"),  # the validation images a weight is chosen on
)
_DEBLUR_METHOD = {
    "pnp_deblur": (
        "batch_size",
        "eta",
        "relax",
        "max_iter",
        "tol",
        "blowup",
        "nonincreasing_rtol",
        "nonincreasing_atol_eps",
        "strengths",
    ),
    "tv_deblur": ("tv",),
}


class Jobs:
    """Job specifications and targets of one validated configuration."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.seeds = list(config["seeds"])
        self.sigmas = [sigma_label(s) for s in config["denoising"]["noise_levels"]]

    def device(self, rule: str) -> str:
        """Where a job of ``rule`` computes: the config's ``device``, except that a rule whose
        resource kind asks for no GPU (``resources.<kind>.gpu`` 0) computes on the CPU whatever
        the setting (``auto`` or ``cuda``). On SLURM such a job lands on a node without one; on a
        workstation it must not take memory from the GPU that ``resources: gpu`` lends to one
        job at a time (a training job sizes its sub-step limit from the memory free when it
        starts); and the cost it measures (``cost.csv``) is the one it will have on a
        cluster."""
        if not self.config["resources"][RULE_KINDS[rule]].get("gpu"):
            return "cpu"
        return self.config["device"]

    def _common(self, rule: str, seed: int | None = None) -> dict[str, Any]:
        out = {"device": self.device(rule), "threads": self.config["threads"]}
        if seed is not None:
            out["seed"] = int(seed)
        return out

    @staticmethod
    def dump(spec: dict) -> str:
        return json.dumps(spec, sort_keys=True)

    def data_spec(self, dataset: str) -> str:
        """A dataset's spec: what its source reads (``_DOWNLOAD_READS``, or the stand-in's own
        section), so that a setting of the other source (the paper's ``val_fraction`` under a
        synthetic stand-in) reruns neither the data job nor every job after it. Not where its
        archive is cached (``data.cache_dir``) nor the URLs it is fetched from
        (:meth:`data_urls`), both given to the job apart: the checksummed archive makes the same
        data wherever it is kept and from whichever mirror it came, so moving the cache or
        adding a mirror reruns nothing downstream."""
        section = self.config["data"][dataset]
        source = section["source"]
        reads = _DOWNLOAD_READS if source == "download" else (source,)
        spec = {key: copy.deepcopy(section[key]) for key in reads if key in section}
        spec.update(source=source, dataset=dataset)
        return self.dump(spec)

    def data_urls(self, dataset: str) -> str:
        """The URLs a dataset's archive is fetched from, in order (mirrors after the first), as a
        JSON list; empty for a generated stand-in."""
        return json.dumps(self.config["data"][dataset].get("urls") or [])

    def variants(self, task: str) -> list[str]:
        return list(self.config[task]["variants"])

    def variant_pattern(self, task: str) -> str:
        """The ``{variant}`` wildcard of ``task``'s rules: its configured variants alone, so that
        a target of another is Snakemake's "no rule to produce" line, not a ``KeyError``
        traceback from a spec."""
        return "|".join(re.escape(v) for v in self.variants(task))

    def train_spec(self, task: str, variant: str, seed: int, sigma: str | None = None) -> str:
        section = self.config[task]
        v = section["variants"][variant]
        spec = {
            **self._common(f"train_{MODEL_NOUN[task]}", seed),
            "task": task,
            "variant": variant,
            "model": v["model"],
            "kwargs": _model_kwargs(v["model"], v.get("kwargs", {})),
            "train": {**section["train"], **v.get("train", {})},
            "eval_batch": section["eval_batch"],
        }
        if task == "classification":
            spec["augment"] = section["augment"]
        else:
            spec.update(
                sigma=_sigma(task, sigma), noise_seed=section["noise_seed"], patch=section["patch"]
            )
        return self.dump(spec)

    def eval_spec(self, task: str, variant: str, seed: int, sigma: str | None = None) -> str:
        section = self.config[task]
        spec = {
            **self._common(f"evaluate_{MODEL_NOUN[task]}", seed),
            "variant": variant,
            "evaluate": section["evaluate"],
        }
        if task == "denoising":
            spec["sigma"] = _sigma(task, sigma)
        return self.dump(spec)

    def tv_spec(self, sigma: str) -> str:
        section = self.config["denoising"]
        spec = {
            **self._common("evaluate_tv_denoising", 0),
            "sigma": float(sigma),
            "evaluate": {k: section["evaluate"][k] for k in _TV_EVALUATE},
            "tv": section["tv"],
        }
        return self.dump(spec)

    def pnp_spec(self, variant: str, seed: int, sigma: str | None = None) -> str:
        """A PnP job's spec (its denoiser trained at noise level ``sigma``), or with ``variant``
        ``tv`` the TV baseline's (rule ``tv_deblur``, no noise level)."""
        rule = "tv_deblur" if variant == "tv" else "pnp_deblur"
        section = self.config["pnp"]
        pnp = {k: section[k] for k in (*_DEBLUR_PROBLEM, *_DEBLUR_METHOD[rule])}
        spec = {**self._common(rule, seed), "variant": variant, "pnp": pnp}
        if rule == "pnp_deblur":
            spec["sigma"] = _sigma("pnp", sigma)
        return self.dump(spec)

    def resources(self, rule: str) -> dict[str, Any]:
        """What a job of ``rule`` asks the scheduler for: its kind's ``resources`` entry, without
        the GPU keys where it asks for none."""
        res = dict(self.config["resources"][RULE_KINDS[rule]])
        if not res.get("gpu"):
            res.pop("gpu", None)
            res.pop("cpus_per_gpu", None)
        return res

    def caption_params(self) -> dict[str, str]:
        """What the report captions say that the config does not spell: ``strong_attack``, the
        strongest attack as it ran (``autoattack apgd-ce (10 iterations)``), not its method's
        name. The ``table`` and ``figure`` rules pass it as ``params``."""
        from stablenets.evaluation.radius_sweep import strong_label

        ev = self.config["classification"]["evaluate"]
        return {"strong_attack": strong_label(ev["strong"], ev["precision"])}

    # ----- targets -------------------------------------------------------------------------

    def classification_evals(
        self, R: Callable[[str], str], variants: list[str] | None = None
    ) -> list[str]:
        """Every seed's evaluation of ``variants`` (``None``: every classifier variant)."""
        chosen = self.variants("classification") if variants is None else variants
        return [R(f"eval/classification/{v}/seed{s}.h5") for v in chosen for s in self.seeds]

    def robustness_evals(self, R: Callable[[str], str]) -> list[str]:
        """The evaluations the robustness figure draws: ``classification.robustness_figure``'s
        variants; by default those without a size preset (the paper's models: with every family
        at every width, 18 classifiers drew 54 curves), or every variant when each has one."""
        section = self.config["classification"]
        unsized = [
            v for v in self.variants("classification") if "size" not in section["variants"][v]
        ]
        return self.classification_evals(R, section["robustness_figure"] or unsized or None)

    def classification_logs(self, R: Callable[[str], str]) -> list[str]:
        return [
            R(f"models/classification/{v}/seed{s}/train_log.csv")
            for v in self.variants("classification")
            for s in self.seeds
        ]

    def denoising_evals(self, R: Callable[[str], str]) -> list[str]:
        models = [
            R(f"eval/denoising/sigma{sg}/{v}/seed{s}.h5")
            for sg in self.sigmas
            for v in self.variants("denoising")
            for s in self.seeds
        ]
        return models + [R(f"eval/denoising/sigma{sg}/tv.h5") for sg in self.sigmas]

    def denoising_logs(self, R: Callable[[str], str]) -> list[str]:
        return [
            R(f"models/denoising/sigma{sg}/{v}/seed{s}/train_log.csv")
            for sg in self.sigmas
            for v in self.variants("denoising")
            for s in self.seeds
        ]

    def pnp_runs(self, R: Callable[[str], str]) -> list[str]:
        sg = sigma_label(self.config["pnp"]["noise_level"])
        runs = [
            R(f"pnp/sigma{sg}/{v}/seed{s}.h5")
            for v in self.config["pnp"]["denoisers"]
            for s in self.seeds
        ]
        return runs + [R("pnp/tv.h5")]

    def inputs(self, kind: str, name: str, R: Callable[[str], str]) -> list[str]:
        """The result files or training logs a table or figure (``kind``) is built from: the
        target list its declaration names (``outputs``)."""
        return getattr(self, outputs.get(kind, name).source)(R)

    def report_spec(self, kind: str, name: str) -> str:
        """A table or figure job's spec: its ``name`` (key ``kind``, as the entry point reads
        it), the scale and the data its inputs came from (``data_label``), which its Markdown
        and LaTeX caption say; a figure also gets the noise level of PnP's denoisers (the one
        ``denoising_examples`` shows)."""
        dataset = _SOURCE_DATASET[outputs.get(kind, name).source]
        spec: dict[str, Any] = {
            "kind": name,
            "scale": self.config["scale"],
            "data": data_label(dataset, self.config["data"][dataset]),
        }
        if kind == "figure":
            spec["sigma"] = self.config["pnp"]["noise_level"]
        return self.dump(spec)

    def final_outputs(self, R: Callable[[str], str]) -> list[str]:
        tables = [
            R(f"tables/{t}.{ext}") for t in outputs.names("table") for ext in ("csv", "md", "tex")
        ]
        figures = [
            R(f"figures/{f}.{ext}") for f in outputs.names("figure") for ext in ("pdf", "png")
        ]
        return tables + figures + [R("summary.md")]
