"""The registry of tables and figures (``pipeline.outputs``) and the one reader of result files.

Each output is declared once, at the function that builds it; the rules, the report entry points,
the summary and the report captions all follow from that declaration.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import jinja2
import numpy as np
import pandas as pd
import pytest
from fake_results import write_pnp

from stablenets.pipeline import outputs, reports, specs
from stablenets.pipeline.config import load_config
from stablenets.pipeline.runtime import RUN_RECORD, content_sha256, read_results, write_results

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "workflow" / "report"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
CONFIGS = {
    "paper": [ROOT / "config.yaml"],
    "smoke": [ROOT / "config.yaml", ROOT / "config" / "smoke.yaml"],
}


@pytest.fixture()
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the registry for a test to declare toy outputs in, restored afterwards (the real
    declarations are loaded first, so they stay in the original)."""
    for kind in outputs.KINDS:
        outputs.registered(kind)
    copy = {kind: dict(declared) for kind, declared in outputs._REGISTRY.items()}
    monkeypatch.setattr(outputs, "_REGISTRY", copy)


def _render(template: str, config: dict, kind: str, name: str) -> str:
    """A caption as ``snakemake --report`` renders it (Snakemake 9: a loader-less environment,
    ``trim_blocks`` and ``lstrip_blocks``), strict about undefined names."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    snakemake = SimpleNamespace(
        config=config,
        wildcards=SimpleNamespace(**{kind: name}),
        params=SimpleNamespace(**specs.Jobs(config).caption_params()),  # what the rules pass
    )
    macros = outputs.caption_macros(CAPTIONS)  # what report_caption puts first
    if not template.startswith(macros):
        template = macros + template
    return env.from_string(template).render(snakemake=snakemake)


# ---------------------------------------------------------------------------- the declarations


@pytest.mark.parametrize("kind", list(outputs.KINDS))
def test_every_output_reads_a_real_target_list_and_has_a_caption_file(kind: str) -> None:
    jobs = specs.Jobs(load_config(CONFIGS["smoke"], SCHEMA))
    for name, output in outputs.registered(kind).items():
        assert (output.kind, output.name) == (kind, name)
        files = getattr(jobs, output.source)(lambda path: f"results/smoke/{path}")
        assert files and all(isinstance(f, str) for f in files), output.source
        assert (CAPTIONS / f"{kind}s" / f"{name}.rst").is_file(), name
    captions = {p.stem for p in (CAPTIONS / f"{kind}s").glob("*.rst")}
    assert captions == set(outputs.names(kind)), "a caption file without its output"


def test_every_table_declares_its_caption_and_summary_title() -> None:
    for table in outputs.registered("table").values():
        assert table.caption and table.title, table.name
    headlines = {n for n, t in outputs.registered("table").items() if t.headline is not None}
    assert headlines == {"classification", "denoising", "pnp"}


def test_the_rules_and_targets_take_their_names_from_the_registry() -> None:
    jobs = specs.Jobs(load_config(CONFIGS["smoke"], SCHEMA))
    targets = set(jobs.final_outputs(lambda path: path))
    expected = {f"tables/{t}.{ext}" for t in outputs.names("table") for ext in ("csv", "md", "tex")}
    expected |= {f"figures/{f}.{ext}" for f in outputs.names("figure") for ext in ("pdf", "png")}
    assert targets == expected | {"summary.md"}
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    assert 'TABLES, FIGURES = outputs.names("table"), outputs.names("figure")' in common
    rules = (ROOT / "workflow" / "rules" / "figures.smk").read_text()
    for kind, names in (("table", "TABLES"), ("figure", "FIGURES")):
        assert f'{kind}="|".join({names})' in rules and f'caption=CAPTIONS["{kind}"]' in rules


def test_a_name_is_declared_once_and_an_unknown_one_is_named(registry: None) -> None:
    with pytest.raises(ValueError, match="'robustness' is declared twice"):
        outputs.figure(name="robustness", source="classification_evals")(lambda paths, stem: None)
    with pytest.raises(ValueError, match="no table named 'nope'; declared: classification"):
        outputs.get("table", "nope")


# ---------------------------------------------------------------------------- a toy output


def _toy_results(root: Path) -> list[Path]:
    return [write_pnp(root, v, 0, {"mean_psnr": psnr}, {}) for v, psnr in (("a", 20), ("b", 30))]


def test_a_declared_table_is_built_summarised_and_headlined(registry: None, tmp_path) -> None:
    @outputs.table(
        name="toy",
        source="pnp_runs",
        caption="Toy results",
        title="A toy table",
        headline=lambda row: f"- toy {row['variant']}: {row['psnr']:.1f} dB",
    )
    def toy_table(paths):
        rows = [read_results(p, ())[0] for p in paths]
        return pd.DataFrame({"variant": [r["variant"] for r in rows],
                             "psnr": [r["mean_psnr"] for r in rows]})  # fmt: skip

    out = tmp_path / "results" / "tables" / "toy.csv"
    config = load_config(CONFIGS["smoke"], SCHEMA)
    jobs, here = specs.Jobs(config), lambda path: path
    spec = json.loads(jobs.report_spec("table", "toy"))
    reports.make_table(spec, _toy_results(tmp_path), out, log=lambda line: None)
    assert pd.read_csv(out)["psnr"].tolist() == [20.0, 30.0]
    caption = "Toy results; photos stand-in for BSDS500, smoke scale"
    assert out.with_suffix(".md").read_text().startswith(caption + "\n")
    assert f"\\caption{{{caption}}}" in out.with_suffix(".tex").read_text()
    assert jobs.inputs("table", "toy", here) == jobs.pnp_runs(here)  # what its rule reads
    spec = {"scale": "smoke", "config": config}
    summary = tmp_path / "results" / "summary.md"
    (tmp_path / "results" / "figures").mkdir()
    # a killed writer's temporary, a figure of an earlier config: neither is the rule's input
    for drawn in (".robustness.png.1kijrzog.png", "removed.png"):
        (tmp_path / "results" / "figures" / drawn).touch()
    reports.write_summary(spec, [out.with_suffix(".md")], summary, log=lambda line: None)
    text = summary.read_text()
    assert "- toy a: 20.0 dB\n- toy b: 30.0 dB" in text and "## A toy table\n\nToy results" in text
    listed = ", ".join(sorted(outputs.names("figure")))
    assert f"- figures: `results/smoke/figures/*.{{pdf,png}}` ({listed})\n" in text
    assert "removed" not in text and "1kijrzog" not in text


def test_a_declared_figure_is_drawn_through_the_one_call(registry: None, tmp_path) -> None:
    drawn = []

    @outputs.figure(
        name="toy",
        source="pnp_runs",
        inputs=lambda paths: sorted(p.parent.name for p in paths),
        options=lambda spec: {"label": spec["label"]},
    )
    def toy_figure(variants, stem, label):
        drawn.append((variants, stem.name, label))

    out = tmp_path / "figures" / "toy.pdf"
    spec = {"kind": "toy", "label": "σ"}
    reports.make_figure(spec, _toy_results(tmp_path), out, log=lambda line: None)
    assert drawn == [(["a", "b"], "toy", "σ")]
    assert json.loads(out.with_suffix(".provenance.json").read_text())["output"] == "toy.pdf"


# ---------------------------------------------------------------------------- report captions


@pytest.mark.parametrize("kind", list(outputs.KINDS))
@pytest.mark.parametrize("scale", list(CONFIGS))
def test_the_rule_caption_shows_each_outputs_own_caption(kind: str, scale: str, tmp_path) -> None:
    """The joined template renders, for each output, exactly its own file, with the config's
    values (and no undefined name, at either scale)."""
    config = load_config(CONFIGS[scale], SCHEMA)
    joined = Path(outputs.report_caption(kind, CAPTIONS, tmp_path / f"{kind}.rst")).read_text()
    for name in outputs.names(kind):
        own = (CAPTIONS / f"{kind}s" / f"{name}.rst").read_text()
        shown = _render(joined, config, kind, name)
        # Jinja drops the newline that ends a template: the joined one has it before `elif`
        assert shown.rstrip("\n") == _render(own, config, kind, name)
        assert shown.strip() and "{{" not in shown
        if kind == "table":  # the report embeds the CSV: the caption says where the rest is
            assert f"tables/{name}.md" in " ".join(shown.split()), name


OWN_SETTINGS = {  # caption -> what it says of the smoke config's variants' own training settings
    "tables/classification.rst": "override these: nonexpansive: lr_max 0.1; resnet: warmup 0.2, lr_max 0.02)",
    "tables/denoising.rst": "override these: dncnn: lr_max 0.2, steps 1000)",
    "figures/training_classification.rst": "the defaults: nonexpansive: lr_max 0.1; resnet: warmup 0.2, lr_max 0.02)",
    "figures/training_denoising.rst": "the defaults: dncnn: lr_max 0.2, steps 1000)",
}


@pytest.mark.parametrize("caption", sorted(OWN_SETTINGS))
def test_captions_list_each_variants_own_training_settings_but_the_loss(caption: str) -> None:
    """A reader of the tables sees which variants trained otherwise than the defaults the
    caption states (the loss has its own table column)."""
    config = load_config(CONFIGS["smoke"], SCHEMA)
    margin = {"name": "margin", "offset": 0.1, "temperature": 0.25}
    config["classification"]["variants"]["resnet"]["train"]["loss"] = margin
    kind, name = caption.removesuffix(".rst").split("/")
    shown = " ".join(_render((CAPTIONS / caption).read_text(), config, kind[:-1], name).split())
    assert OWN_SETTINGS[caption] in shown


def test_the_rule_caption_is_rewritten_only_when_it_changes(tmp_path) -> None:
    out = tmp_path / "table.rst"
    outputs.report_caption("table", CAPTIONS, out)
    before = out.stat().st_mtime_ns
    outputs.report_caption("table", CAPTIONS, out)
    assert out.stat().st_mtime_ns == before


def test_a_missing_caption_fails_when_the_workflow_is_parsed(registry: None, tmp_path) -> None:
    outputs.figure(name="uncaptioned", source="pnp_runs")(lambda paths, stem: None)
    with pytest.raises(ValueError, match=r"figures/uncaptioned\.rst"):
        outputs.report_caption("figure", CAPTIONS, tmp_path / "figure.rst")


# ---------------------------------------------------------------------------- one reader


def test_the_reader_converts_attributes_one_way(tmp_path) -> None:
    path = tmp_path / "r.h5"
    write_results(path, {"n": 3, "x": 0.5, "flag": True, "none": None, "cfg": {"a": [1]},
                         "name": "euler"}, {"a/b": np.arange(3), "c": np.ones(2)})  # fmt: skip
    with h5py.File(path, "r+") as fh:  # what other writers may leave: numpy bools, bytes
        fh.attrs["np_flag"] = np.bool_(True)
        fh.attrs["raw"] = np.bytes_(b"abc")
    attrs, data = read_results(path)
    assert {k: type(v) for k, v in attrs.items()} == {
        "n": int, "x": float, "flag": int, "none": float, "cfg": str, "name": str,
        "np_flag": bool, "raw": str,
    }  # fmt: skip
    assert (
        attrs["raw"] == "abc"
        and math.isnan(attrs["none"])
        and json.loads(attrs["cfg"]) == {"a": [1]}
    )
    assert sorted(data) == ["a/b", "c"] and data["a/b"].tolist() == [0, 1, 2]
    assert list(read_results(path, ["c", "missing", "a"])[1]) == ["c"]  # a group is no dataset


def test_only_the_runtime_opens_result_files_in_the_pipeline() -> None:
    pipeline = ROOT / "src" / "stablenets" / "pipeline"
    opening = sorted(p.name for p in pipeline.glob("*.py") if "h5py.File(" in p.read_text())
    assert opening == ["runtime.py"]


def imported_by(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh Python has imported once it ran ``code``."""
    script = f"import sys\n{code}\nprint(sorted(m for m in {modules!r} if m in sys.modules))\n"
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.replace("'", '"'))


