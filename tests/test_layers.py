"""One house with rooms: the library installs and runs alone, and the layers import downwards.

* ``pip install stablenets`` (torch and numpy) imports the library and trains a small model: a
  fresh interpreter in which every third-party package outside the closure of the core
  dependencies fails to import, as in a fresh environment without the ``pipeline`` extra.
  (A real fresh virtual environment would need its own copy of torch, several GB: not done here;
  ``--system-site-packages`` would prove nothing, it sees every package.)
* The layering contract (``make lint`` runs this file), one layer per subpackage:
  base < nn < evaluation | data < train < pipeline < bench. A module imports nothing from a layer
  above its own, nor from another subpackage of its own rank (function-level imports included);
  ``nn``, ``evaluation`` and ``train`` import only torch and numpy besides the standard library at
  import time, and only the pipeline knows Snakemake. No import cycle between modules.
* The map: each subpackage's docstring and the README name every module of the tree.
* The names the JSON Schema enumerates are the registries' (the schema cannot import them).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "stablenets"

# Lowest first; a layer is a subpackage (or the standard-library-only modules at the root). A
# module may import its own subpackage and the layers of lower rank; subpackages of one rank
# (evaluation, data) are independent of each other.
LAYERS: list[set[str]] = [
    {"atomic", "errors", "interrupt", "progress"},  # standard library only: every layer uses them
    {"nn"},  # the layers themselves: torch and numpy
    {"evaluation", "data"},  # robustness and metrics (torch, numpy); datasets (h5py)
    {"train"},  # the training loop (it validates with evaluation's metrics)
    {"pipeline"},  # config, Snakemake job specs, entry points, reports: the `pipeline` extra
    {"bench"},  # benchmarks: they validate config.yaml and time the layers
    {"__init__", "__main__"},  # the facade: the public API (lazily) and `python -m stablenets`
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
LIBRARY = {
    "atomic",
    "errors",
    "interrupt",
    "progress",
    "nn",
    "evaluation",
    "train",
}  # torch and numpy only
CORE = {"torch", "numpy"}  # third-party packages the library imports at import time
# Third-party packages a library module imports inside the one function that needs them.
LAZY = {("evaluation.robustness", "pyautoattack")}


def _modules() -> dict[str, ast.Module]:
    """Every module by its dotted name under ``stablenets`` (``nn.models``, ``atomic``)."""
    return {
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts): ast.parse(p.read_text(), str(p))
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def _unit(module: str) -> str:
    """The layer unit of a module: its subpackage, or itself at the root."""
    return module.split(".")[0]


def _imports(tree: ast.Module, top_level_only: bool = False) -> list[tuple[str, int]]:
    """``(name, line)`` of every import: ``stablenets.<module>`` for the package's own, the
    top-level package name for the others. ``top_level_only``: the imports that run when the
    module is imported (not inside functions or ``if TYPE_CHECKING:``)."""
    if top_level_only:
        nodes: list[ast.AST] = []
        todo = list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                todo += node.orelse
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            nodes.append(node)
            todo += [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
    else:
        nodes = list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: within stablenets
                base = f"stablenets.{base}" if base else "stablenets"
            if base == "stablenets":  # from . import x, y / from stablenets import x
                found += [(f"stablenets.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((base, node.lineno))
    return [
        (".".join(name.split(".")[:2]) if name.startswith("stablenets.") else name.split(".")[0],
         line)
        for name, line in found
    ]  # fmt: skip


def test_every_module_has_a_layer():
    units = {_unit(module) for module in _modules()}
    assert units - set(RANK) == set(), "place the new subpackage in a layer of LAYERS"
    assert set(RANK) - units == set(), "LAYERS names a subpackage that does not exist"


def test_no_module_imports_a_layer_above_its_own_or_a_sibling_of_its_rank():
    bad = [
        f"{module}:{line} imports {name}"
        for module, tree in _modules().items()
        for name, line in _imports(tree)
        if name.startswith("stablenets.")
        and (target := name.removeprefix("stablenets.")) in RANK
        and target != _unit(module)
        and RANK[target] >= RANK[_unit(module)]
    ]
    assert bad == []


def _module_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (function-level imports included), by dotted
    name under ``stablenets`` (a package's ``__init__`` is the package's name)."""
    modules = _modules()
    names = {m.removesuffix(".__init__") for m in modules}
    graph: dict[str, set[str]] = {}
    for module, tree in modules.items():
        me = module.removesuffix(".__init__")
        package = module.split(".")[:-1]  # ``bench`` for bench.training and bench.__init__
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("stablenets.") for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per dot
                    parts = package[: len(package) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                elif (node.module or "").startswith("stablenets"):
                    base = node.module.removeprefix("stablenets").lstrip(".")  # type: ignore[union-attr]
                else:
                    continue
                for alias in node.names:  # ``from stablenets.bench import cost``: the module
                    sub = f"{base}.{alias.name}".lstrip(".")
                    deps.add(sub if sub in names else base)
        graph[me] = (deps & names) - {me}
    return graph


def test_no_module_imports_itself_through_others():
    """No import cycle between the package's modules, function-level imports included (a lazy
    import hides a cycle from Python, not from a reader)."""
    graph = _module_graph()
    cycles = []
    for start in graph:  # a path from start back to start
        todo, seen = [(start, [start])], set()
        while todo:
            module, path = todo.pop()
            for dep in graph.get(module, ()):
                if dep == start:
                    cycles.append(" -> ".join([*path, start]))
                elif dep not in seen:
                    seen.add(dep)
                    todo.append((dep, [*path, dep]))
    assert cycles == []


def test_the_library_imports_only_torch_and_numpy_and_only_the_pipeline_knows_snakemake():
    stdlib = sys.stdlib_module_names | {"__future__"}
    modules = _modules()
    library = sorted(m for m in modules if _unit(m) in LIBRARY)
    eager = [
        f"{module}:{line} imports {name} at import time"
        for module in library
        for name, line in _imports(modules[module], top_level_only=True)
        if name not in stdlib and name not in CORE and not name.startswith("stablenets")
    ]
    lazy = [
        f"{module}:{line} imports {name}"
        for module in library
        for name, line in _imports(modules[module])
        if name not in stdlib | CORE
        and not name.startswith("stablenets")
        and (module, name) not in LAZY
    ]
    snakemake = [
        f"{module}:{line} imports {name}"
        for module, tree in modules.items()
        for name, line in _imports(tree)
        if name.startswith("snakemake") and _unit(module) != "pipeline"
    ]
    assert eager == lazy == snakemake == []


def _readme_map() -> dict[str, set[str]]:
    """The README's tree under "## The library": ``{subpackage or "": {module, ...}}``."""
    section = (ROOT / "README.md").read_text().split("## The library", 1)[1].split("\n## ", 1)[0]
    tree: dict[str, set[str]] = {}
    package = ""
    for line in section.splitlines():
        if m := re.match(r"^ {6}(\w+)/", line):
            package = m.group(1)
        elif re.match(r"^ {6}\w", line):
            package = ""
        if line.startswith("    "):  # the indented tree, not the prose around it
            tree.setdefault(package, set()).update(re.findall(r"\b(\w+)\.py\b", line))
    return tree


def test_each_subpackage_docstring_and_the_readme_map_every_module():
    readme = _readme_map()
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        package = "" if path.parent == PACKAGE else path.parent.name
        if path.stem not in {"__init__", "__main__"}:
            modules.setdefault(package, set()).add(path.stem)
    missing_doc = [
        f"{package}/__init__.py does not name stablenets.{package}.{module}"
        for package, names in modules.items()
        if package
        for module in sorted(names)
        if f"stablenets.{package}.{module}"
        not in ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    ]
    assert missing_doc == []
    assert {p: readme.get(p, set()) for p in modules} == modules, (
        "README's map differs from the tree"
    )


# --------------------------------------------------------------------------------------------
# The library without the pipeline extra


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0]


