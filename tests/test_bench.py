"""The benchmark and the speed paths it measures: fast, and semantics-preserving.

* the quick benchmark runs and writes a well-formed CSV;
* the plain reference computes the same function as the library's models (float64, same weights,
  same sub-step counts), so the benchmark's ratio compares like with like;
* the fused power iteration is the per-operator one (and still a lower bound), and its host copy
  of the estimates is never stale;
* sub-step activation checkpointing leaves the gradients bitwise unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from stablenets.bench import cost
from stablenets.bench import training as bench
from stablenets.bench.reference import from_model
from stablenets.bench.rows import MODEL_SPECS
from stablenets.nn.models import build_model
from stablenets.nn.operators import power_iteration_all
from stablenets.pipeline.config import ConfigError, load_config, validate_config
from stablenets.train.cuda_graphs import StepGraphs
from stablenets.train.memory import ActivationCost, is_out_of_memory

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / bench.SCHEMA


CAPTURE_S = 1000.0  # what a stubbed capture takes of the clock (``fake_cuda_graphs``)


def fake_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """torch.cuda's streams and graphs stubbed (no GPU here), so that the real ``StepGraphs``
    runs on the CPU: a capture runs its work eagerly, a replay does nothing. Each capture takes
    ``CAPTURE_S`` of ``time.perf_counter``, a clock then that far ahead (no real time); the
    returned list holds how far."""
    ahead, real = [0.0], time.perf_counter

    class Stream:
        def wait_stream(self, other: object) -> None:
            pass

    class Graph:
        def replay(self) -> None:
            pass

    @contextlib.contextmanager
    def graph(g: Graph, pool: object = None) -> Iterator[None]:
        yield
        ahead[0] += CAPTURE_S

    stubs = {"graph_pool_handle": lambda: None, "Stream": Stream, "current_stream": Stream,
             "stream": lambda s: contextlib.nullcontext(), "CUDAGraph": Graph, "graph": graph,
             "synchronize": lambda: None}  # fmt: skip
    for name, stub in stubs.items():
        monkeypatch.setattr(torch.cuda, name, stub)
    monkeypatch.setattr(time, "perf_counter", lambda: real() + ahead[0])
    return ahead


def _stretch(model, factor: float):
    """Longer integration times: several sub-steps per block."""
    with torch.no_grad():
        for block in model.constrained_blocks():
            block.time.mul_(factor)
    return model


def test_quick_bench_writes_a_well_formed_csv(tmp_path):
    out = tmp_path / "cpu.csv"
    rows = bench.main(
        [
            "--quick",
            "--models",
            "classifier,resnet,denoiser",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--inprocess",
            "--out",
            str(out),
        ]
    )
    with out.open() as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0]) == bench.COLUMNS
    assert [(r["model"], r["impl"]) for r in read] == [
        ("classifier", "ours"),
        ("classifier", "reference"),
        ("resnet", "ours"),
        ("denoiser", "ours"),
        ("denoiser", "reference"),
    ]
    assert len(rows) == len(read)
    for r in read:
        assert r["device"] == "cpu" and r["threads"] == "1" and r["torch"] == torch.__version__
        assert float(r["steps_per_s"]) > 0 and float(r["flops_per_step"]) > 0
        assert float(r["peak_mem_mb"]) > 0 and float(r["device_peak_gflops"]) > 0
        if r["model"] in ("classifier", "denoiser"):
            assert int(r["substeps_total"]) >= int(r["blocks"]) > 0
        if r["impl"] == "ours" and r["model"] != "resnet":
            assert float(r["ratio_vs_reference"]) > 0
    ours, ref = read[0], read[1]
    assert ours["substeps_total"] == ref["substeps_total"]
    assert float(ours["flops_per_step"]) == pytest.approx(float(ref["flops_per_step"]), rel=0.05)


def test_a_graphed_benchmark_times_no_capture_and_is_replayed_only_when_none_happened(monkeypatch):
    """``--cuda-graphs``: step 1 runs eagerly and step 2 captures (``StepGraphs``), so the
    warm-up is at least those two (the default ``--warmup 1`` timed the capture); and a row is
    ``replayed`` only when its timed steps neither ran eagerly nor captured (a key seen once in
    the warm-up is captured in a timed step, which is no eager step)."""
    fake_cuda_graphs(monkeypatch)
    model = torch.nn.Linear(4, 2)

    def forward_loss(x: torch.Tensor, t: torch.Tensor, capturing: bool):
        out = model(x)
        return out, torch.nn.functional.cross_entropy(out, t)

    def worker(batches: list[int], warmup: int) -> dict:
        graphs, sizes = StepGraphs(model, forward_loss, 8, lambda _: None), iter(batches)

        def step() -> None:
            n = next(sizes)
            graphs(torch.rand(n, 4), torch.zeros(n, dtype=torch.long))

        monkeypatch.setattr(bench, "_build", lambda job, device: (model, None, None, None, None))
        monkeypatch.setattr(bench, "_stepper", lambda *args: (step, graphs))
        job = {"threads": torch.get_num_threads(), "device": "cpu", "warmup": warmup, "steps": 3,
               "flops": False}  # fmt: skip
        return bench.run_worker(job)

    same = worker([3] * 5, warmup=1)  # warm-up: eager, capture; timed: 3 replays
    assert same["graphs"] == "replayed" and same["elapsed"] < CAPTURE_S
    late = worker([3, 5, 3, 3, 3], warmup=2)  # warm-up: two keys once each; timed: a capture
    assert late["graphs"] != "replayed" and "1 captured, 3 steps replayed" in late["graphs"]


@pytest.mark.parametrize(
    "name, kwargs, size",
    [
        ("nonexpansive_classifier", {"integrator": "euler"}, 16),
        ("nonexpansive_classifier", {"integrator": "heun", "theta": 0.7}, 16),
        ("nonexpansive_denoiser", {"integrator": "rk4", "residual": True}, (12, 10)),
        ("nonexpansive_denoiser", {"integrator": "euler", "theta": 0.5}, (12, 10)),
        ("nonexpansive_denoiser", {"integrator": "ssprk3"}, (12, 10)),
    ],
)
def test_reference_computes_the_same_function_in_float64(name, kwargs, size):
    torch.manual_seed(0)
    small = (
        {"base_width": 4, "blocks_per_stage": 2}
        if "classifier" in name
        else {"width": 6, "depth": 3}
    )
    model = build_model(name, input_size=size, **small, **kwargs)
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases, so every term of the field matters
            p.add_(0.1 * torch.randn_like(p))
    model = _stretch(model, 2.6).double().train()
    reference = from_model(model)
    hw = (size, size) if isinstance(size, int) else size
    x = torch.rand(3, 3, *hw, dtype=torch.float64)
    y = model(x)
    counts = [n for n, _ in model.block_stats()]
    assert min(counts) >= 2
    y_ref = reference(x, counts)
    assert reference.total_substeps() == sum(counts)
    torch.testing.assert_close(y_ref, y, rtol=1e-12, atol=1e-12)
    # Same gradients too: the two training steps do the same work.
    (g,) = torch.autograd.grad(y.square().sum(), next(model.constrained_blocks()).operator.weight)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), reference.blocks[0].weight)
    torch.testing.assert_close(g_ref, g, rtol=1e-10, atol=1e-12)


def test_reference_rejects_models_without_a_plain_twin():
    with pytest.raises(ValueError, match="no reference"):
        from_model(build_model("dncnn", width=4, depth=3, input_size=8))


def test_fused_power_iteration_matches_the_per_operator_one():
    torch.manual_seed(1)
    model = build_model(
        "nonexpansive_classifier", base_width=4, blocks_per_stage=3, input_size=16
    ).train()
    twin = copy.deepcopy(model)
    ops = [b.operator for b in model.constrained_blocks()]
    twin_ops = [b.operator for b in twin.constrained_blocks()]
    for _ in range(3):
        values = power_iteration_all(ops, 2)
        for op in twin_ops:
            op.power_iteration(2)
    for op, twin_op, value in zip(ops, twin_ops, values, strict=True):
        torch.testing.assert_close(op.u, twin_op.u, rtol=1e-5, atol=1e-6)
        assert value == pytest.approx(float(twin_op.sigma_estimate), rel=1e-6)
        assert value == float(op.sigma_estimate) == op.sigma_value()
        assert value <= op.norm_bound(op.power_size)  # still a lower bound


def test_host_copy_of_the_estimate_is_never_stale():
    torch.manual_seed(2)
    model = build_model("nonexpansive_denoiser", width=4, depth=2, input_size=8).train()
    ops = [b.operator for b in model.constrained_blocks()]
    power_iteration_all(ops, 1)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ops[0].sigma_estimate.fill_(3.0)
    assert ops[0].sigma_value() == 3.0
    model.load_state_dict(state)
    assert ops[0].sigma_value() == float(state["blocks.0.operator.sigma_estimate"])
    power_iteration_all(ops, 1)
    model.double()
    assert ops[1].sigma_value() == float(ops[1].sigma_estimate)


@pytest.mark.parametrize("integrator", ["euler", "rk4"])
def test_substep_checkpointing_gives_the_same_gradients(integrator):
    torch.manual_seed(3)
    model = _stretch(
        build_model(
            "nonexpansive_denoiser", width=6, depth=2, input_size=10, integrator=integrator
        ),
        3.0,
    ).train()
    x = torch.rand(2, 3, 10, 10)
    grads = []
    for remat in (False, True):
        for block in model.constrained_blocks():
            block.checkpoint_substeps = remat
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert model.total_substeps() >= 4
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_plain_pair_is_the_cpl_block_without_its_norm_machinery():
    """``x - h W^T sigma(W x + b)`` at the CPL step: the same function as the CPL classifier in
    training mode (one sub-step at the estimate's step), with no power iteration at all."""
    torch.manual_seed(4)
    model = build_model("cpl_classifier", base_width=4, blocks_per_stage=2, input_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = model.double().train()
    plain = from_model(model, plain=True)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-12, atol=1e-12)
    u = [b.u.clone() for b in plain.blocks]
    plain.update_norms()  # a no-op: the floor has no norm estimate to update
    assert all(torch.equal(a, b.u) for a, b in zip(u, plain.blocks, strict=True))
    assert plain.total_substeps() == len(plain.blocks) == 6
    with pytest.raises(ValueError, match="plain=True"):
        from_model(model)


@pytest.mark.parametrize("name", ["sll", "aol", "dncnn"])
def test_flop_count_splits_per_image_and_weight_only_work_exactly(name):
    """The batch-1/batch-2 split extrapolates to the FLOPs counted directly at the real batch
    (SLL's and AOL's rescalings are counted once, not once per image)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = MODEL_SPECS[name]
    batch, size, kwargs = bench.QUICK[name]
    size = (16, 16) if spec["task"] == "classification" else (16, 20)  # under the 64x64 probe
    torch.manual_seed(5)
    model = build_model(spec["model"], input_size=list(size), **kwargs).train()
    job = dict(model=name, impl="ours", batch=5, size=list(size))
    counted = bench._count_flops(job, model, None, torch.device("cpu"))
    x = torch.rand(5, 3, *size)
    with FlopCounterMode(display=False) as direct:
        out = model(x)
        loss = (
            torch.nn.functional.cross_entropy(out, torch.zeros(5, dtype=torch.long))
            if spec["task"] == "classification"
            else torch.nn.functional.mse_loss(out, x)
        )
        loss.backward()
    with FlopCounterMode(display=False) as norms:
        if hasattr(model, "constrained_blocks"):
            from stablenets.train.loop import update_norms

            update_norms(model, 1)
    assert counted == direct.get_total_flops() + norms.get_total_flops()
    if name != "dncnn":  # the weight-only part is really there and not multiplied by the batch
        one = bench._count_flops(dict(job, batch=1), model, None, torch.device("cpu"))
        assert counted < 5 * one


def test_family_bench_reports_time_relative_to_cpl_and_the_plain_pair(tmp_path):
    out = tmp_path / "cpu.csv"
    bench.main(
        ["--quick", "--models", "cpl,sll,orthogonal", "--widths", "4,8", "--steps", "1",
         "--warmup", "1", "--repeats", "1", "--device", "cpu", "--inprocess", "--out", str(out)]
    )  # fmt: skip
    with out.open() as fh:
        rows = {(r["model"], r["impl"], r["base_width"]): r for r in csv.DictReader(fh)}
    assert set(rows) == {
        (m, i, w)
        for w in ("4", "8")
        for m, i in [("cpl", "ours"), ("cpl", "plain"), ("sll", "ours"), ("orthogonal", "ours")]
    }
    # epoch_s: steps of one epoch of config.yaml's CIFAR-10 training split (47,500 / 2,500)
    images = bench.epoch_images(load_config(ROOT / "config.yaml", SCHEMA))
    assert images == 47_500
    for (_, _, width), r in rows.items():
        cpl = rows[("cpl", "ours", width)]
        ratio = float(r["step_ms"]) / float(cpl["step_ms"])
        assert float(r["time_vs_cpl"]) == pytest.approx(ratio, rel=1e-2)
        assert float(r["epoch_s"]) == pytest.approx(
            math.ceil(images / 16) * float(r["step_ms"]) / 1000, rel=1e-2
        )
        assert int(r["blocks"]) == 6
    assert float(rows[("cpl", "ours", "8")]["ratio_vs_reference"]) == pytest.approx(
        float(rows[("cpl", "plain", "8")]["step_ms"])
        / float(rows[("cpl", "ours", "8")]["step_ms"]),
        rel=1e-2,
    )


def test_projection_covers_every_family_and_size_and_budgets(tmp_path):
    """GPU-hours per config row: steps x step time at the variant's width, x seeds; a minutes
    budget costs exactly that; a width that was not benchmarked is said so, not guessed."""
    rows = [
        dict({c: "" for c in bench.COLUMNS}, model=m, impl="ours", base_width=str(w),
             batch="128", height="32", width="32", step_ms=str(ms))
        for m, w, ms in [("cpl", 16, 10.0), ("cpl", 32, 20.0), ("sll", 16, 30.0),
                         ("classifier", 16, 50.0)]
    ]  # fmt: skip
    csv_path = tmp_path / "cuda.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=bench.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    train = {"steps": 3600, "batch_size": 128}
    config = yaml.safe_load((ROOT / "config.yaml").read_text())  # --project validates it
    config["seeds"] = [0, 1]
    config["classification"].update({
        "train": train,
        "sizes": {"XS": 16, "S": 32, "M": 64},
        "variants": {
            "nonexpansive": {"model": "nonexpansive_classifier"},
            "cpl_XS": {"model": "cpl_classifier", "size": "XS"},
            "cpl_S": {"model": "cpl_classifier", "size": "S", "train": {"batch_size": 256}},
            "cpl_M": {"model": "cpl_classifier", "size": "M"},
            "sll_XS": {"model": "sll_classifier", "size": "XS", "train": {"budget_minutes": 90}},
        },
    })  # fmt: skip
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    projected = bench.project_hours(csv_path, cfg_path, schema=SCHEMA)
    got = {label: (jobs, hours) for label, jobs, hours in projected}
    assert got["classification/nonexpansive"] == (2, pytest.approx(2 * 3600 * 0.050 / 3600))
    assert got["classification/cpl_XS"] == (2, pytest.approx(2 * 0.010))
    assert got["classification/cpl_S"] == (2, pytest.approx(2 * 0.020 * 2))  # twice the batch
    assert got["classification/sll_XS"] == (2, pytest.approx(2 * 1.5))
    assert got["classification/cpl_M (cpl_classifier at width 64 not benchmarked)"] == (0, 0.0)

    # Each variant is timed by the rows of its own settings: CUDA graphs where they replay (a
    # second file adds those rows), with the margin loss too; where no row was replayed (cpl at
    # width 32 here; the orthogonal family, whose capture fails) the eager row, an upper bound.
    graphs_csv = tmp_path / "graphs.csv"
    with graphs_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=bench.COLUMNS)
        writer.writeheader()
        for row in rows[:1] + rows[-1:]:
            writer.writerow(dict(row, step_ms="5.0", options="cuda_graphs replayed"))
    config["classification"]["train"] = dict(train, cuda_graphs=True)
    margin = {"name": "margin", "offset": 0.1}
    config["classification"]["variants"]["cpl_XS"]["train"] = {"loss": margin}
    config["classification"]["variants"]["cpl_S"]["train"]["loss"] = margin
    config["classification"]["variants"]["cpl_M"]["train"] = {"amp": True}
    cfg_path.write_text(yaml.safe_dump(config))
    projected = bench.project_hours([csv_path, graphs_csv], cfg_path, schema=SCHEMA)
    got = {label: hours for label, _, hours in projected}
    assert got["classification/nonexpansive"] == pytest.approx(2 * 0.005)
    # the benchmark times the task's cross-entropy step: a margin-loss variant says it assumes so
    assumed = " (margin loss: the cross-entropy step's time assumed)"
    assert got["classification/cpl_XS" + assumed] == pytest.approx(2 * 0.005)  # replayed
    assert got["classification/cpl_S" + assumed] == pytest.approx(2 * 0.020 * 2)  # eager row
    missing = "cpl_classifier at width 64 with options 'amp cuda_graphs replayed' not benchmarked"
    assert got[f"classification/cpl_M ({missing})"] == 0.0
    forced = bench.project_hours([csv_path, graphs_csv], cfg_path, options="", schema=SCHEMA)
    assert dict((label, h) for label, _, h in forced)[
        "classification/cpl_XS" + assumed
    ] == pytest.approx(2 * 0.010)

    # The config is validated as the workflow validates it: one line names a bad key.
    config["classification"]["train"]["stepz"] = 1
    cfg_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"classification\.train\.stepz: unknown key"):
        bench.project_hours(csv_path, cfg_path, schema=SCHEMA)


def _projection_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A benchmark CSV (the classifier at 1 s per step), a config (9,000 classifier steps: 2.5 h;
    the averaged denoiser, no row: 0 h) and a rehearsal's cost.csv."""
    csv_path = tmp_path / "cuda.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=bench.COLUMNS)
        writer.writeheader()
        writer.writerow(
            dict({c: "" for c in bench.COLUMNS}, model="classifier", impl="ours",
                 base_width="16", batch="128", height="32", width="32", step_ms="1000",
                 options="cuda_graphs replayed")
        )  # fmt: skip
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["classification"]["train"]["steps"] = 9000  # 2.5 h at 1 s per step
    config["classification"]["select"] = ["nonexpansive"]
    config["denoising"]["select"] = config["pnp"]["denoisers"] = ["averaged"]  # 0 h: no row
    config["resources"]["train"]["runtime"] = 60
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    cost_csv = tmp_path / "cost.csv"
    paper = {"row": "paper", "sigma": "", "seed": "0", "runtime_min": "240", "fits": "True"}
    pd.DataFrame([
        dict(paper, rule="evaluate_classifier", variant="nonexpansive", projected_h=0.5),
        dict(paper, rule="evaluate_classifier", variant="cpl_L", projected_h=5.0, fits="False"),
        dict(paper, rule="pnp_deblur", variant="averaged", sigma="0.03", projected_h=0.25),
        dict(paper, rule="train_classifier", variant="nonexpansive", projected_h=99.0),
        dict(paper, row="total", rule="all jobs", variant="", projected_h=999.0),
    ]).to_csv(cost_csv, index=False)  # fmt: skip
    return csv_path, cfg_path, cost_csv


def test_projection_says_which_jobs_fit_their_runtime_and_adds_a_rehearsals_evaluation_and_pnp(
    tmp_path, capsys, monkeypatch
):
    """``--project``: each training job against ``resources.train.runtime`` (a longer one needs
    that many submissions, resuming); ``--cost`` adds the evaluation and PnP jobs of a
    rehearsal's ``cost.csv`` by rule, naming those over their runtime, and the DAG's total."""
    monkeypatch.chdir(ROOT)  # the SLURM profile's stop lead (cost.SLURM_PROFILE)
    csv_path, cfg_path, cost_csv = _projection_inputs(tmp_path)
    bench.main(["--project", str(csv_path), "--config", str(cfg_path), "--schema", str(SCHEMA)])
    out = capsys.readouterr().out
    assert re.search(r"2\.5 h +1 job\(s\) +2\.50 h each, over 60 min less 300s: 3 submissions +"
                     r"classification/nonexpansive\n", out), out  # fmt: skip
    assert "evaluation, PnP and data jobs: not projected" in out

    bench.main(["--project", str(csv_path), "--config", str(cfg_path), "--schema", str(SCHEMA),
                "--cost", str(cost_csv)])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"5\.5 h +2 job\(s\) +5\.00 h at most, 1 over 240 min: cpl_L +"
                     r"evaluate_classifier", out), out  # fmt: skip
    assert re.search(r"0\.2 h +1 job\(s\) +0\.25 h at most, fits +pnp_deblur", out), out
    assert "the whole DAG" in out
    with pytest.raises(SystemExit):  # --cost alone: argparse's one-line usage error
        bench.parse_args(["--cost", str(cost_csv)])
    with pytest.raises(ValueError, match=r"lacks the columns \['fits'"):
        pd.read_csv(cost_csv).drop(columns=["fits"]).to_csv(cost_csv, index=False)
        bench.main(["--project", str(csv_path), "--config", str(cfg_path), "--cost", str(cost_csv)])


