"""The rules across keys of a schema-valid config (``config.validate_config`` runs them): what
the schema cannot say, and what the jobs would otherwise refuse only when they run, some of
them after paper-scale training. Each problem is one line naming the key.

The models' arguments and blocks (``nn.models``), the data the jobs will see
(``data.shapes``), the attacks' own option checks (``evaluation.radius_sweep``), the training
schedule (``train.loop.schedule_problems``) and the PnP blur (``evaluation.pnp``) each decide
their part; this module names the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stablenets.data.shapes import DataShape

__all__ = ["cross_field_errors"]


def cross_field_errors(config: dict) -> list[str]:
    """Every problem of a schema-valid ``config`` across its keys, one line each (empty: none)."""
    from stablenets.evaluation.pnp import (
        GaussianBlur,  # the blur operator decides the PnP step-size limit
    )

    errors = []
    for task in ("classification", "denoising"):
        allowed = _models(task)
        for name, variant in config[task]["variants"].items():
            if variant["model"] not in allowed:
                errors.append(
                    f"{task}.variants.{name}.model: {variant['model']!r} is not a {task} model; "
                    f"allowed: {sorted(allowed)}"
                )
        errors += _variant_option_errors(config, task)
    shapes = _data_shapes(config)
    errors += _data_fit_errors(config, shapes)
    for ds in ("cifar10", "bsds500"):
        spec = config["data"][ds]
        if spec["source"] == "download" and not (
            spec.get("urls") and (spec.get("md5") or spec.get("sha256"))
        ):
            errors.append(f"data.{ds}: source 'download' needs urls and an md5 or sha256 checksum")
    if "tv" in config["denoising"]["variants"]:
        errors.append(
            "denoising.variants.tv: 'tv' names the TV baseline in the tables; rename the variant"
        )
    pnp = config["pnp"]
    unknown = sorted(set(pnp["denoisers"]) - set(config["denoising"]["variants"]))
    if unknown:
        errors.append(
            f"pnp.denoisers: {unknown} are not denoising variants; "
            f"allowed: {sorted(config['denoising']['variants'])}"
        )
    if pnp["noise_level"] not in config["denoising"]["noise_levels"]:
        errors.append(
            f"pnp.noise_level: {pnp['noise_level']} is not one of denoising.noise_levels "
            f"{config['denoising']['noise_levels']}"
        )
    errors += _evaluation_size_errors(config, shapes)
    bsds = shapes["denoising"]
    if pnp["n_images"] > bsds.n_test:  # the job would deblur fewer, saying nothing
        errors.append(
            f"pnp.n_images: {pnp['n_images']} is more than the {bsds.name} test set "
            f"({bsds.n_test} images)"
        )
    # a weight would be chosen on fewer images than asked
    for key, asked in (("denoising.tv", config["denoising"]["tv"]["val_images"]),
                       ("pnp", pnp["val_images"])):  # fmt: skip
        if asked is not None and asked > bsds.n_val:
            errors.append(
                f"{key}.val_images: {asked} is more than the {bsds.name} validation set "
                f"({bsds.n_val} images)"
            )
    try:  # on the images PnP deblurs: a kernel larger than they are fails there
        norm = GaussianBlur(pnp["blur"]["size"], pnp["blur"]["sigma"], bsds.image).norm()
    except ValueError as err:
        errors.append(f"pnp.blur: {err} (the {bsds.name} images)")
    else:
        if not pnp["eta"] < 2 / norm**2:
            errors.append(
                f"pnp.eta: {pnp['eta']} must be < 2/||K||^2 = {2 / norm**2:.6g} for a convergent "
                "forward-backward iteration"
            )
    return errors + _job_time_errors(config, bsds)


def _evaluation_size_errors(config: dict, shapes: dict[str, DataShape]) -> list[str]:
    """Evaluations asked for more test images than there are: a job would evaluate fewer,
    saying nothing, and the report's captions would quote the number asked."""
    errors = []
    for task, shape in shapes.items():
        ev = config[task]["evaluate"]
        asked, search = ev.get("n_test"), ev["lipschitz_search"]["images"]
        if asked is not None and asked > shape.n_test:
            errors.append(
                f"{task}.evaluate.n_test: {asked} is more than the {shape.name} test set "
                f"({shape.n_test} images)"
            )
        evaluated = min(asked or shape.n_test, shape.n_test)
        if search > evaluated:
            errors.append(
                f"{task}.evaluate.lipschitz_search.images: {search} is more than the "
                f"{evaluated} test images evaluated"
            )
    return errors


def _data_shapes(config: dict) -> dict[str, DataShape]:
    """What each task's data will hold (``data.shapes``), by task."""
    from stablenets.data.shapes import bsds500_shape, cifar10_shape

    return {
        "classification": cifar10_shape(config["data"]["cifar10"]),
        "denoising": bsds500_shape(config["data"]["bsds500"]),
    }


