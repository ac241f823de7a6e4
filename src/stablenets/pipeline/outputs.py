"""The registry of the pipeline's tables and figures: each declared once, where it is built.

``@outputs.table(...)`` on a ``*_table`` function of :mod:`~stablenets.pipeline.tables` and
``@outputs.figure(...)`` on a ``*_figure`` function of :mod:`~stablenets.pipeline.figures`
record the output's name, the :class:`~stablenets.pipeline.specs.Jobs` target list its inputs
come from and, for a table, what its Markdown and LaTeX and the summary say about it. The rules
(``TABLES`` and ``FIGURES`` of ``workflow/rules/common.smk``, ``Jobs.inputs``), the report entry
points and the summary read only this registry. Each output's report caption is the file
``workflow/report/<kind>s/<name>.rst`` (:func:`report_caption`).

Reading the registry imports the module that declares that kind of output (pandas and h5py for
tables, matplotlib for figures), never torch or seaborn.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stablenets.atomic import atomic_write

__all__ = [
    "KINDS",
    "Output",
    "Row",
    "table",
    "figure",
    "registered",
    "names",
    "get",
    "report_caption",
    "caption_macros",
    "CAPTION_MACROS",
]

#: Each kind of output, with the module that declares its outputs.
KINDS = {"table": "stablenets.pipeline.tables", "figure": "stablenets.pipeline.figures"}
#: The file of Jinja macros the report captions share, beside their folders.
CAPTION_MACROS = "macros.jinja"

#: One row of a table's CSV file, as the summary's headline formatter gets it.
Row = Mapping[str, Any]


@dataclass(frozen=True)
class Output:
    """One table or figure of the pipeline.

    ``source``: the ``Jobs`` method that lists its input files. ``build``: for a table
    ``build(paths) -> DataFrame``, one row per model, which
    :func:`~stablenets.pipeline.tables.write_table` writes; for a figure
    ``build(paths, stem, spec)``, which writes ``stem.pdf`` and ``stem.png``. A table's
    ``caption`` heads its Markdown and LaTeX, its ``title`` its section of the summary, and
    ``headline(row)`` is the summary's headline line for one of its rows (``None``: none).
    """

    kind: str
    name: str
    source: str
    build: Callable[..., Any]
    caption: str = ""
    title: str = ""
    headline: Callable[[Row], str] | None = None


# Outputs by kind, then by name, in the order they are declared (the summary's order of tables).
_REGISTRY: dict[str, dict[str, Output]] = {kind: {} for kind in KINDS}


def _register(output: Output) -> None:
    declared = _REGISTRY[output.kind]
    if output.name in declared:
        raise ValueError(f"{output.kind} {output.name!r} is declared twice")
    declared[output.name] = output


def table(
    *,
    name: str,
    source: str,
    caption: str,
    title: str,
    headline: Callable[[Row], str] | None = None,
) -> Callable[[Callable], Callable]:
    """Declare the decorated ``paths -> DataFrame`` function as the table ``name``
    (``tables/<name>.{csv,md,tex}``), built from the files ``Jobs.<source>`` lists."""

    def declare(build: Callable) -> Callable:
        _register(Output("table", name, source, build, caption, title, headline))
        return build

    return declare


def _as_given(paths: list[Path]) -> list[Path]:
    return paths


def _no_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {}


def figure(
    *,
    name: str,
    source: str,
    inputs: Callable[[list[Path]], Any] = _as_given,
    options: Callable[[Mapping[str, Any]], dict[str, Any]] = _no_options,
) -> Callable[[Callable], Callable]:
    """Declare the decorated ``draw(paths, stem)`` function as the figure ``name``
    (``figures/<name>.{pdf,png}``), drawn from the files ``Jobs.<source>`` lists.

    The registry calls every figure the same way, ``build(paths, stem, spec)``; a function that
    takes something else declares how to get it: ``inputs(paths)`` is what it draws from instead
    of the list of paths, ``options(spec)`` its keyword arguments from the job's spec.
    """

    def declare(draw: Callable) -> Callable:
        def build(paths: list[Path], stem: Path, spec: Mapping[str, Any]) -> Any:
            return draw(inputs(paths), stem, **options(spec))

        _register(Output("figure", name, source, build))
        return draw

    return declare


def registered(kind: str) -> dict[str, Output]:
    """Every output of ``kind`` (``table`` or ``figure``) by name, in declaration order."""
    importlib.import_module(KINDS[kind])
    return dict(_REGISTRY[kind])


def names(kind: str) -> tuple[str, ...]:
    """The names of the outputs of ``kind``, in declaration order."""
    return tuple(registered(kind))


def get(kind: str, name: str) -> Output:
    """The output ``name`` of ``kind``; a ``ValueError`` naming the declared ones if none."""
    declared = registered(kind)
    if name not in declared:
        raise ValueError(f"no {kind} named {name!r}; declared: {', '.join(declared)}")
    return declared[name]


def caption_macros(folder: Path | str) -> str:
    """The Jinja macros every caption may call (``folder/macros.jinja``)."""
    return (Path(folder) / CAPTION_MACROS).read_text()


def report_caption(kind: str, folder: Path | str, out: Path | str) -> str:
    """The caption template of the rule that makes the outputs of ``kind``, written to ``out``
    (when it changed); returns its absolute path. For the job whose wildcard ``<kind>`` is
    ``name`` it shows that output's own caption, ``folder/<kind>s/<name>.rst``.

    Snakemake 9 takes one caption file per rule (the path is not formatted with the wildcards)
    and renders it with Jinja without a template loader (no ``include``), with ``snakemake``
    (``config``, ``wildcards``, ``params``, ...) in the context: one file per output is joined
    here into that one template, after the macros the captions share (``folder/macros.jinja``).
    A missing caption fails here, when the workflow is parsed.
    """
    paths = {name: Path(folder) / f"{kind}s" / f"{name}.rst" for name in names(kind)}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise ValueError(f"no report caption for the {kind}s: {', '.join(missing)}")
    text = caption_macros(folder)
    for i, (name, path) in enumerate(paths.items()):
        test = f'{"el" if i else ""}if snakemake.wildcards.{kind} == "{name}"'
        text += f"{{% {test} %}}\n{path.read_text()}"
    text += "{% endif %}\n"
    out = Path(out)
    if not out.is_file() or out.read_text() != text:
        atomic_write(out, text)
    return str(out.resolve())