def test_step_only_training_hours_are_a_lower_bound_and_the_dag_takes_the_rehearsals_instead(
    tmp_path, capsys, monkeypatch
):
    """The benchmark rows pin about one sub-step per block and time steps alone: ``--project``
    says its training hours are a lower bound; with ``--cost`` the whole DAG takes the
    rehearsal's training projections (measured sub-step growth, validations, checkpoints:
    99 h here, not the classifier's 2.5 h) where cost.csv has them, and the step-only ones for
    the rest (the denoiser's train rule is not in this cost.csv)."""
    monkeypatch.chdir(ROOT)  # the SLURM profile's stop lead (cost.SLURM_PROFILE)
    csv_path, cfg_path, cost_csv = _projection_inputs(tmp_path)
    args = ["--project", str(csv_path), "--config", str(cfg_path), "--schema", str(SCHEMA)]
    bench.main(args)
    out = capsys.readouterr().out
    assert "these training hours: lower bound: steps alone, at the benchmark rows' pinned" in out
    bench.main([*args, "--cost", str(cost_csv)])
    out = capsys.readouterr().out
    assert re.search(r"99\.0 h +1 job\(s\) +99\.00 h at most, fits +train_classifier", out), out
    total = re.search(r"([0-9.]+) h  the whole DAG: training: train_classifier of .*cost\.csv "
                      r"\(measured sub-steps, validations, checkpoints\) \+ the step-only "
                      r"denoising above", out)  # fmt: skip
    assert total is not None, out
    assert float(total[1]) == pytest.approx(99.0 + 5.5 + 0.25, abs=0.06)  # not 2.5 + 5.75


