"""Validate ``config.yaml`` against the JSON Schema, fill defaults, check cross-field rules.

Errors are one line naming the key (dotted path) and what was expected, e.g.
``config: classification.train.stepz: unknown key; allowed: batch_size, checkpoint_every, ...``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.protocols import Validator

if TYPE_CHECKING:
    from stablenets.data.shapes import DataShape

__all__ = ["ConfigError", "SCHEMA", "load_config", "load_schema", "overlay", "validate_config"]

SCHEMA = Path("workflow/schemas/config.schema.yaml")  # relative to the repository root


class ConfigError(ValueError):
    """A configuration value that the schema or a cross-field rule rejects."""


def _with_defaults(base: type[Validator]) -> type[Validator]:
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(
        validator: Validator,
        properties: Mapping[str, Any],
        instance: object,
        schema: Mapping[str, Any],
    ) -> Iterator[ValidationError]:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(base, {"properties": set_defaults})


def _strict_integer(checker: object, instance: object) -> bool:
    """JSON Schema counts ``40.0`` as an integer; Python does not (a slice, ``linspace``'s count
    or a seed would fail in a job, hours in). YAML's ``1.0e+4`` is a float."""
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = validators.extend(
    _with_defaults(Draft202012Validator),
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer),
)


def load_schema(path: Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def _where(error: ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _describe(error: ValidationError) -> str:
    where = _where(error)
    if (
        error.validator == "additionalProperties"
        and isinstance(error.instance, dict)
        and isinstance(error.schema, Mapping)
    ):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(f"{where}.{k}" if where != "<top level>" else k for k in extra)
        return f"{keys}: unknown key; allowed: {', '.join(allowed)}"
    if error.validator == "enum":
        return f"{where}: {error.instance!r} is not allowed; allowed: {error.validator_value}"
    return f"{where}: {error.message}"


def _wrong_kind(error: ValidationError) -> bool:
    """A ``oneOf`` branch that wanted another kind of value: another type, or an enum of values
    of other types (``auto`` against ``2000.0``)."""
    if error.relative_path:
        return False
    if error.validator == "type":
        return True
    values = error.validator_value if error.validator == "enum" else None
    kinds = {type(v) for v in values} if isinstance(values, list) else set()
    return bool(kinds) and type(error.instance) not in kinds


def _telling(error: ValidationError) -> ValidationError:
    """The error of a ``oneOf`` that says what is wrong: the first one from a branch whose type
    fits the value (``{name: margin}`` against ``null | {name, eps}``: eps is missing), else
    what every branch wanted (``1000.0 is not of type 'null' or of type 'integer'``)."""
    whole = [c for c in error.context if _wrong_kind(c)]
    fitting = [c for c in error.context if c not in whole]
    if fitting:
        return _telling(fitting[0])
    if whole:
        wanted = [
            f"of type {c.validator_value!r}"
            if c.validator == "type"
            else f"one of {c.validator_value}"
            for c in whole
        ]
        error.message = f"{error.instance!r} is not {' or '.join(wanted)}"
    return error


def _name_errors(node: object, where: str = "") -> list[str]:
    """Keys that are not strings (YAML reads ``64:`` as a number): the schema's name patterns
    let them through, and the workflow's sorting of names would stop in a traceback."""
    if isinstance(node, list):
        return [e for i, item in enumerate(node) for e in _name_errors(item, f"{where}{i}.")]
    if not isinstance(node, dict):
        return []
    errors = []
    for key, value in node.items():
        if not isinstance(key, str):
            errors.append(f"{where}{key!r}: a name must be a string; quote it ('{key}')")
        else:
            errors += _name_errors(value, f"{where}{key}.")
    return errors


def _schema_errors(config: dict, schema: dict) -> list[str]:
    validator = _Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    return [_describe(_telling(e)) for e in errors]


def _cross_field_errors(config: dict) -> list[str]:
    from stablenets.evaluation.pnp import (
        GaussianBlur,  # the blur operator decides the PnP step-size limit
    )
    from stablenets.nn.models import (  # the model registry (imports torch, as pnp)
        CLASSIFIERS,
        DENOISERS,
    )

    errors = []
    for task, allowed in (("classification", CLASSIFIERS), ("denoising", DENOISERS)):
        for name, variant in config[task]["variants"].items():
            if variant["model"] not in allowed:
                errors.append(
                    f"{task}.variants.{name}.model: {variant['model']!r} is not a {task} model; "
                    f"allowed: {sorted(allowed)}"
                )
        errors += _variant_option_errors(config, task)
    errors += _data_fit_errors(config)
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
    try:  # on the images PnP deblurs: a kernel larger than they are fails there
        norm = GaussianBlur(pnp["blur"]["size"], pnp["blur"]["sigma"], _bsds_image(config)).norm()
    except ValueError as err:
        errors.append(f"pnp.blur: {err} (the BSDS500 images)")
    else:
        if not pnp["eta"] < 2 / norm**2:
            errors.append(
                f"pnp.eta: {pnp['eta']} must be < 2/||K||^2 = {2 / norm**2:.6g} for a convergent "
                "forward-backward iteration"
            )
    return errors + _job_time_errors(config)


def _data_fit_errors(config: dict) -> list[str]:
    """Models, batches and attacks that do not fit the data the jobs will see (``data.shapes``):
    a model's classes, image size or channels; a batch larger than the training set (once per
    task, and per variant whose own differs); AutoAttack on fewer classes than its losses need."""
    from stablenets.data.shapes import bsds500_shape, cifar10_shape

    shapes = {
        "classification": ("CIFAR-10", cifar10_shape(config["data"]["cifar10"])),
        "denoising": ("BSDS500", bsds500_shape(config["data"]["bsds500"])),
    }
    errors = []
    for task, (dataset, shape) in shapes.items():
        section = config[task]
        if shape.n_val == 0:  # only a fraction can round to none: the first validation fails
            fraction = config["data"]["cifar10"]["val_fraction"]
            errors.append(
                f"data.cifar10.val_fraction: {fraction} leaves no {dataset} validation images"
            )
        task_batch = section["train"]["batch_size"]
        if task_batch > shape.n_train:
            errors.append(
                f"{task}.train.batch_size: {task_batch} is more than the {dataset} training set "
                f"({shape.n_train} images)"
            )
        for name, variant in section["variants"].items():
            where = f"{task}.variants.{name}"
            batch = variant.get("train", {}).get("batch_size", task_batch)
            if batch != task_batch and batch > shape.n_train:
                errors.append(
                    f"{where}.train.batch_size: {batch} is more than the {dataset} training set "
                    f"({shape.n_train} images)"
                )
            errors += _model_fit_errors(where, variant, dataset, shape)
    test_images = shapes["denoising"][1].n_test
    if config["pnp"]["n_images"] > test_images:  # the job would deblur fewer, saying nothing
        errors.append(
            f"pnp.n_images: {config['pnp']['n_images']} is more than the BSDS500 test set "
            f"({test_images} images)"
        )
    return errors + _attack_class_errors(config, shapes["classification"][1].classes)


def _model_fit_errors(where: str, variant: dict, dataset: str, shape: DataShape) -> list[str]:
    """A model built for other images than the data's (its defaults, or its ``kwargs``)."""
    from stablenets.nn.models import CLASSIFIERS, DENOISERS, MODELS

    if variant["model"] not in (CLASSIFIERS if shape.classes is not None else DENOISERS):
        return []  # reported with the model's own error
    params = inspect.signature(MODELS[variant["model"]]).parameters
    kwargs = variant.get("kwargs", {})
    given = {k: kwargs.get(k, p.default) for k, p in params.items()}
    errors = []
    for key in ("in_channels", "channels"):
        if key in given and given[key] != 3:
            errors.append(
                f"{where}.kwargs.{key}: {given[key]}, but the {dataset} images are RGB (3)"
            )
    if "num_classes" in given and given["num_classes"] != shape.classes:
        errors.append(
            f"{where}.kwargs.num_classes: {given['num_classes']}, but the {dataset} data have "
            f"{shape.classes} classes"
        )
    # a classifier is certified for its input_size (32 unless given); a denoiser is built for
    # the data's images unless given one
    size = given["input_size"] if "num_classes" in given else kwargs.get("input_size")
    if size is not None and _pair(size) != shape.image:
        errors.append(
            f"{where}.kwargs.input_size: {size}, but the {dataset} images are {list(shape.image)}"
        )
    return errors


def _pair(size: int | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _attack_class_errors(config: dict, classes: int | None) -> list[str]:
    """AutoAttack runs (the strong attack, the grid's) whose losses need more classes than
    the classification data have: they would fail after training."""
    from stablenets.evaluation.robustness import autoattack_min_classes

    strong = config["classification"]["evaluate"]["strong"]
    if strong["method"] != "autoattack" or classes is None:
        return []
    runs = [("strong", strong["version"], strong.get("attacks"))]
    if strong.get("grid_attacks") is not None:
        runs.append(("strong.grid_attacks", "custom", strong["grid_attacks"]))
    errors = []
    for key, version, attacks in runs:
        need = autoattack_min_classes(version, attacks)
        if classes < need:
            errors.append(
                f"classification.evaluate.{key}: AutoAttack {version} {attacks or ''} needs "
                f"{need} classes or more; the CIFAR-10 data have {classes}"
            )
    return errors


def _bsds_image(config: dict) -> tuple[int, int]:
    """Height and width of the BSDS500 images (or of their stand-in photographs)."""
    from stablenets.data.shapes import bsds500_shape

    return bsds500_shape(config["data"]["bsds500"]).image


def _job_time_errors(config: dict) -> list[str]:
    """Settings that the jobs themselves would reject, hours into a run (after training):
    the classifier evaluation's attacks and grid, denoiser patches larger than the images, and
    noise levels that share one path label (the second would never be trained)."""
    from stablenets.evaluation.radius_sweep import check_settings
    from stablenets.pipeline.specs import sigma_label

    errors = []
    try:
        check_settings(config["classification"]["evaluate"])
    except ValueError as err:
        errors.append(f"classification.evaluate.{err}")
    image = _bsds_image(config)
    patch = config["denoising"]["patch"]
    if patch is not None and (patch[0] > image[0] or patch[1] > image[1]):
        errors.append(f"denoising.patch: {patch} is larger than the BSDS500 images ({list(image)})")
    labels = [sigma_label(s) for s in config["denoising"]["noise_levels"]]
    if len(set(labels)) < len(labels):
        errors.append(
            f"denoising.noise_levels: {config['denoising']['noise_levels']} share path labels "
            f"{labels}; give levels that differ in their 6 significant digits"
        )
    return errors


def _variant_option_errors(config: dict, task: str) -> list[str]:
    """Sizes, losses, the CPL integrator and ``select`` of one task's variants."""
    from stablenets.nn.models import CLASSIFIERS, DENOISERS

    section, errors = config[task], []
    models = CLASSIFIERS if task == "classification" else DENOISERS
    sizes = section.get("sizes", {})
    shared = _schedule_problem(section["train"])
    if shared is not None:
        errors.append(f"{task}.train: {shared}")
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
        own = _schedule_problem({**section["train"], **variant.get("train", {})})
        if own is not None and own != shared:  # the task's is reported once
            errors.append(f"{where}.train: {own}")
        if variant.get("train", {}).get("loss") is not None and task != "classification":
            errors.append(f"{where}.train.loss: the margin loss is for classification only")
        if "block" in kwargs and variant["model"] != "nonexpansive_denoiser":
            errors.append(
                f"{where}.kwargs.block: only nonexpansive_denoiser takes a block; classifiers "
                "pick theirs by model name (e.g. sll_classifier)"
            )
        if variant["model"] in models:  # else reported with the model's own error
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
    if task == "denoising" and section.get("select"):
        dropped = [d for d in config["pnp"]["denoisers"] if d not in section["select"]]
        if dropped:
            errors.append(f"denoising.select: leaves out {dropped}, which pnp.denoisers needs")
    return errors


def _schedule_problem(train: dict) -> str | None:
    """What the training job would refuse in a schedule (``train.loop.schedule_problem``): the
    task's settings, or a variant's (the task's with its own ``train`` laid on them)."""
    from stablenets.train.loop import schedule_problem

    return schedule_problem(train["steps"], train["warmup"], train["lr_initial"], train["lr_max"])


def _argument_errors(where: str, model: str, kwargs: dict) -> list[str]:
    """A kwarg the schema knows but ``model`` does not take (caught here, not when the job
    builds the model hours into the run), or one its block ignores (``theta`` on an AOL block:
    the variant would be trained as if it were not set)."""
    from stablenets.nn.models import model_arguments, unused_arguments

    taken = model_arguments(model)
    errors = [
        f"{where}.kwargs.{key}: {model} takes no {key!r}; allowed: {sorted(taken)}"
        for key in sorted(set(kwargs) - set(taken))
    ]
    block = kwargs.get("block", model.removesuffix("_classifier"))
    return errors + [
        f"{where}.kwargs.{key}: the {block} block does not use {key!r}; remove it"
        for key in unused_arguments(model, kwargs)
    ]


def _resolve_variants(config: dict) -> None:
    """Apply ``size`` (-> ``kwargs.base_width``) and keep only the ``select``-ed variants."""
    for task in ("classification", "denoising"):
        section = config[task]
        for variant in section["variants"].values():
            if "size" in variant:
                kwargs = variant.setdefault("kwargs", {})
                kwargs["base_width"] = section["sizes"][variant["size"]]
        if section.get("select"):
            section["variants"] = {
                name: v for name, v in section["variants"].items() if name in section["select"]
            }


def validate_config(config: dict[str, Any], schema: dict | Path) -> dict[str, Any]:
    """Return ``config`` with defaults filled in; raise ``ConfigError`` listing every problem."""
    if isinstance(schema, (str, Path)):
        schema = load_schema(Path(schema))
    config = copy.deepcopy(config)
    errors = _name_errors(config) or _schema_errors(config, schema)
    if not errors:
        errors = _cross_field_errors(config)
    if errors:
        raise ConfigError(
            "invalid configuration:\n  " + "\n  ".join(f"config: {e}" for e in errors)
        )
    _resolve_variants(config)
    return config


def overlay(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base`` as Snakemake merges ``--configfile`` files: nested mappings
    merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = overlay(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(paths: Path | str | Sequence[Path | str], schema: dict | Path = SCHEMA) -> dict:
    """The config the workflow runs with ``--configfile paths...``: the files overlaid in order
    (:func:`overlay`), validated against ``schema`` with defaults filled in."""
    config: dict[str, Any] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"config: {path}: cannot read: {err.strerror}") from None
        config = overlay(config, _settings(path, text))
    return validate_config(config, schema)


def _settings(path: Path | str, text: str) -> dict[str, Any]:
    """The mapping a config file holds (empty for an empty file); one line if it holds none."""
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config: {path}: not valid YAML: {at}{problem}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ConfigError(
            f"config: {path}: holds a {type(settings).__name__}, not a mapping of settings"
        )
    return settings