def test_the_report_jobs_start_without_torch() -> None:
    code = (
        "from stablenets.pipeline import cli, outputs\n"
        "for job in ('table', 'figure', 'summary'):\n"
        "    cli._job(job)\n"
        "for kind in outputs.KINDS:\n"
        "    outputs.registered(kind)"
    )
    assert imported_by(code, ("torch", "torchvision")) == []


def test_reading_the_registry_imports_no_seaborn() -> None:
    """Every Snakemake start reads it (``common.smk``): seaborn and the scipy.stats it imports
    took 1.8 s of each start; only drawing a figure needs seaborn."""
    code = "from stablenets.pipeline import outputs\nfor kind in outputs.KINDS:\n    outputs.names(kind)"
    assert imported_by(code, ("seaborn", "scipy.stats")) == []


@pytest.mark.parametrize(
    "caption",
    ["tables/classification.rst", "tables/families.rst", "figures/robustness.rst",
     "figures/families.rst"],
)  # fmt: skip
def test_the_classification_captions_name_the_attack_that_ran_and_the_test_images_scored(
    caption: str,
) -> None:
    """At smoke scale the strong attack is APGD-CE with 10 iterations on the first 50 test
    images; the captions said ``autoattack`` (the method's name) and nothing of the images."""
    config = load_config(CONFIGS["smoke"], SCHEMA)
    kind, name = caption.removesuffix(".rst").split("/")
    shown = " ".join(_render((CAPTIONS / caption).read_text(), config, kind[:-1], name).split())
    assert "``autoattack apgd-ce (10 iterations)``" in shown
    assert "the first 50 test images" in shown
    paper = load_config(CONFIGS["paper"], SCHEMA)
    shown = " ".join(_render((CAPTIONS / caption).read_text(), paper, kind[:-1], name).split())
    assert "every test image" in shown
    rules = (ROOT / "workflow" / "rules" / "figures.smk").read_text()
    assert rules.count("**JOBS.caption_params(),") == 2  # the table and figure rules