def test_a_rule_that_fits_at_the_rehearsals_sub_steps_is_said_to_fit_at_a_lower_bound(
    tmp_path, capsys, monkeypatch
):
    """``--cost``: a rule whose jobs' ``basis`` says they rest on the rehearsal's sub-steps
    (``cost.SUBSTEP_BOUND``: the paper classifier's) fits at a lower bound, not plainly; the
    others (no such basis) plainly."""
    monkeypatch.chdir(ROOT)  # the SLURM profile's stop lead (cost.SLURM_PROFILE)
    csv_path, cfg_path, cost_csv = _projection_inputs(tmp_path)
    rows = pd.read_csv(cost_csv)
    rows["basis"] = "measured"
    rows.loc[rows["rule"] == "train_classifier", "basis"] = f"measured; {cost.SUBSTEP_BOUND}"
    rows.to_csv(cost_csv, index=False)
    bench.main(["--project", str(csv_path), "--config", str(cfg_path), "--schema", str(SCHEMA),
                "--cost", str(cost_csv)])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"99\.00 h at most, fits, at a lower bound +train_classifier", out), out
    assert re.search(r"0\.25 h at most, fits +pnp_deblur", out), out


def test_a_denoisers_step_time_is_scaled_by_the_rows_theta_over_its_own(tmp_path):
    """The denoiser's row runs theta 1 (at about one sub-step per block); at the same norms the
    averaged denoiser (theta 0.5) takes twice the sub-steps of Euler: twice its hours."""
    csv_path = tmp_path / "cuda.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=bench.COLUMNS)
        writer.writeheader()
        writer.writerow(
            dict({c: "" for c in bench.COLUMNS}, model="denoiser", impl="ours", batch="5",
                 height="321", width="481", step_ms="100")
        )  # fmt: skip
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["denoising"]["select"] = config["pnp"]["denoisers"] = ["euler", "averaged"]
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    got = {label: h for label, _, h in bench.project_hours(csv_path, cfg_path, schema=SCHEMA)}
    steps = config["denoising"]["train"]["steps"]
    assert got["denoising/euler"] == pytest.approx(steps * 0.1 / 3600)
    assert got["denoising/averaged"] == pytest.approx(2 * steps * 0.1 / 3600)


