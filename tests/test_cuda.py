"""Device paths: every test runs on the CPU and, when a GPU is present, on CUDA.

1. The same function on the device: each model kind (and denoiser block) built on the CPU in
   float64 and copied to the device computes the same outputs, sub-step counts, training-time
   norm estimates and certified Lipschitz bound (recomputed there, not read from the CPU cache).
2. Training on the device (``training.train``): finite losses, weights that moved, state that
   stays on the device, a checkpoint written from there, and a run killed after its checkpoint
   and resumed that ends where an uninterrupted one does. One step under bf16 autocast keeps the
   fused power iteration in full precision (run on the CPU too: CPU autocast takes the same path).
3. Robustness on the device: L2 PGD stays in the ball and the box, matches the CPU attack, and
   the certified radii match the CPU ones; the robustness curve keeps its invariant.
4. PnP deblurring on the device matches the CPU run (float64) and float32 gives the same PSNR.
5. (CUDA only) CUDA graphs of training steps and attacks replay the eager passes, and the
   activation cost behind ``max_substeps: auto`` is what the allocator holds in a step.

Not covered: AutoAttack (pyautoattack's default attacks take 100+ iterations each, too slow for
this file). ``stablenets.evaluation.robustness`` imports pyautoattack, so its tests skip where that is absent.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from functools import partial

import pytest
import torch
from conftest import cartoon
from torch import nn

from stablenets.evaluation.metrics import psnr
from stablenets.evaluation.pnp import (
    GaussianBlur,
    check_nonincreasing,
    observe,
    pnp_forward_backward,
)
from stablenets.nn.families import CayleyConv, CPLBlock, SLLBlock
from stablenets.nn.models import DENOISER_BLOCKS, MODELS, build_model, read_checkpoint
from stablenets.nn.operators import LinearOperator
from stablenets.train.augment import AugmentConfig
from stablenets.train.loop import TrainConfig, train, update_norms
from stablenets.train.memory import activation_cost
from stablenets.train.tasks import ClassificationTask, DenoisingTask

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Classifiers on 16x16 inputs. Width 6: the 16x16 stage uses the circulant certificate and the
# 8x8 stage the dense (Cholesky) one, so both run on the device; two blocks per stage exercise
# the grouped (fused) power iteration.
CLASSIFIER = {"base_width": 6, "stages": 2, "blocks_per_stage": 2, "input_size": 16}
DENOISER = {"width": 8, "depth": 3, "input_size": (24, 32)}

CASES: dict[str, tuple[str, dict]] = {
    "nonexpansive_euler": ("nonexpansive_classifier", {**CLASSIFIER, "integrator": "euler"}),
    "nonexpansive_rk4": ("nonexpansive_classifier", {**CLASSIFIER, "integrator": "rk4"}),
    "resnet": ("resnet_classifier", CLASSIFIER),
    "cpl": ("cpl_classifier", CLASSIFIER),
    "sll": ("sll_classifier", CLASSIFIER),
    "aol": ("aol_classifier", CLASSIFIER),
    "orthogonal": ("orthogonal_classifier", CLASSIFIER),
    "denoiser_euler": ("nonexpansive_denoiser", {**DENOISER, "residual": True, "theta": 0.5}),
    "denoiser_heun": ("nonexpansive_denoiser", {**DENOISER, "integrator": "heun"}),
    "denoiser_cpl": ("nonexpansive_denoiser", {**DENOISER, "block": "cpl", "theta": 0.5}),
    "denoiser_sll": ("nonexpansive_denoiser", {**DENOISER, "block": "sll", "residual": True}),
    "denoiser_aol": ("nonexpansive_denoiser", {**DENOISER, "block": "aol"}),
    "dncnn": ("dncnn", DENOISER),
}
assert {name for name, _ in CASES.values()} == set(MODELS), "a model kind has no device case"
assert {
    kw.get("block", "nonexpansive")
    for name, kw in CASES.values()
    if name == "nonexpansive_denoiser"
} == set(DENOISER_BLOCKS), "a denoiser block has no device case"

FUNCTION_RTOL = 1e-10  # float64 outputs, device vs CPU (only reduction orders differ)
BOUND_RTOL = 1e-6  # certified norms and Lipschitz bounds, device vs CPU

# Training: CUDA compares a resumed run with an uninterrupted one to this tolerance, because
# cuDNN may pick non-deterministic kernels (weight gradients of convolutions accumulated in a
# run-dependent order); the CPU must match bit for bit.
CUDA_TRAIN_RTOL, CUDA_TRAIN_ATOL = 1e-5, 1e-6


def _kind(device: str) -> str:
    return torch.device(device).type


def _perturbed(
    model: nn.Module, dtype: torch.dtype = torch.float64, bias: bool = True, seed: int = 1
) -> nn.Module:
    """``model`` in ``dtype`` moved away from its initial state, as training would: every weight
    times 1.5 (away from a threshold of the sub-step count, where the last bit of a device's
    certified norm would decide between two counts; at 1.5 a block built at norm 1 takes 2
    sub-steps, 8 % inside the threshold), random biases (or none: ``bias=False`` zeroes them), SLL
    scalings and batch-norm statistics."""
    model = model.to(dtype)
    g = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
        return shift + scale * torch.randn(t.shape, generator=g, dtype=torch.float64)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LinearOperator, CayleyConv)):
                m.weight.mul_(1.5)
                if m.bias is not None:
                    m.bias.copy_(noise(m.bias, 0.1 if bias else 0.0))
            elif isinstance(m, SLLBlock):
                m.log_q.copy_(noise(m.log_q, 0.3))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(noise(m.weight, 0.2, 1.0))
                m.running_mean.copy_(noise(m.running_mean, 0.1))
                m.running_var.copy_(noise(m.running_var, 0.1, 1.0).abs() + 0.1)
    return model


def _operators(model: nn.Module) -> list[LinearOperator]:
    return [m for m in model.modules() if isinstance(m, LinearOperator)]


def _copy_to(model: nn.Module, device: str) -> nn.Module:
    """A copy of ``model`` on ``device`` that recomputes every certified norm there (the bound
    cache is keyed on the weight's content, not its device, so a plain copy would reuse the
    CPU's numbers)."""
    twin = copy.deepcopy(model).to(device)
    for op in _operators(twin):
        op._bound_cache.clear()
    return twin


def _input(name: str, n: int = 3, seed: int = 0) -> torch.Tensor:
    shape = (3, 16, 16) if name.endswith("classifier") else (3, *DENOISER["input_size"])
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _assert_on(model: nn.Module, device: str) -> None:
    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == _kind(device), (key, t.device)


def _assert_same(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """``got`` (any device) equals ``want`` to ``rtol`` relative to ``want``'s largest entry."""
    scale = float(want.abs().max())
    err = float((got.cpu() - want).abs().max())
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:g} x {scale:.3e}"


# --------------------------------------------------------------------------------------------
# 1. The same function and certificate on the device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_device_computes_the_cpu_function_substeps_and_bound(case, device):
    name, kwargs = CASES[case]
    torch.manual_seed(0)
    cpu = _perturbed(build_model(name, **kwargs))
    dev = _copy_to(cpu, device)
    _assert_on(dev, device)
    x = _input(name)
    adaptive = [b for b in cpu.constrained_blocks() if not isinstance(b, CPLBlock)]

    # Training-time norm estimates: the fused power iteration gives the same vectors and norms.
    update_norms(cpu, 3)
    update_norms(dev, 3)
    want, got = cpu.state_dict(), dev.state_dict()
    for key in want:
        assert got[key].device.type == _kind(device) and got[key].dtype == want[key].dtype, key
        if key.endswith((".u", ".sigma_estimate")):
            _assert_same(got[key], want[key], 1e-9)

    for mode in ("eval", "train"):  # eval: certified norms; train: the estimates above
        cpu.train(mode == "train")
        dev.train(mode == "train")
        with torch.no_grad():
            out_cpu = cpu(x)
            out_dev = dev(x.to(device))
        assert out_dev.device.type == _kind(device) and out_dev.dtype == torch.float64
        assert torch.isfinite(out_cpu).all()
        _assert_same(out_dev, out_cpu, FUNCTION_RTOL)
        stats_cpu, stats_dev = cpu.block_stats(), dev.block_stats()
        assert [n for n, _ in stats_dev] == [n for n, _ in stats_cpu], mode
        assert dev.total_substeps() == cpu.total_substeps()
        for (_, norm_dev), (_, norm_cpu) in zip(stats_dev, stats_cpu, strict=True):
            assert norm_dev == pytest.approx(norm_cpu, rel=BOUND_RTOL), mode
        # The perturbation moved every adaptive block off the one-sub-step threshold.
        assert all(b.last_substeps >= 2 for b in adaptive), (mode, stats_cpu)

    bound_cpu = cpu.lipschitz_bound()
    bound_dev = dev.lipschitz_bound()
    assert math.isfinite(bound_cpu) and bound_cpu > 0
    assert bound_dev == pytest.approx(bound_cpu, rel=BOUND_RTOL)
    # Every certified norm the CPU needed was recomputed on the device (copies start empty).
    needed = [bool(op._bound_cache) for op in _operators(cpu)]
    assert [bool(op._bound_cache) for op in _operators(dev)] == needed


# --------------------------------------------------------------------------------------------
# 2. Training on the device


class _Crash(RuntimeError):
    """Stands for a job killed after a checkpoint: raised from the log at the step-3 report."""


def _training_case(kind: str, device: str):
    """(initial model on the CPU, task on ``device``) for a small classifier or denoiser."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "classification":
        model = build_model("nonexpansive_classifier", **CLASSIFIER)
        x, y = torch.rand(48, 3, 16, 16, generator=g), torch.randint(0, 10, (48,), generator=g)
        x, y = x.to(device), y.to(device)
        return model, ClassificationTask(x, y, x[:16], y[:16], AugmentConfig(), eval_batch=8)
    name = "dncnn" if kind == "dncnn" else "nonexpansive_denoiser"
    model = build_model(name, **{**DENOISER, "depth": 2})
    images = torch.rand(12, 3, 24, 32, generator=g).to(device)
    return model, DenoisingTask(images, images[:4], sigma=0.1, patch=(16, 16), eval_batch=2)


TRAIN = TrainConfig(
    steps=6, batch_size=8, lr_max=0.05, val_every=3, checkpoint_every=2, log_every=1, seed=0
)


def _assert_same_state(a: dict, b: dict, device: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if _kind(device) == "cpu":
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(
                b[key], a[key], rtol=CUDA_TRAIN_RTOL, atol=CUDA_TRAIN_ATOL, msg=key
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["classification", "denoising", "dncnn"])
def test_training_on_the_device_checkpoints_and_resumes(kind, device, tmp_path):
    initial, task = _training_case(kind, device)
    full, cut = tmp_path / "full", tmp_path / "cut"

    model, state = train(copy.deepcopy(initial).to(device), task, TRAIN, full, "h", lambda _: None)
    train_rows = [r for r in state.rows if r["kind"] == "train"]
    assert len(train_rows) == TRAIN.steps
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert math.isfinite(state.best_metric) and state.best_step in (3, 6)
    _assert_on(model, device)
    moved = [
        float((p.detach().cpu() - p0.detach()).abs().max())
        for p, p0 in zip(model.parameters(), initial.parameters(), strict=True)
    ]
    assert max(moved) > 1e-4, "training did not change the weights"
    # The checkpoint was written from the device: loaded as saved, its tensors land there.
    saved = torch.load(full / "checkpoint.pt", weights_only=True)
    assert saved["run"]["step"] == TRAIN.steps
    for key, value in saved["model"].items():
        assert value.device.type == _kind(device), key

    def crash(line: str) -> None:
        if line.startswith("step 3 "):
            raise _Crash(line)

    with pytest.raises(_Crash):
        train(copy.deepcopy(initial).to(device), task, TRAIN, cut, "h", crash)
    assert read_checkpoint(cut / "checkpoint.pt")["run"]["step"] == 2
    logs: list[str] = []
    resumed, state2 = train(copy.deepcopy(initial).to(device), task, TRAIN, cut, "h", logs.append)
    assert any(line.startswith("resumed from") and "step 2" in line for line in logs), logs
    _assert_on(resumed, device)
    final = read_checkpoint(full / "checkpoint.pt")["model"]
    final2 = read_checkpoint(cut / "checkpoint.pt")["model"]
    _assert_same_state(final, final2, device)
    _assert_same_state(model.state_dict(), resumed.state_dict(), device)
    losses = [r["loss"] for r in train_rows]
    losses2 = [r["loss"] for r in state2.rows if r["kind"] == "train"]
    if _kind(device) == "cpu":
        assert losses2 == losses
    else:
        assert losses2 == pytest.approx(losses, rel=CUDA_TRAIN_RTOL)
    assert state2.best_step == state.best_step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["classification", "denoising"])
def test_speed_settings_train_the_same_model(kind, device, tmp_path):
    """``amp``, ``channels_last``, ``cudnn_benchmark`` and ``cuda_graphs`` (together: graphs
    captured under bf16 autocast, NHWC) change how, not what: the losses follow
    the float32 run (bitwise-close on the CPU, where amp is off; bf16-close on CUDA), weights
    and activations are NHWC, and the checkpoint resumes into an ordinary model."""
    initial, task = _training_case(kind, device)
    fast_cfg = dataclasses.replace(
        TRAIN, amp=True, channels_last=True, cudnn_benchmark=True, cuda_graphs=True
    )
    plain, state = train(copy.deepcopy(initial).to(device), task, TRAIN, tmp_path / "a", "h",
                         lambda _: None)  # fmt: skip
    fast, fast_state = train(copy.deepcopy(initial).to(device), task, fast_cfg, tmp_path / "b",
                             "h", lambda _: None)  # fmt: skip
    torch.backends.cudnn.benchmark = False
    losses = [r["loss"] for r in state.rows if r["kind"] == "train"]
    fast_losses = [r["loss"] for r in fast_state.rows if r["kind"] == "train"]
    rel = 1e-5 if _kind(device) == "cpu" else 5e-2
    assert fast_losses == pytest.approx(losses, rel=rel)
    convs = [p for p in fast.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    saved = read_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    again = copy.deepcopy(initial)  # an ordinary (NCHW, CPU) model takes the NHWC checkpoint
    again.load_state_dict(saved)
    for key, value in again.state_dict().items():
        assert torch.equal(value, saved[key].cpu()), key


def _bf16_step(device: str, workdir, loss: dict | None):
    """One training step of the small classifier under bf16 autocast and the same step without;
    returns both models and both loss values, and whether the forward ran under autocast."""
    initial, task = _training_case("classification", device)
    cfg = TrainConfig(  # one step (of a schedule with a warm-up step)
        steps=3, stop_after=1, batch_size=8, lr_max=0.05, val_every=3, log_every=1, loss=loss
    )
    seen: list[bool] = []
    low = copy.deepcopy(initial).to(device)
    low.lift.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled(_kind(device))))
    with torch.autocast(_kind(device), dtype=torch.bfloat16):
        low, state = train(low, task, cfg, workdir / "bf16", "h", lambda _: None)
    full, state32 = train(
        copy.deepcopy(initial).to(device), task, cfg, workdir / "fp32", "h", lambda _: None
    )
    return low, full, state.rows[0]["loss"], state32.rows[0]["loss"], seen


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_step_keeps_the_power_iteration_in_full_precision(device, tmp_path):
    low, full, loss, loss32, seen = _bf16_step(device, tmp_path, None)
    assert seen and all(seen), "the forward pass did not run under autocast"
    assert math.isfinite(loss) and loss == pytest.approx(loss32, rel=0.05)
    _assert_on(low, device)
    for op in _operators(low):
        assert op.weight.dtype == op.u.dtype == op.sigma_estimate.dtype == torch.float32
    # The step's power iteration (fused, before the forward pass) is exactly the float32 one;
    # a bf16 iteration would be off by ~1e-3.
    for block, ref in zip(low.constrained_blocks(), full.constrained_blocks(), strict=True):
        op, op32 = block.operator, ref.operator
        torch.testing.assert_close(op.u, op32.u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(op.sigma_estimate, op32.sigma_estimate, rtol=1e-6, atol=0)
        assert 0 < float(op.sigma_estimate) <= op.norm_bound() * (1 + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_margin_loss_keeps_every_power_iteration_in_full_precision(device, tmp_path):
    loss_spec = {"name": "margin", "offset": 0.1, "temperature": 0.25}
    low, full, loss, _, _ = _bf16_step(device, tmp_path, loss_spec)
    assert math.isfinite(loss)
    for op, ref in zip(_operators(low), _operators(full), strict=True):
        torch.testing.assert_close(op.u, ref.u, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 3. Robustness on the device


def _robust_model(dtype: torch.dtype) -> nn.Module:
    """The small classifier, bias-free (with random biases it predicts one class for every
    input and no attack of moderate size flips it) and perturbed, in ``eval()``. Seed 1: at
    most seeds even the bias-free one predicts one class for all 8 points, and PGD at 0.5 flips
    none (here 2, and all 8 at 2.0)."""
    torch.manual_seed(1)
    return _perturbed(build_model("nonexpansive_classifier", **CLASSIFIER), dtype, False).eval()


PGD = {"steps": 10, "rel_step": 0.25, "seed": 0}


@pytest.mark.parametrize("device", DEVICES)
def test_pgd_and_certified_radii_on_the_device(device):
    robustness = pytest.importorskip("stablenets.evaluation.robustness")  # imports pyautoattack
    cpu = _robust_model(torch.float64)
    dev = _copy_to(cpu, device)
    x = _input("nonexpansive_classifier", n=8, seed=3)
    with torch.no_grad():
        y = cpu(x).argmax(dim=1)  # every point is correct when clean, so PGD attacks them all
    eps = 0.5

    adv_cpu = robustness.pgd_l2(cpu, x, y, eps, **PGD)
    adv_dev = robustness.pgd_l2(dev, x.to(device), y.to(device), eps, **PGD)
    assert adv_dev.device.type == _kind(device) and adv_dev.dtype == torch.float64
    dist = (adv_dev.cpu() - x).flatten(1).norm(dim=1)
    assert float(dist.max()) <= eps * (1 + 1e-9)
    assert float(dist.min()) > 0.5 * eps  # the attack moved every point
    assert float(adv_dev.min()) >= 0.0 and float(adv_dev.max()) <= 1.0
    _assert_same(adv_dev, adv_cpu, 1e-8)  # the same random start (CPU generator), same steps
    with torch.no_grad():
        flipped = dev(adv_dev).argmax(dim=1).cpu() != y
    assert 0 < int(flipped.sum()) < len(x)
    back = robustness.pgd_l2(dev, x, y, eps, **PGD)  # model on the device, data on the CPU
    assert back.device.type == "cpu"
    _assert_same(back, adv_cpu, 1e-8)

    margin_cpu, correct_cpu = robustness.margins(cpu, x, y, batch_size=4)
    margin_dev, correct_dev = robustness.margins(dev, x.to(device), y.to(device), batch_size=4)
    assert correct_dev.all() and torch.equal(correct_dev, correct_cpu)
    _assert_same(margin_dev, margin_cpu, FUNCTION_RTOL)
    radius_cpu = robustness.certified_radius(margin_cpu, correct_cpu, cpu.lipschitz_bound())
    radius_dev = robustness.certified_radius(margin_dev, correct_dev, dev.lipschitz_bound())
    assert (radius_cpu > 0).all()
    torch.testing.assert_close(radius_dev, radius_cpu, rtol=BOUND_RTOL, atol=0)
    assert not (flipped & (radius_dev > eps)).any()  # a certified point was never flipped


@pytest.mark.parametrize("device", DEVICES)
def test_float32_robustness_curve_on_the_device_keeps_its_invariant(device):
    robustness = pytest.importorskip("stablenets.evaluation.robustness")
    model = _robust_model(torch.float32).to(device)
    x = _input("nonexpansive_classifier", n=8, seed=3).float().to(device)
    batch = 3
    with torch.no_grad():  # the batches robustness uses: cuDNN's float32 (TF32) results may
        y = torch.cat([model(b).argmax(dim=1) for b in x.split(batch)])  # depend on them
    bound = model.lipschitz_bound()
    margin, correct = robustness.margins(model, x, y, batch)
    radius = robustness.certified_radius(margin, correct, bound)
    eps_grid = [0.0, float(radius.median()), 2.0]
    attack = partial(robustness.pgd_l2, **PGD)
    # robust_accuracy checks that every adversarial example lies in its ball and in [0, 1].
    empirical = robustness.robust_accuracy_curve(model, x, y, eps_grid, attack, batch)
    certified = robustness.certified_accuracy(margin, correct, bound, eps_grid)
    clean = robustness.accuracy(model, x, y, batch)
    assert clean == 1.0 and certified[0] == 1.0 and 0 < certified[1] < 1
    assert empirical[-1] < clean  # PGD finds adversarial examples on the device
    robustness.check_invariant(eps_grid, certified, empirical, clean, "nonexpansive_classifier")


# --------------------------------------------------------------------------------------------
# 4. PnP deblurring on the device


def _pnp_denoiser(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(
        "nonexpansive_denoiser", width=8, depth=2, input_size=(24, 32), theta=0.5
    )  # Euler with theta = 1/2: an averaged denoiser, so PnP's steps must not grow
    return _perturbed(model, dtype).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_pnp_deblurring_on_the_device_matches_the_cpu(device):
    clean = cartoon(n=2, c=3, h=24, w=32)
    blur = GaussianBlur(5, 1.0, clean.shape[1:])
    y = observe(clean, blur, 0.02, seed=0)
    run = partial(pnp_forward_backward, eta=1.0, max_iter=8, tol=1e-12)

    cpu = _pnp_denoiser(torch.float64)
    dev = _copy_to(cpu, device)
    alpha = dev.averagedness()
    assert alpha is not None and alpha == pytest.approx(cpu.averagedness(), rel=BOUND_RTOL)
    x_cpu, hist_cpu = run(cpu, blur, y, reference=clean)
    x_dev, hist_dev = run(dev, blur, y.to(device), reference=clean.to(device))
    assert x_dev.device.type == _kind(device) and x_dev.dtype == torch.float64
    assert torch.equal(hist_dev["iterations"], hist_cpu["iterations"])
    assert not hist_dev["diverged"].any() and int(hist_dev["iterations"].min()) == 8
    final = psnr(x_dev, clean.to(device), 1.0).cpu()
    assert torch.isfinite(final).all()
    _assert_same(x_dev, x_cpu, 1e-9)
    for key in ("step_norm", "residual", "psnr_1"):
        assert hist_dev[key].device.type == "cpu"
        _assert_same(hist_dev[key], hist_cpu[key], 1e-9)
    for n in range(len(clean)):
        assert check_nonincreasing(hist_dev["step_norm"][n]) is None

    # float32 on the device (as the pipeline runs it, TF32 convolutions on CUDA by default):
    # the same PSNR to rounding.
    dev32 = _pnp_denoiser(torch.float32).to(device)
    x32, _ = run(dev32, blur, y.float().to(device))
    assert x32.dtype == torch.float32
    final32 = psnr(x32.double(), clean.to(device), 1.0).cpu()
    assert torch.isfinite(final32).all()
    torch.testing.assert_close(final32, final, rtol=0, atol=0.1)


# --------------------------------------------------------------------------------------------
# 5. CUDA graphs (graphs.py): CUDA only, nothing to run on the CPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
GRAPH_CASES = ["nonexpansive_euler", "nonexpansive_rk4", "resnet", "cpl", "sll", "aol",
               "orthogonal", "denoiser_euler", "denoiser_cpl", "dncnn"]  # fmt: skip
MARGIN = {"name": "margin", "offset": 0.3993073588, "temperature": 0.25}
# (case, loss): every case with its task's loss, every classifier with the margin loss too
GRAPH_RUNS = [(case, None) for case in GRAPH_CASES] + [
    (case, "margin") for case in GRAPH_CASES[:7]]  # fmt: skip


def _graph_case(case: str):
    """(model on the CPU, task on CUDA, train config) of a ``CASES`` entry; large enough a
    learning rate that the norms, and with them the sub-step counts, move during the run."""
    name, kwargs = CASES[case]
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    g = torch.Generator().manual_seed(0)
    cfg = TrainConfig(steps=10, batch_size=8, lr_max=0.5, val_every=5, log_every=1, seed=0)
    if "denoiser" in case or name == "dncnn":
        images = torch.rand(12, 3, 24, 32, generator=g).cuda()
        task = DenoisingTask(images, images[:4], sigma=0.1, patch=(16, 16), eval_batch=2)
        return model, task, dataclasses.replace(cfg, remat=True)  # checkpointed sub-steps
    x, y = torch.rand(48, 3, 16, 16, generator=g), torch.randint(0, 10, (48,), generator=g)
    task = ClassificationTask(x.cuda(), y.cuda(), x[:16].cuda(), y[:16].cuda(), AugmentConfig())
    return model, task, cfg


@needs_cuda
@pytest.mark.parametrize(("case", "loss"), GRAPH_RUNS)
def test_cuda_graphs_train_what_eager_training_trains(case, loss, tmp_path):
    """The same run with ``cuda_graphs`` on and off: the same losses, sub-step counts and weights
    (to the tolerance of two CUDA runs); the graphs were replayed, or (a layer that synchronises
    inside its forward, or an RK4 block's margin-loss factor, which reads its norm on the host)
    turned off with a log line. The margin loss's Lipschitz estimate is replayed with the step."""
    initial, task, cfg = _graph_case(case)
    cfg = dataclasses.replace(cfg, loss=MARGIN if loss else None)
    eager, state = train(copy.deepcopy(initial).cuda(), task, cfg, tmp_path / "e", "h",
                         lambda _: None)  # fmt: skip
    logs: list[str] = []
    graphed, gstate = train(copy.deepcopy(initial).cuda(), task,
                            dataclasses.replace(cfg, cuda_graphs=True), tmp_path / "g", "h",
                            logs.append)  # fmt: skip
    summary = [line for line in logs if line.startswith("cuda graphs") and "captured," in line]
    assert len(summary) == 1, logs
    if case == "orthogonal" or (case, loss) == ("nonexpansive_rk4", "margin"):
        # linalg.solve checks its result on the host; RK4 has no contractivity radius, so its
        # block factor reads the norm: eager, said so
        assert summary[0].startswith("cuda graphs off") and "capture failed" in logs[0], logs
    else:
        assert summary[0].startswith("cuda graphs on:") and " 0 steps replayed" not in summary[0]
    rows = [r for r in state.rows if r["kind"] == "train"]
    grows = [r for r in gstate.rows if r["kind"] == "train"]
    assert [r["substeps"] for r in grows] == [r["substeps"] for r in rows]
    assert [r["loss"] for r in grows] == pytest.approx([r["loss"] for r in rows], rel=1e-4)
    _assert_same_state(eager.state_dict(), graphed.state_dict(), "cuda")


@needs_cuda
@pytest.mark.parametrize("remat", [False, True])
def test_the_activation_cost_is_what_a_training_step_holds_on_the_device(remat):
    """What ``max_substeps: auto`` relies on, in the allocator's own numbers: the activations
    ``activation_cost`` predicts for the paper classifier (batch 128, sub-step counts grown
    unevenly, sub-steps checkpointed or not) are at most the step's peak over the memory held
    before it, and with the fifth of the free memory ``memory_fraction`` leaves, at least it."""
    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier").cuda().train()
    for i, block in enumerate(model.constrained_blocks()):
        block.checkpoint_substeps = remat
        with torch.no_grad():
            block.operator.weight.mul_(1 + i % 4)
    update_norms(model, 50)
    x, y = torch.rand(128, 3, 32, 32, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    cost = activation_cost(model, x[:1], len(x))
    counts = [b.substeps(b.current_norm()) for b in model.constrained_blocks()]
    assert len(set(counts)) > 2, counts
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    nn.functional.cross_entropy(model(x), y).backward()
    torch.cuda.synchronize()
    predicted = cost.bytes(counts, [remat] * len(counts))
    peak = torch.cuda.max_memory_allocated() - before
    assert predicted <= peak <= predicted / 0.8, (counts, predicted / 2**20, peak / 2**20)


@needs_cuda
def test_graphs_make_way_for_a_pass_that_would_not_fit_beside_their_pool(tmp_path, monkeypatch):
    """``max_substeps: auto`` with room for 1.9 passes at the first counts: the captured pass's
    pool and the first pass at grown counts (eager, outside the pool) would not fit together,
    so the graphs are turned off, in a line, and training goes on eagerly to the same losses."""
    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", base_width=4, stages=2, blocks_per_stage=1,
                        input_size=8).cuda()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    task = ClassificationTask(x.cuda(), y.cuda(), x[:16].cuda(), y[:16].cuda(), AugmentConfig(),
                              eval_batch=16)  # fmt: skip
    cfg = TrainConfig(steps=10, batch_size=8, lr_max=1.0, warmup=0.3, log_every=1, val_every=100,
                      cuda_graphs=True)  # fmt: skip
    need = activation_cost(copy.deepcopy(model), x[:1].cuda(), 8).bytes([1, 1], [False, False])
    room = int(need * 1.9 / 0.8)
    monkeypatch.setattr("stablenets.train.loop.free_memory", lambda device: (room, "on the test"))
    logs: list[str] = []
    _, state = train(copy.deepcopy(model), task, cfg, tmp_path / "g", "h", logs.append)
    counts = [r["substeps"] for r in state.rows if r["kind"] == "train"]
    assert counts[0] == 2 < counts[-1], counts
    assert any(line.startswith("cuda graphs off for this run: the pass at") for line in logs), logs
    eager_cfg = dataclasses.replace(cfg, cuda_graphs=False)
    _, eager = train(copy.deepcopy(model), task, eager_cfg, tmp_path / "e", "h", lambda _: None)
    losses = [r["loss"] for r in eager.rows if r["kind"] == "train"]
    assert [r["loss"] for r in state.rows if r["kind"] == "train"] == pytest.approx(
        losses, rel=1e-4
    )


@needs_cuda
def test_step_graphs_one_graph_per_substep_tuple_with_the_eager_gradients():
    """A tuple is captured when seen the second time and then replayed; another tuple (one
    block's time doubled) gets its own graph; going back replays the cached one; the cache keeps
    at most ``cache`` graphs. Every replay leaves the gradients eager backward computes."""
    from torch.nn import functional as F

    from stablenets.train.cuda_graphs import StepGraphs

    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", **CLASSIFIER).cuda().train()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(8, 3, 16, 16, device="cuda", generator=g)
    y = torch.randint(0, 10, (8,), device="cuda", generator=g)

    def forward_loss(inputs, targets, capturing):
        out = model(inputs)
        return out, F.cross_entropy(out, targets)

    def eager_grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        forward_loss(x, y, False)[1].backward()
        return [p.grad.clone() for p in model.parameters()]

    def check(want: list[torch.Tensor], counts: tuple[int, int, int]) -> None:
        _, loss = graphs(x * 1.0, y)  # a fresh input tensor: the graph copies it in
        torch.cuda.synchronize()
        assert (graphs.eager_steps, graphs.captures, graphs.replays) == counts
        for p, w in zip(model.parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
        assert math.isfinite(float(loss.detach()))

    graphs = StepGraphs(model, forward_loss, cache=2, log=lambda _: None)
    block = next(model.constrained_blocks())
    first = eager_grads()
    n1 = model.total_substeps()
    check(first, (1, 0, 0))
    check(first, (1, 1, 1))
    check(first, (1, 1, 2))
    block.time.mul_(2.0)
    second = eager_grads()
    assert model.total_substeps() > n1
    check(second, (2, 1, 2))
    check(second, (2, 2, 3))
    assert model.total_substeps() > n1  # the diagnostics follow the replayed tuple
    block.time.div_(2.0)
    check(first, (2, 2, 4))  # cached: no new capture
    assert model.total_substeps() == n1
    block.time.mul_(4.0)
    eager_grads()
    graphs(x, y)
    graphs(x, y)
    assert graphs.captures == 3 and len(graphs._graphs) == 2  # the least recently used dropped


@needs_cuda
def test_step_graphs_replay_the_power_iteration():
    """The power iteration replayed from its graph updates every vector and estimate as the
    eager fused iteration does, and leaves host copies that need no synchronisation."""
    from stablenets.nn.operators import power_iteration_all, remember_estimates
    from stablenets.train.cuda_graphs import StepGraphs

    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", **CLASSIFIER).cuda()
    twin = copy.deepcopy(model)
    graphs = StepGraphs(model, lambda *_: None, log=lambda _: None)
    ops = [b.operator for b in model.constrained_blocks()]
    twin_ops = [b.operator for b in twin.constrained_blocks()]
    for call in range(4):  # eager, capture + replay, replay, replay
        got = remember_estimates(*graphs.launch_power_iteration(ops, 2))
        want = power_iteration_all(twin_ops, 2)
        assert got == want, call
        for op, top in zip(ops, twin_ops, strict=True):
            assert torch.equal(op.u, top.u) and torch.equal(op.sigma_estimate, top.sigma_estimate)
            assert op.sigma_value() == float(top.sigma_estimate)
    assert len(graphs._norms) == 1 and next(iter(graphs._norms.values()))[0] is not None


# --------------------------------------------------------------------------------------------
# 6. Attack graphs (``evaluation.attack_graphs``): an attack's passes replayed per batch bucket

ATTACK_GRAPH_CASES = ["nonexpansive_euler", "nonexpansive_rk4", "resnet", "cpl", "sll", "aol",
                      "orthogonal"]  # fmt: skip


@needs_cuda
@pytest.mark.parametrize("case", ATTACK_GRAPH_CASES)
def test_attack_graphs_replay_the_eager_passes_of_every_classifier(case):
    """Logits and input gradients of batches of several sizes (buckets 4 and 8, each captured
    on its first batch, then replayed) are the eager pass's to TF32 rounding; the graphs were
    replayed, or (a layer that synchronises inside its forward) turned off with one line."""
    from stablenets.evaluation.attack_graphs import GraphedModel
    from stablenets.evaluation.robustness import eval_mode

    name, kwargs = CASES[case]
    torch.manual_seed(0)
    model = build_model(name, **kwargs).cuda().eval()
    lines: list[str] = []
    graphed = GraphedModel(model, log=lines.append)
    with eval_mode(model):
        for n in (5, 3, 8, 5, 3, 8, 7, 4):
            x = _input(name, n=n, seed=n).float().cuda()
            got, want = [], []
            for m, store in ((graphed, got), (model, want)):
                xg = x.clone().requires_grad_(True)
                out = m(xg)
                store += [out.detach(), torch.autograd.grad(out.logsumexp(1).sum(), xg)[0]]
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))
    if graphed.enabled:
        assert graphed.captures == 2 and graphed.replays == 8 and lines == []
    else:  # eager after a failed capture, said in one line
        assert case == "orthogonal" and len(lines) == 1 and "capture failed" in lines[0], lines


@needs_cuda
def test_a_graphed_pgd_sweep_finds_what_the_eager_one_finds():
    """The radius sweep with its PGD searching on the graphed model (``fast_search``): the eager
    sweep's robust accuracy at every radius, within one point (two CUDA runs may round apart)."""
    import numpy as np

    from stablenets.evaluation import radius_sweep, robustness

    model = _robust_model(torch.float32).cuda()
    x = _input("nonexpansive_classifier", n=24, seed=5).float()
    with torch.no_grad():
        y = model(x.cuda()).argmax(dim=1).cpu()
    margin, correct = robustness.margins(model, x, y, 8)
    cert = robustness.certified_radius(margin, correct, model.lipschitz_bound())
    curves, searches = [], []
    for graphs in (False, True):
        search = radius_sweep.SearchModel("float32", graphs, log=lambda _: None)
        pgd = partial(robustness.pgd_l2, steps=10, rel_step=0.25)
        plan = radius_sweep.SweepPlan(
            radii=np.linspace(0, 1.0, 6), pgd=radius_sweep.fast_search(pgd, search), strong=None,
            strong_radii=frozenset(), audit_radii=frozenset(), audit_size=0, batch_size=8,
            seed=1, search=search,
        )  # fmt: skip
        state = radius_sweep.SweepState.start(correct, cert, plan.seed)
        state = radius_sweep.sweep(model, x, y, plan, state, log=lambda _: None)
        curves.append(state.accuracies(plan.radii)["empirical"])
        searches.append(search)
    assert float(np.abs(curves[1] - curves[0]).max()) <= 1 / len(x) + 1e-12, curves
    assert curves[0][-1] < curves[0][0]  # the attack breaks points
    summary = searches[1].summary()
    assert summary is not None and summary.startswith("attack graphs on:"), summary
    assert " 0 passes replayed" not in summary


@needs_cuda
def test_attack_graphs_of_a_bfloat16_search_replay_its_eager_passes():
    """The bf16 search model (autocast inside, no weight cache) graphed: its captures pass their
    check (bf16's tolerance) and replay the eager bf16 passes to bf16 rounding."""
    from stablenets.evaluation.radius_sweep import SearchModel
    from stablenets.evaluation.robustness import Autocast, eval_mode

    model = _robust_model(torch.float32).cuda()
    lines: list[str] = []
    search = SearchModel("bfloat16", cuda_graphs=True, log=lines.append)
    graphed, eager = search(model), Autocast(model)
    with eval_mode(model):
        for n in (5, 8, 3, 5):
            x = _input("nonexpansive_classifier", n=n, seed=n).float().cuda()
            torch.testing.assert_close(graphed(x), eager(x), rtol=5e-2,
                                       atol=5e-2 * float(eager(x).abs().max()))  # fmt: skip
    summary = search.summary()
    assert lines == [] and summary is not None and summary.startswith("attack graphs on:"), summary
    assert " 0 passes replayed" not in summary


@needs_cuda
def test_pass_times_on_the_device_time_every_search_model_graphed_too():
    """``--pass-times`` on CUDA: float32 and bf16, each eager and replayed (``graphs: yes``,
    replays seen), then float32 hashed; positive seconds per image."""
    from stablenets.bench.evaluation import seconds_per_pass

    model = _robust_model(torch.float32).cuda()
    x = _input("nonexpansive_classifier", n=4, seed=2).float()
    rows = seconds_per_pass(model, x, [3, 8], repeats=1)
    assert [(r["precision"], r["weights"], r["graphs"]) for r in rows] == [
        (p, w, g) for p, w, g in (("float32", "pinned", "no"), ("float32", "pinned", "yes"),
                                  ("bfloat16", "pinned", "no"), ("bfloat16", "pinned", "yes"),
                                  ("float32", "hashed", "no")) for _ in (3, 8)
    ]  # fmt: skip
    assert all(r["forward_backward_s_per_image"] > 0 for r in rows)