def test_the_robustness_caption_names_grid_attacks_only_where_autoattack_runs_them() -> None:
    """``config.yaml`` sets ``grid_attacks``; with ``strong.method: pgd`` they never run, yet the
    caption said "there with AutoAttack's apgd-ce, apgd-t" beside the PGD attack's label."""
    paper = load_config(CONFIGS["paper"], SCHEMA)
    text = (CAPTIONS / "figures/robustness.rst").read_text()
    shown = " ".join(_render(text, paper, "figure", "robustness").split())
    assert "there with AutoAttack's apgd-ce, apgd-t" in shown
    paper["classification"]["evaluate"]["strong"]["method"] = "pgd"
    shown = " ".join(_render(text, paper, "figure", "robustness").split())
    assert "``pgd (100 steps x 5)``" in shown and "AutoAttack's" not in shown


def test_the_robustness_figure_draws_the_paper_models_unless_the_config_names_others() -> None:
    """With every layer family at every width, 18 classifiers drew 54 curves in one plot; the
    families figure compares them, the robustness figure shows the variants without a size."""
    paper = load_config(CONFIGS["paper"], SCHEMA)
    assert len(paper["classification"]["variants"]) == 18
    drawn = specs.Jobs(paper).robustness_evals(lambda path: path)
    assert drawn == [f"eval/classification/{v}/seed0.h5" for v in ("nonexpansive", "resnet")]
    assert outputs.get("figure", "robustness").source == "robustness_evals"
    paper["classification"]["robustness_figure"] = ["resnet", "cpl_S"]
    drawn = specs.Jobs(paper).robustness_evals(lambda path: path)
    assert drawn == [f"eval/classification/{v}/seed0.h5" for v in ("resnet", "cpl_S")]
    families = {k: v for k, v in paper["classification"]["variants"].items() if "size" in v}
    paper["classification"].update(variants=families, robustness_figure=None)
    assert len(specs.Jobs(paper).robustness_evals(lambda path: path)) == 16  # each has a size


