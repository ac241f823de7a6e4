"""The benchmark and the speed paths it measures: fast, and semantics-preserving.

* the quick benchmark runs and writes a well-formed CSV;
* the plain reference computes the same function as the library's models (float64, same weights,
  same sub-step counts), so the benchmark's ratio compares like with like;
* the fused power iteration is the per-operator one (and still a lower bound), and its host copy
  of the estimates is never stale;
* sub-step activation checkpointing leaves the gradients bitwise unchanged.
"""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from stablenets import bench
from stablenets.models import build_model
from stablenets.operators import power_iteration_all
from stablenets.reference import from_model


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
