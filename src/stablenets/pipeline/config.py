"""Validate ``config.yaml`` against the JSON Schema, fill defaults, check the rules across keys
(``checks``).

Errors are one line naming the key (dotted path) and what was expected, e.g.
``config: classification.train.stepz: unknown key; allowed: batch_size, checkpoint_every, ...``.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.protocols import Validator

from stablenets.pipeline.checks import cross_field_errors

__all__ = [
    "ConfigError",
    "Layers",
    "SCHEMA",
    "SPEC_KEYS",
    "SPEC_SECTIONS",
    "check_spec",
    "load_config",
    "load_schema",
    "overlay",
    "read_layers",
    "snakemake_files",
    "validate_config",
]

SCHEMA = Path("workflow/schemas/config.schema.yaml")  # relative to the repository root


class ConfigError(ValueError):
    """A configuration that the schema or a cross-field rule rejects; ``problems``: one line
    each (the message lists them under ``invalid configuration:``), each after ``where`` it was
    set (a file, ``--config``; ``config`` where unknown)."""

    def __init__(
        self, problems: list[str], heading: bool = True, where: Sequence[str] | None = None
    ) -> None:
        self.problems = problems
        where = where or ["config"] * len(problems)
        lines = [f"{w}: {p}" for w, p in zip(where, problems, strict=True)]
        super().__init__("\n  ".join(["invalid configuration:", *lines]) if heading else lines[0])


#: Settings as they were given, in the order they are laid over each other: (where, settings),
#: ``where`` a file name or ``--config``. Errors name the last layer that sets their key.
Layers = Sequence[tuple[str, dict[str, Any]]]


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


_TYPES = Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer)
_Validator = validators.extend(_with_defaults(Draft202012Validator), type_checker=_TYPES)


def load_schema(path: Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def _where(error: ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _describe(error: ValidationError) -> list[str]:
    """The problems an error is: one per unknown key (each named by the layer that set it),
    else one."""
    where = _where(error)
    if (
        error.validator == "additionalProperties"
        and isinstance(error.instance, dict)
        and isinstance(error.schema, Mapping)
    ):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return [
            f"{f'{where}.{k}' if where != '<top level>' else k}: unknown key; allowed: "
            f"{', '.join(allowed)}"
            for k in extra
        ]
    if error.validator == "enum":
        return [f"{where}: {error.instance!r} is not allowed; allowed: {error.validator_value}"]
    return [f"{where}: {error.message}{_number_as_text(error)}"]


def _number_as_text(error: ValidationError) -> str:
    """Why a number came as text: YAML 1.1 (PyYAML, Snakemake's reader) reads an exponent
    without a dot (``1e-5``) as a string; said where a number (not an integer) is wanted."""
    value, wanted = error.instance, error.validator_value
    if error.validator != "type" or "number" not in (
        wanted if isinstance(wanted, list) else [wanted]
    ):
        return ""
    if not isinstance(value, str) or not re.fullmatch(r"[+-]?\d+[eE][+-]?\d+", value.strip()):
        return ""
    return f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-5)"


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
    fits the value (``{name: margin}`` against ``null | {name, offset}``: offset is missing), else
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
    return [problem for e in errors for problem in _describe(_telling(e))]


#: Where a job's spec sections sit in the config schema (``{task}``: the spec's ``task``), every
#: job's ``device`` and ``threads`` included: a spec written by hand is checked there
#: (``check_spec``) before its job reads it, as the config is.
SPEC_SECTIONS: dict[str, dict[str, str]] = {
    "train": {
        "train": "{task}.train",
        "eval_batch": "{task}.eval_batch",
        "augment": "classification.augment",
        "patch": "denoising.patch",
        "noise_seed": "denoising.noise_seed",
    },
    "evaluate-classifier": {"evaluate": "classification.evaluate"},
    "evaluate-denoiser": {"evaluate": "denoising.evaluate"},
    "evaluate-tv": {"evaluate": "denoising.evaluate", "tv": "denoising.tv"},
    "pnp": {"pnp": "pnp"},
    "tv-deblur": {"pnp": "pnp"},
}
_EVERY_JOB = {"device": "device", "threads": "threads"}
#: A spec's own keys, which no config section holds (``specs.Jobs`` writes them from the
#: config's variant, seed and noise level): checked as the config checks what they come from.
SPEC_KEYS: dict[str, dict[str, Any]] = {
    "task": {"enum": ["classification", "denoising"]},
    "variant": {"type": "string", "minLength": 1},
    "model": {"type": "string", "minLength": 1},
    "kwargs": {"type": "object"},
    "seed": {"$ref": "#/$defs/seed"},
    "sigma": {"$ref": "#/$defs/positive_number"},
}

_PlainValidator = validators.extend(Draft202012Validator, type_checker=_TYPES)  # no defaults


def _without_required(node: Any) -> Any:
    """A schema with no ``required`` anywhere: a spec holds the parts of a section its job reads."""
    if isinstance(node, dict):
        return {k: _without_required(v) for k, v in node.items() if k != "required"}
    if isinstance(node, list):
        return [_without_required(v) for v in node]
    return node


def _section_schema(schema: dict, path: str) -> dict | None:
    node: Any = schema
    for key in path.split("."):
        node = node.get("properties", {}).get(key) if isinstance(node, dict) else None
    return node


def check_spec(job: str, spec: dict, schema: dict) -> None:
    """Raise ``ValueError`` (one line, every problem) where a job's spec has a value of the
    wrong type or range, or an unknown key, in a section the config schema describes
    (``SPEC_SECTIONS``), or in one of its own keys (``SPEC_KEYS``): the Snakefile writes specs from a validated config, but one written by
    hand would otherwise fail deep in the job with a traceback."""
    problems = []
    defs = _without_required(schema.get("$defs", {}))
    sections = {key: _section_schema(schema, path.format(task=spec.get("task", "")))
                for key, path in {**_EVERY_JOB, **SPEC_SECTIONS.get(job, {})}.items()}  # fmt: skip
    for key, section in {**SPEC_KEYS, **sections}.items():
        if key not in spec or section is None:
            continue
        validator = _PlainValidator({**_without_required(section), "$defs": defs})
        for error in sorted(validator.iter_errors(spec[key]), key=lambda e: list(e.path)):
            for what in _describe(_telling(error)):
                top = what.startswith("<top level>")
                problems.append(
                    f"--spec {key}" + (what.removeprefix("<top level>") if top else f".{what}")
                )
    if problems:
        raise ValueError("; ".join(problems))


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


def validate_config(
    config: dict[str, Any], schema: dict | Path, layers: Layers = ()
) -> dict[str, Any]:
    """Return ``config`` with defaults filled in; raise ``ConfigError`` listing every problem,
    each named by the last of ``layers`` (what ``config`` was merged from) that sets its key."""
    if isinstance(schema, (str, Path)):
        schema = load_schema(Path(schema))
    config = copy.deepcopy(config)
    errors = _name_errors(config) or _schema_errors(config, schema)  # names first: the
    # schema's messages sort the keys, which a number among strings would stop
    if not errors:
        errors = cross_field_errors(config)
    if errors:
        where = [_origin(e, layers) for e in errors]
        raise ConfigError([_hinted(e, w) for e, w in zip(errors, where, strict=True)], where=where)
    _resolve_variants(config)
    return config


#: A dotted key path in a problem's text (``denoising.noise_levels``): the keys it names.
_KEY_PATH = re.compile(r"\b[a-z_0-9]+(?:\.[A-Za-z_0-9]+)+")


def _origin(problem: str, layers: Layers) -> str:
    """Where the keys a problem names were set: of the key it is about (``pnp.eta: ...``) and
    those its text names (``... is not one of denoising.noise_levels``: a cross-field problem is
    as much the other key's), the last layer that sets one of them, or a value above it (a
    list, a mapping replaced whole); ``config`` when none does (a default, a key left out)."""
    subject, _, text = problem.partition(": ")
    paths = [subject, *_KEY_PATH.findall(text)]
    latest = max((_last_setting(path.split("."), layers) for path in paths), default=-1)
    return layers[latest][0] if latest >= 0 else "config"


def _last_setting(path: list[str], layers: Layers) -> int:
    """The index of the last layer that sets ``path`` (or a value above it), -1 if none does."""
    for index in range(len(layers) - 1, -1, -1):
        node: Any = layers[index][1]
        for key in path:
            if not isinstance(node, dict):
                break
            if key not in node:
                node = None
                break
            node = node[key]
        if node is not None:
            return index
    return -1


def _hinted(problem: str, where: str) -> str:
    """A type error of a ``--config`` value, with why: Snakemake passes its nested values as
    strings (``--config 'pnp={eta: 0.5}'`` gives ``'0.5'``)."""
    if where == "--config" and "' is not of type" in problem:
        return f"{problem} (--config gives nested values as strings: set it in a --configfile)"
    return problem


def snakemake_files(
    workflow_file: Path | str, command_line: Sequence[Path | str], replace: bool
) -> list[Path | str]:
    """The config files Snakemake reads, in order: the workflow's ``configfile:`` (none with
    ``--replace-workflow-config``, nor where it is absent and ``--configfile`` files are given,
    as Snakemake skips it then), then each ``--configfile``."""
    skip = replace or (bool(command_line) and not Path(workflow_file).exists())
    return [*([] if skip else [workflow_file]), *command_line]


def read_layers(
    paths: Sequence[Path | str], command_line: Mapping[str, Any] | None = None
) -> Layers:
    """The settings of each config file (``--configfile``), then of ``--config``: each file a
    mapping without a key given twice, or one ``ConfigError`` line naming it (Snakemake's own
    loader keeps the last of two equal keys, and says neither file nor line of a YAML error)."""
    layers: list[tuple[str, dict[str, Any]]] = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError([f"{path}: cannot read: {err.strerror}"], heading=False) from None
        shown = _shown(Path(path))
        layers.append((shown, _settings(shown, text)))
    if command_line:
        layers.append(("--config", dict(command_line)))
    return layers


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it is inside it (a shorter line)."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
    layers = read_layers([paths] if isinstance(paths, (str, Path)) else paths)
    config: dict[str, Any] = {}
    for _, settings in layers:
        config = overlay(config, settings)
    return validate_config(config, schema, layers)


def _settings(path: Path | str, text: str) -> dict[str, Any]:
    """The mapping a config file holds; one line if it holds none (an empty file included, which
    Snakemake refuses). JSON first, then YAML, as Snakemake reads a config file."""
    try:
        settings = json.loads(text, object_pairs_hook=_unique_pairs)
    except _RepeatedKey as err:
        raise ConfigError([f"{path}: not valid JSON: {err}"], heading=False) from None
    except json.JSONDecodeError:
        settings = _yaml_settings(path, text)
    if settings is None:  # Snakemake refuses it, naming no file
        raise ConfigError(
            [f"{path}: holds no settings (Snakemake refuses an empty config file)"], heading=False
        )
    if not isinstance(settings, dict):
        kind = type(settings).__name__
        raise ConfigError([f"{path}: holds a {kind}, not a mapping of settings"], heading=False)
    return settings


class _RepeatedKey(ValueError):
    """A key given twice in one mapping."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's mapping, refusing a key given twice."""
    keys = [key for key, _ in pairs]
    if repeated := sorted({key for key in keys if keys.count(key) > 1}):
        raise _RepeatedKey(f"key {repeated[0]!r} given twice")
    return dict(pairs)