def _closure(names: list[str]) -> set[str]:
    """Distributions that installing ``names`` installs (their dependencies, recursively, with
    environment markers evaluated and no extras)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [n.lower().replace("_", "-") for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # not for this platform (an unmet marker elsewhere), nothing to allow
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name.lower().replace("_", "-"))
    return seen


def _import_names(distributions: set[str]) -> set[str]:
    """Top-level import names that ``distributions`` provide."""
    return {
        module
        for module, dists in metadata.packages_distributions().items()
        if any(d.lower().replace("_", "-") in distributions for d in dists)
    }


NOT_INSTALLED = r"""
import importlib.abc, json, sys

allowed, pipeline = set(json.loads(sys.argv[1])), json.loads(sys.argv[2])
stdlib = sys.stdlib_module_names
refused = set()


class NotInstalled(importlib.abc.MetaPathFinder):
    # What a fresh environment with only `pip install stablenets` lacks: every third-party
    # package outside the core dependencies' closure is not found (find_spec gives None, an
    # import raises ModuleNotFoundError), as if it were not installed.
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if not (top in stdlib or top in allowed or top.startswith("_") or top == "stablenets"):
            refused.add(top)
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

    def invalidate_caches(self):
        for finder in self.finders:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()


sys.meta_path[:] = [NotInstalled(list(sys.meta_path))]
"""

# Trains a small classifier with the library's public API and prints what it did as one JSON
# line (argv[-1]: the working folder); also run in a real fresh environment (tests/test_install.py).
TRAIN_A_SMALL_MODEL = r"""
import json, sys
from pathlib import Path