def _data_fit_errors(config: dict, shapes: dict[str, DataShape]) -> list[str]:
    """Models, batches and attacks of the selected variants that do not fit the data the jobs
    will see: a batch larger than the training set (the task's once, a variant's own), a model
    built for other classes, channels or images, AutoAttack on fewer classes than it needs, a
    validation split that rounds to nothing."""
    errors = _crop_errors(config["data"]["bsds500"])
    cifar = shapes["classification"]
    if cifar.n_val == 0:  # a fraction of the archive can round to none
        fraction = config["data"]["cifar10"]["val_fraction"]
        errors.append(
            f"data.cifar10.val_fraction: {fraction} leaves no {cifar.name} validation images"
        )
    for task, shape in shapes.items():
        section = config[task]
        shared = section["train"]["batch_size"]
        batches = {f"{task}.train": shared}  # the task's, and each variant's own that differs
        for name, variant in _selected(section).items():
            own = variant.get("train", {}).get("batch_size", shared)
            if own != shared:
                batches[f"{task}.variants.{name}.train"] = own
        errors += [
            f"{where}.batch_size: {batch} is more than the {shape.name} training set "
            f"({shape.n_train} images)"
            for where, batch in batches.items()
            if batch > shape.n_train
        ]
        errors += _model_fit_errors(task, _selected(section), shape)
    return errors + _attack_class_errors(config["classification"]["evaluate"]["strong"], cifar)


def _crop_errors(bsds: dict) -> list[str]:
    """A BSDS500 crop larger than the photographs (the data job would refuse the first one)."""
    from stablenets.data.shapes import BSDS500_IMAGE

    if bsds["source"] != "download":
        return []
    (height, width), (most_h, most_w) = bsds["size"], BSDS500_IMAGE
    if height <= most_h and width <= most_w:
        return []
    return [f"data.bsds500.size: {bsds['size']} is larger than the BSDS500 photographs "
            f"({most_h}x{most_w}, portraits turned to landscape)"]  # fmt: skip


def _model_fit_errors(task: str, variants: dict[str, dict], shape: DataShape) -> list[str]:
    """Classifiers built for other classes or image sizes than the data's (a classifier is
    certified for its ``input_size``), and models for other channels: a kwarg given is named
    where it is; variants that keep a default that does not fit, once per default."""
    from stablenets.nn.models import model_defaults

    facts: dict[str, Any] = {"in_channels": shape.channels, "channels": shape.channels}
    if task == "classification":
        facts.update(num_classes=shape.classes, input_size=list(shape.image))
    errors, kept = [], {}
    for name, variant in variants.items():
        if variant["model"] not in _models(task):
            continue  # reported with the model's own error
        kwargs, defaults = variant.get("kwargs", {}), model_defaults(variant["model"])
        for key, fact in facts.items():
            if key not in defaults:
                continue
            value = kwargs.get(key, defaults[key])
            if (_pair(value) if key == "input_size" else value) == fact:
                continue
            if key in kwargs:
                errors.append(
                    f"{task}.variants.{name}.kwargs.{key}: {value}, but the {shape.name} data "
                    f"give {fact}"
                )
            else:
                kept.setdefault((key, str(value)), []).append(name)
    return errors + [
        f"{task}.variants: {names} keep the default {key} {value}, but the {shape.name} data "
        f"give {facts[key]}; set kwargs.{key}"
        for (key, value), names in kept.items()
    ]


def _models(task: str) -> frozenset[str]:
    """The registered models of ``task`` (the registry imports torch: loaded here, when run)."""
    from stablenets.nn.models import CLASSIFIERS, DENOISERS

    return CLASSIFIERS if task == "classification" else DENOISERS


def _selected(section: dict) -> dict[str, dict]:
    """The variants a task runs: those of ``select``, or all."""
    chosen = section.get("select")
    return {n: v for n, v in section["variants"].items() if not chosen or n in chosen}


def _pair(size: int | list[int]) -> list[int]:
    return [size, size] if isinstance(size, int) else [size[0], size[1]]


def _attack_class_errors(strong: dict, data: DataShape) -> list[str]:
    """AutoAttack runs of the evaluation (the strong attack; the grid's, where it runs) whose
    losses need more classes than the classification data have: they would fail after
    training."""
    from stablenets.evaluation.radius_sweep import runs_grid_attacks
    from stablenets.evaluation.robustness import autoattack_label, autoattack_min_classes

    if strong["method"] != "autoattack" or data.classes is None:
        return []
    runs = [("strong", strong["version"], strong.get("attacks"))]
    if runs_grid_attacks(strong):
        runs.append(("strong.grid_attacks", "custom", strong["grid_attacks"]))
    return [
        f"classification.evaluate.{key}: {autoattack_label(version, attacks)} needs "
        f"{autoattack_min_classes(version, attacks)} classes or more; the {data.name} data "
        f"have {data.classes}"
        for key, version, attacks in runs
        if data.classes < autoattack_min_classes(version, attacks)
    ]