def test_an_inputs_content_digest_sees_its_numbers_and_model_not_the_record_of_its_run(tmp_path):
    """Saved progress keyed on an input's file bytes: a model saved again by a resumed training
    (its new times and memory) or data written again under a new commit threw a finished
    evaluation's saved sweep away. The content digest changes with a weight, a pixel or an
    attribute the file holds, not with the run record ``provenance`` writes."""
    import torch

    from stablenets.nn.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", base_width=4, stages=1, input_size=8)
    a, b, c = (tmp_path / f"{n}.pt" for n in "abc")
    save_model(model, a, train_time_s=1.0, git_commit="1" * 40, peak_memory_mb=3.0)
    save_model(model, b, train_time_s=2.5, git_commit="2" * 40, peak_memory_mb=9.0)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    save_model(model, c, train_time_s=1.0, git_commit="1" * 40, peak_memory_mb=3.0)
    assert a.read_bytes() != b.read_bytes()
    assert content_sha256(a) == content_sha256(b) != content_sha256(c)

    images = np.arange(96, dtype=np.uint8).reshape(2, 3, 4, 4)
    record = {key: f"run {i}" for i, key in enumerate(RUN_RECORD)}
    write_results(tmp_path / "d.h5", {"task": "denoising", **record}, {"test/images": images})
    first = content_sha256(tmp_path / "d.h5")
    write_results(tmp_path / "d.h5", {"task": "denoising"}, {"test/images": images})
    assert content_sha256(tmp_path / "d.h5") == first
    for attrs, pixels in [
        ({"task": "classification"}, images),
        ({"task": "denoising"}, images ^ 1),
    ]:
        write_results(tmp_path / "d.h5", attrs, {"test/images": pixels})
        assert content_sha256(tmp_path / "d.h5") != first