def _yaml_settings(path: Path | str, text: str) -> Any:
    """What a YAML config file holds; one line naming the file, line and problem if invalid."""
    try:
        return yaml.load(text, _UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{path}: not valid YAML: {at}{problem}"], heading=False) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    silently, so a variant block copied and left under its old name would replace the first."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    """A mapping (merge keys ``<<`` laid in as PyYAML does), refusing a key given twice in it."""
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in may be overridden: only those written here count
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            continue  # construct_mapping names it
        if key in first:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (first on line {first[key]})",
                key_node.start_mark,
            )  # fmt: skip
        first[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stablenets.pipeline.config [snakemake options]``: check the configuration the
    Snakemake run of these options would read, before it starts: the workflow's ``config.yaml``
    and each ``--configfile`` (``snakemake_args.config_files``: or its profiles'), in
    Snakemake's order (``snakemake_files``), merged and validated as the workflow does. One
    line per problem, naming the file (a YAML error or a key given twice: its line too, which
    Snakemake's own message names neither of); nothing and exit 0 where all is well. ``make
    smoke``, ``smoke-slurm`` and ``rehearsal`` run it first. ``--config`` values are left to
    the workflow's own check."""
    import sys

    from stablenets.pipeline.snakemake_args import config_files

    args = list(sys.argv[1:] if argv is None else argv)
    given = config_files(args, Path.cwd())
    files = snakemake_files("config.yaml", given, "--replace-workflow-config" in args)
    if not SCHEMA.is_file():
        print(f"config: no {SCHEMA} here: run from the workflow's folder", file=sys.stderr)
        return 1
    try:
        load_config(files, SCHEMA)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