def test_the_partial_remat_benchmark_times_each_choice_and_more_blocks_checkpointed_keep_less():
    """``benchmarks/partial_remat.py`` runs (a small size), and its chosen choices sit between
    no block and every block checkpointed: more blocks for a smaller budget, less memory kept."""
    run = subprocess.run(
        [sys.executable, "benchmarks/partial_remat.py", "--integrators", "euler", "--size", "32",
         "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines()[1:]]
    blocks = [int(row[2].split(" of ")[0]) for row in rows]
    kept = [float(row[3]) for row in rows]
    assert blocks[:2] == [0, 10] and 0 < blocks[2] < blocks[3] < blocks[4] < 10, blocks
    assert kept[0] > kept[2] > kept[3] > kept[4] > kept[1], kept
    assert all(float(row[4]) > 0 for row in rows), rows


# --------------------------------------------------------------------------------------------
# what the memory guard and the projections count


def _raised_from(inner: BaseException, outer: BaseException, how: str) -> BaseException:
    """``outer`` as raised from ``inner`` (``how="__cause__"``: ``raise outer from inner``) or
    while handling it (``"__context__"``)."""
    setattr(outer, how, inner)
    return outer


@pytest.mark.parametrize(
    "err, expected",
    [
        (RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED"), True),
        (RuntimeError("CUDA driver error: out of memory"), True),
        (_raised_from(RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED"),
                      RuntimeError("the Cayley transform failed"), "__cause__"), True),
        (_raised_from(MemoryError("Unable to allocate 1.00 EiB"),
                      ValueError("data_batch_1: not a CIFAR-10 pickle"), "__cause__"), False),
        (_raised_from(RuntimeError("CUDA driver error: out of memory"),
                      OSError("No space left on device"), "__context__"), False),
        (RuntimeError("cuFFT error: CUFFT_INVALID_SIZE"), False),
        (RuntimeError("CUDA driver error: invalid device context"), False),
        (_raised_from(RuntimeError("shape mismatch"), ValueError("bad batch"), "__cause__"), False),
    ],
)  # fmt: skip
def test_cufft_and_driver_allocation_failures_are_out_of_memory_even_when_wrapped(err, expected):
    """An error raised while handling one (a save on a full disk) is reported as itself, and
    so is a ValueError raised from one (damaged data whose sizes could not be allocated)."""
    assert is_out_of_memory(err) is expected


def test_a_chain_of_exceptions_that_loops_back_is_no_out_of_memory_and_ends():
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__cause__, second.__cause__ = second, first
    assert is_out_of_memory(first) is False


def test_a_recomputed_sub_step_holds_its_weight_derived_tensors_so_the_cheapest_choice_changes():
    """Block 0 keeps 100 bytes derived from its weights per sub-step (``shared``), block 1 none:
    checkpointing block 0 frees little and its recomputed sub-step holds them again, so at a
    budget of 150 bytes only block 1 checkpointed fits (142 bytes), not block 0 (171), which a
    count of its activations alone (71) would have chosen as the fewest sub-steps run again."""
    kept = ActivationCost(stages=(10, 30), inputs=(1, 1), shared=(100, 0),
                          checkpointable=(True, True), fixed=0, batch=1)  # fmt: skip
    counts = [1, 2]
    assert kept.bytes(counts, [True, False]) == 1 + 2 * 30 + (10 + 100)
    assert kept.bytes(counts, [False, True]) == (10 + 100) + 2 * 1 + 30
    assert kept.cheapest_remat(counts, 150) == [False, True]
    assert kept.cheapest_remat(counts, 112) is None  # both: 1 + 2 + 110 = 113


def test_a_job_fits_its_runtime_only_within_the_limit_less_the_slurm_profiles_stop_lead(
    monkeypatch,
):
    """The SLURM profile stops every job that saves progress 300 s before its limit: a job of
    238 minutes with a 240-minute runtime is stopped at 235 and needs a second submission, one
    of 230 fits; cost.csv's ``fits`` and ``--project``'s line say the same."""
    monkeypatch.chdir(ROOT)  # cost.SLURM_PROFILE is relative to the repository root
    assert cost.stop_lead_s("train_classifier") == cost.stop_lead_s("evaluate_classifier") == 300
    assert cost.submissions(238 / 60, 240, 300) == 2
    assert cost.submissions(230 / 60, 240, 300) == 1
    assert cost.submissions(3 * 235 / 60, 240, 300) == 3
    paper = cost.Paper({"resources": {"evaluate": {"runtime": 240, "gpu": 1}}}, {})
    job = cost.Job("evaluate_classifier", "nonexpansive", seed=0)
    assert cost._row("paper", job, paper, 1, 238 * 60, "x")["fits"] is False
    assert cost._row("paper", job, paper, 1, 230 * 60, "x")["fits"] is True
    assert bench._fits(238 / 60, 240, "train_denoiser") == "over 240 min less 300s: 2 submissions"
    assert bench._fits(230 / 60, 240, "train_denoiser") == "fits"


def test_the_stop_lead_is_each_rules_signal_time_in_the_profile_and_a_missing_profile_is_named(
    tmp_path,
):
    profile = tmp_path / "config.yaml"
    profile.write_text(yaml.safe_dump({
        "default-resources": {"runtime": 60},
        "set-resources": {
            "train_classifier": {"slurm_extra": "'--signal=TERM@120'"},
            "pnp_deblur": {"slurm_extra": "'--signal=B:TERM'"},  # sbatch's default: 60 s
            "tv_deblur": {"mem_mb": 1000},
        },
    }))  # fmt: skip
    leads = {r: cost.stop_lead_s(r, profile) for r in ("train_classifier", "pnp_deblur",
                                                       "tv_deblur", "prepare_data")}  # fmt: skip
    assert leads == {"train_classifier": 120, "pnp_deblur": 60, "tv_deblur": 0, "prepare_data": 0}
    with pytest.raises(ValueError, match=r"^cost: .*nowhere\.yaml does not exist [^\n]*$"):
        cost.stop_lead_s("train_classifier", tmp_path / "nowhere.yaml")
    assert cost.submissions(1e-3, 5, 300) == 0  # stopped before it starts: never fits
    assert bench._fits(1e-3, 5, "train_classifier").startswith("never: 5 min is within")


def test_paper_units_count_the_paper_configurations_test_splits_not_the_runs():
    """The projection took its test sizes from the run's data files: a run with 300 CIFAR-10 and
    8 BSDS500 stand-in test images projected the paper's evaluations on 300 and 8 images."""
    config = validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()), SCHEMA)
    config["classification"]["evaluate"]["n_test"] = config["denoising"]["evaluate"]["n_test"] = (
        None
    )
    paper = cost.Paper(config, {})
    assert paper.units(cost.Job("evaluate_classifier", "nonexpansive", seed=0)) == 10_000
    assert paper.units(cost.Job("evaluate_denoiser", "averaged", "0.15", 0)) == 200
    smoke = cost.Paper(load_config([ROOT / "config.yaml", ROOT / "config/smoke.yaml"], SCHEMA), {})
    assert [smoke.test_size(d) for d in ("cifar10", "bsds500")] == [300, 8]  # stand-ins: theirs


def test_paper_units_count_no_more_validation_images_than_the_split_holds():
    """TV denoising, PnP and TV deblurring choose on ``val[:val_images]``: asking for more than
    the BSDS500 validation split's 100 images counts 100 per candidate, as the jobs run."""
    config = validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()), SCHEMA)
    config["denoising"]["tv"]["val_images"] = config["pnp"]["val_images"] = 1000
    paper = cost.Paper(config, {})
    tv, p = config["denoising"]["tv"], config["pnp"]
    test = min(config["denoising"]["evaluate"]["n_test"] or 200, 200)
    assert paper.units(cost.Job("evaluate_tv_denoising", sigma="0.15")) == (
        test + 100 * len(tv["weights"])
    )
    images = min(p["n_images"], 200)
    deblur = paper.units(cost.Job("pnp_deblur", "averaged", "0.03", 0))
    assert deblur == (images + 100 * len(p["strengths"])) * p["max_iter"]
    weights, iters = len(p["tv"]["weights"]), p["tv"]["iters"]
    assert paper.units(cost.Job("tv_deblur")) == (images + 100 * weights) * iters
    p["val_images"] = 20  # fewer: as asked
    assert paper.units(cost.Job("tv_deblur")) == (images + 20 * weights) * iters