def _job_time_errors(config: dict, bsds: DataShape) -> list[str]:
    """Settings that the jobs themselves would reject, hours into a run (after training):
    the classifier evaluation's attacks and grid, denoiser patches larger than the images, and
    noise levels that share one path label (the second would never be trained), standard radii
    that share one table column (the table job would refuse them)."""
    from stablenets.evaluation.radius_sweep import check_settings
    from stablenets.pipeline.labels import radius_label, sigma_label

    errors = []
    try:
        check_settings(config["classification"]["evaluate"])
    except ValueError as err:
        errors.append(f"classification.evaluate.{err}")
    image, patch = bsds.image, config["denoising"]["patch"]
    if patch is not None and (patch[0] > image[0] or patch[1] > image[1]):
        errors.append(
            f"denoising.patch: {patch} is larger than the {bsds.name} images ({list(image)})"
        )
    labels = [sigma_label(s) for s in config["denoising"]["noise_levels"]]
    if len(set(labels)) < len(labels):
        errors.append(
            f"denoising.noise_levels: {config['denoising']['noise_levels']} share path labels "
            f"{labels}; give levels that differ in their 6 significant digits"
        )
    radii = config["classification"]["evaluate"]["standard_eps"]
    labels = [radius_label(eps) for eps in radii]
    if len(set(labels)) < len(labels):
        errors.append(
            f"classification.evaluate.standard_eps: {radii} share table columns {labels}; give "
            "radii that differ in their 6 significant digits"
        )
    return errors


def _variant_option_errors(config: dict, task: str) -> list[str]:
    """Sizes, losses, the CPL integrator and ``select`` of one task's variants."""
    section, errors = config[task], []
    sizes = section.get("sizes", {})
    shared = _schedule_problems(section["train"])
    errors += [f"{task}.train: {problem}" for problem in shared]
    if section["train"].get("loss") is not None and task != "classification":
        errors.append(f"{task}.train.loss: the margin loss is for classification only; use null")
    for name, variant in section["variants"].items():
        where = f"{task}.variants.{name}"
        kwargs = variant.get("kwargs", {})
        if "size" in variant:
            if task != "classification":
                errors.append(f"{where}.size: sizes apply to classification variants only")
            elif variant["size"] not in sizes:
                errors.append(
                    f"{where}.size: {variant['size']!r} is not a size; allowed: {sorted(sizes)}"
                )
            elif kwargs.get("base_width", sizes[variant["size"]]) != sizes[variant["size"]]:
                errors.append(f"{where}: set either size or kwargs.base_width, not both")
        if name in _selected(section):  # the task's problems are reported once
            own = _schedule_problems({**section["train"], **variant.get("train", {})})
            errors += [f"{where}.train: {problem}" for problem in own if problem not in shared]
        if variant.get("train", {}).get("loss") is not None and task != "classification":
            errors.append(f"{where}.train.loss: the margin loss is for classification only")
        if variant["model"] in _models(task):  # else reported with the model's own error
            errors += _argument_errors(where, variant["model"], kwargs)
        cpl = variant["model"] == "cpl_classifier" or kwargs.get("block") == "cpl"
        if cpl and kwargs.get("integrator", "euler") != "euler":
            errors.append(
                f"{where}.kwargs.integrator: a cpl block is one Euler step; "
                f"{kwargs['integrator']!r} is not allowed"
            )
    unknown = [v for v in section.get("select") or [] if v not in section["variants"]]
    if unknown:
        errors.append(
            f"{task}.select: {unknown} are not {task} variants; "
            f"allowed: {sorted(section['variants'])}"
        )
    drawn = [v for v in section.get("robustness_figure") or [] if v not in _selected(section)]
    if drawn:
        errors.append(
            f"{task}.robustness_figure: {drawn} are not among the variants that run; "
            f"allowed: {sorted(_selected(section))}"
        )
    if task == "denoising" and section.get("select"):
        dropped = [d for d in config["pnp"]["denoisers"] if d not in section["select"]]
        if dropped:
            errors.append(f"denoising.select: leaves out {dropped}, which pnp.denoisers needs")
    return errors


def _schedule_problems(train: dict) -> list[str]:
    """What the training job would refuse in a schedule (``train.loop.schedule_problems``): the
    task's settings, or a variant's (the task's with its own ``train`` laid on them). With a
    ``budget_minutes`` the steps are derived in the job, and checked there."""
    from stablenets.train.loop import schedule_problems

    steps = train["steps"] if train.get("budget_minutes") is None else None
    return schedule_problems(steps, train["warmup"], train["lr_initial"], train["lr_max"])


def _argument_errors(where: str, model: str, kwargs: dict) -> list[str]:
    """A kwarg the schema knows but ``model`` does not take (caught here, not when the job
    builds the model hours into the run), or one its block ignores (``theta`` on an AOL block:
    the variant would be trained as if it were not set)."""
    from stablenets.nn.models import model_arguments, model_block, unused_arguments

    taken = model_arguments(model)
    errors = [
        f"{where}.kwargs.{key}: {model} takes no {key!r}; allowed: {sorted(taken)}"
        for key in sorted(set(kwargs) - set(taken))
    ]
    kwargs = {k: v for k, v in kwargs.items() if k in taken}
    block = model_block(model, kwargs)
    return errors + [
        f"{where}.kwargs.{key}: the {block} block does not use {key!r}; remove it"
        for key in unused_arguments(model, kwargs)
    ]