import torch
import stablenets
from stablenets import build_model
from stablenets.train import ClassificationTask, TrainConfig, train
from stablenets.train.augment import AugmentConfig
from stablenets.evaluation import robustness, metrics, tv, pnp  # noqa
from stablenets.train import cuda_graphs, budget  # noqa
from stablenets.nn import losses  # noqa

torch.manual_seed(0)
model = build_model(
    "nonexpansive_classifier", base_width=4, stages=2, blocks_per_stage=1, input_size=8
)
g = torch.Generator().manual_seed(0)
x, y = torch.rand(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
task = ClassificationTask(x, y, x[:8], y[:8], AugmentConfig(), eval_batch=8)
cfg = TrainConfig(steps=3, batch_size=8, lr_max=0.05, val_every=3, checkpoint_every=3)
model, state = train(model, task, cfg, Path(sys.argv[-1]), "layers", lambda line: None)
with torch.no_grad():  # its own predictions: every point correct, so PGD attacks each
    own = model(x[:4]).argmax(1)
adv = robustness.pgd_l2(model, x[:4], own, 0.1, steps=2)
autoattack = None
try:
    robustness.autoattack_l2(model, x[:4], own, 0.1)
except ModuleNotFoundError as err:
    autoattack = err.name
print(json.dumps({
    "step": state.step, "bound": model.lipschitz_bound(), "moved": float((adv - x[:4]).norm()),
    "autoattack": autoattack, "file": stablenets.__file__, "modules": sorted(sys.modules),
}))
"""


def test_the_library_trains_a_model_without_the_pipeline_extra(tmp_path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = [_requirement_name(r) for r in project["dependencies"]]
    pipeline = [_requirement_name(r) for r in project["optional-dependencies"]["pipeline"]]
    assert sorted(core) == ["numpy", "torch"]
    assert "snakemake" in pipeline
    allowed = _import_names(_closure(core))
    # What the pipeline extra brings beyond the core: the names a library import must not need.
    extra = _import_names(_closure(pipeline)) - allowed
    assert {"snakemake", "h5py", "pandas", "yaml", "jsonschema", "pyautoattack"} <= extra
    proc = subprocess.run(
        [sys.executable, "-I", "-c", NOT_INSTALLED + TRAIN_A_SMALL_MODEL,
         json.dumps(sorted(allowed)), json.dumps(sorted(extra)), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert_trained_alone(got, tmp_path, extra)


def assert_trained_alone(got: dict, workdir: Path, pipeline_modules: set[str]) -> None:
    """What ``TRAIN_A_SMALL_MODEL`` printed: three steps trained, a finite certified bound, a PGD
    step inside its radius, AutoAttack missing (the one function that needs the extra), no
    pipeline package imported, the checkpoint written."""
    assert got["step"] == 3 and 0 < got["bound"] < float("inf")
    assert 0 < got["moved"] <= 0.1 * 4**0.5 + 1e-6
    assert got["autoattack"] == "pyautoattack"
    assert [m for m in got["modules"] if m.partition(".")[0] in pipeline_modules] == []
    assert (workdir / "checkpoint.pt").exists()


# --------------------------------------------------------------------------------------------
# One source of truth: the schema's enumerations are the registries'


def _schema() -> dict:
    return yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())


def test_the_schema_enumerates_the_registries():
    from stablenets.nn.activations import ACTIVATIONS
    from stablenets.nn.integrators import INTEGRATORS
    from stablenets.nn.models import CLASSIFIERS, DENOISER_BLOCKS, DENOISERS, MODELS

    defs = _schema()["$defs"]
    kwargs = defs["model_kwargs"]["properties"]
    model = defs["variants"]["additionalProperties"]["properties"]["model"]
    assert sorted(model["enum"]) == sorted(MODELS) == sorted(CLASSIFIERS | DENOISERS)
    assert sorted(kwargs["integrator"]["enum"]) == sorted(INTEGRATORS)
    assert sorted(kwargs["block"]["enum"]) == sorted(DENOISER_BLOCKS)
    assert set(kwargs["activation"]["enum"]) <= set(ACTIVATIONS)


def test_the_benchmark_counts_the_stages_of_the_integrators_tableaux():
    from stablenets.bench.rows import STAGES
    from stablenets.nn.integrators import INTEGRATORS

    assert STAGES == {n: len(t.b) for n, t in INTEGRATORS.items()}
    assert STAGES["rk4"] == 4 and STAGES["euler"] == 1


# --------------------------------------------------------------------------------------------
# The public API


def test_import_stablenets_gives_the_api_and_the_subpackages_and_imports_torch_only_on_use():
    script = (
        "import json, sys, stablenets\n"
        "before = 'torch' in sys.modules\n"
        "subpackages = [getattr(stablenets, n).__name__ for n in stablenets.SUBPACKAGES]\n"
        "model = stablenets.build_model('dncnn', width=4, depth=3, input_size=8)\n"
        "print(json.dumps({'before': before, 'subpackages': subpackages,\n"
        "                  'api': sorted(stablenets.__all__), 'model': type(model).__name__}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    got = json.loads(proc.stdout)
    assert got["before"] is False
    assert sorted(got["subpackages"]) == sorted(
        f"stablenets.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")
    )
    assert got["api"] == ["build_model", "load_model", "save_model"] and got["model"] == "DnCNN"


def test_the_model_jobs_entry_point_imports_no_plotting_or_table_library():
    """Every training, evaluation and deblurring job starts by importing ``pipeline.jobs``;
    pandas, matplotlib, seaborn and its scipy (a second per start, 49 starts in the smoke run)
    are the report jobs' alone."""
    script = "import sys, stablenets.pipeline.jobs\nprint(' '.join(sorted(sys.modules)))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    loaded = {name.split(".")[0] for name in proc.stdout.split()}
    assert "torch" in loaded and not loaded & {"pandas", "matplotlib", "seaborn", "scipy"}
