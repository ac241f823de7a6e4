"""Training helpers: augmentation is batched and seeded; the job log has a progress line every
``log_every`` steps; the sub-step limit stops a run before a forward pass that exceeds it. (Kill
and resume, signals, foreign checkpoints and divergence are in test_reliability.py.)"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import fail_torch_load_once
from torch.utils.checkpoint import checkpoint

from stablenets.nn.models import StableModel, build_model, read_checkpoint
from stablenets.pipeline.jobs import _progress_hash
from stablenets.train import loop
from stablenets.train.augment import (
    AugmentConfig,
    augment,
    random_crop,
    random_erase,
    random_flip,
)
from stablenets.train.checkpoints import RunState
from stablenets.train.loop import (
    DivergenceError,
    Interrupted,
    SubstepLimit,
    SubstepLimitError,
    TrainConfig,
    _check_substeps,
    _remat,
    _set_remat,
    _size,
    make_optimizer,
    train,
)
from stablenets.train.memory import (
    _CGROUPS,
    MAX_MEMORY_FRACTION,
    _cgroup_left,
    activation_cost,
)
from stablenets.train.tasks import ClassificationTask, DenoisingTask, epoch_batch


def test_augmentation_is_seeded_batched_and_shape_preserving():
    x = torch.rand(32, 3, 32, 32)
    cfg = AugmentConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(1))
    b = augment(x, cfg, torch.Generator().manual_seed(1))
    c = augment(x, cfg, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    only_erase = augment(x, AugmentConfig(crop_padding=0, flip=False), torch.Generator())
    erased = (only_erase == 0).flatten(1).float().mean(1)
    assert 0.3 < (erased > 0.02).float().mean() < 0.95  # about half the images have a hole
    shifted = augment(x, AugmentConfig(flip=False, erase_p=0.0), torch.Generator().manual_seed(0))
    assert not torch.equal(shifted, x)  # cropping moved at least one image


def test_augmentation_erases_before_it_crops_as_the_scripts():
    """The scripts erase, then crop and flip (an erased rectangle moves with its image): with
    the same generator, the augmented batch is the erased batch, then cropped."""
    x = torch.rand(64, 3, 16, 16) + 1  # no zero pixel but the holes and the padding
    cfg = AugmentConfig(flip=False, erase_p=1.0)
    got = augment(x, cfg, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    erased = random_erase(x, cfg, g)
    torch.testing.assert_close(got, random_crop(erased, cfg.crop_padding, g), rtol=0, atol=0)


def test_each_augmentation_is_what_the_scripts_transforms_do():
    """Each part against its definition: a flip mirrors left-right (``x.flip(-1)``, never
    up-down); a crop shifts the image within 2 pixels, zeros filling only what it shifted in
    (zero padding, not reflection); an erased hole is one rectangle of 5-20 % of the image."""
    x = torch.rand(256, 3, 16, 16) + 1  # no zero pixel of its own
    flipped = random_flip(x, torch.Generator().manual_seed(0))
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert bool((mirrored | (flipped == x).flatten(1).all(1)).all())
    assert 0.35 < float(mirrored.float().mean()) < 0.65
    cropped = random_crop(x, 2, torch.Generator().manual_seed(0))
    zeros = cropped == 0
    assert not bool(zeros[..., 2:-2, 2:-2].any())  # the centre always comes from the image
    for i in range(len(x)):  # each crop is x shifted by one offset, zeros shifted in
        hits = [
            (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
            if torch.equal(cropped[i], _shifted(x[i], dy, dx))
        ]  # fmt: skip
        assert len(hits) == 1, i
    erased = random_erase(x, AugmentConfig(erase_p=1.0), torch.Generator().manual_seed(0))
    hole = (erased == 0)[:, 0]
    assert bool(((erased == 0) == hole[:, None]).all())  # every channel alike
    area = hole.flatten(1).float().mean(1)
    assert bool((area > 0.04).all() and (area < 0.22).all())  # 5-20 %, up to rounding
    rows, cols = hole.any(2), hole.any(1)
    box = rows.sum(1) * cols.sum(1)  # a rectangle fills its bounding box
    assert torch.equal(box, hole.flatten(1).sum(1))


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` moved by ``(dy, dx)`` pixels, zeros shifted in."""
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    h, w = image.shape[-2:]
    return padded[..., 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]


def test_a_step_draws_its_slice_of_a_seeded_epoch_permutation():
    """Epochs of a shuffled set (the scripts' ``DataLoader(shuffle=True)``): within an epoch no
    image twice, ``size // batch`` steps of ``batch`` images, a new order each epoch, the same
    indices for the same ``(seed, step)`` (a resumed run draws what it would have)."""
    size, batch = 103, 10
    epoch0 = torch.cat([epoch_batch(size, batch, 0, step) for step in range(10)])
    assert len(epoch0) == 100 and len(set(epoch0.tolist())) == 100
    assert int(epoch0.min()) >= 0 and int(epoch0.max()) < size
    epoch1 = torch.cat([epoch_batch(size, batch, 0, step) for step in range(10, 20)])
    assert len(set(epoch1.tolist())) == 100 and not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch_batch(size, batch, 0, 13), epoch1[30:40])
    assert not torch.equal(epoch_batch(size, batch, 1, 3), epoch0[30:40])  # the seed matters
    with pytest.raises(ValueError, match="batch_size 200 is larger than the training set"):
        epoch_batch(size, 200, 0, 0)
    epoch_batch(size, batch, 0, 0)[:] = -1  # a caller's edit leaves the epoch's order intact
    assert torch.equal(epoch_batch(size, batch, 0, 0), epoch0[:10])


def test_no_two_seeds_or_steps_draw_the_same_augmentation_and_none_the_initialisations():
    """Seeded ``seed * 1_000_003 + step``, seed 0 drew at step 1,000,003 (a long budgeted run)
    what seed 1 drew at step 0, and seed 0's step 0 what ``torch.manual_seed(0)`` drew for the
    weights."""
    from stablenets.train.tasks import step_generator

    def draw(g: torch.Generator) -> torch.Tensor:
        return torch.rand(8, generator=g)

    cpu = torch.device("cpu")
    draws = [draw(step_generator(s, t, cpu)) for s, t in [(0, 0), (0, 1), (1, 0), (0, 1_000_003)]]
    draws.append(draw(torch.Generator().manual_seed(0)))
    assert len({tuple(d.tolist()) for d in draws}) == len(draws)
    assert torch.equal(draws[1], draw(step_generator(0, 1, cpu)))  # (seed, step) alone decide


def test_the_loop_trains_on_its_seeds_epoch_batches(tmp_path, monkeypatch):
    """Every step's images come from ``epoch_batch`` with the run's seed and step, on the
    images' device (the seed of ``TrainConfig``, not a constant)."""
    import stablenets.train.tasks as tasks

    calls = []

    def recorded(size, batch, seed, step, device="cpu"):  # noqa: ANN202
        calls.append((size, batch, seed, step, str(device)))
        return epoch_batch(size, batch, seed, step, device)

    monkeypatch.setattr(tasks, "epoch_batch", recorded)
    _tiny_run(tmp_path, steps=4, seed=3)
    assert calls == [(64, 8, 3, step, "cpu") for step in range(4)]


TINY = {"base_width": 4, "stages": 2, "blocks_per_stage": 1, "input_size": 8}


def _tiny_run(
    tmp_path: Path,
    task_type: type[ClassificationTask] = ClassificationTask,
    time: float | None = None,
    on_line: Callable[[str], None] | None = None,
    **train_kwargs,
) -> tuple[list[str], RunState]:
    """A seeded nonexpansive classifier (2 blocks, integration time ``time``) trained on random
    8x8 images; its log lines (each also given to ``on_line``)."""
    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", **TINY, time=time)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    task = task_type(x, y, x[:16], y[:16], AugmentConfig(), eval_batch=16)
    cfg = TrainConfig(batch_size=8, **{"lr_max": 0.05, "val_every": 100, **train_kwargs})
    logs: list[str] = []

    def log(line: str) -> None:
        logs.append(line)
        if on_line is not None:
            on_line(line)

    _, state = train(model, task, cfg, tmp_path, "h", log)
    return logs, state


def test_the_peak_memory_a_checkpoint_records_includes_the_validation_before_it(
    tmp_path, monkeypatch
):
    """The peak was read after each step, before its validation: a validation's peak counted only
    if a step followed it in the same process, so the last one never did, and a run resumed from
    a checkpoint at a validation reported a third less (1,035 MiB against 1,604)."""
    now = {"mb": 100.0}
    monkeypatch.setattr(loop, "peak_memory_mb", lambda device: now["mb"])
    validate = loop._validate

    def validate_at_peak(*args, **kwargs):
        now["mb"] = 900.0  # what this validation holds at its peak
        return validate(*args, **kwargs)

    monkeypatch.setattr(loop, "_validate", validate_at_peak)
    _, state = _tiny_run(tmp_path, steps=4, val_every=4)
    assert state.peak_memory_mb == 900.0
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["run"]["peak_memory_mb"] == 900.0
    # a run stopped by a signal at step 3, rerun with stop_after 3: its stop's validation too
    now["mb"] = 100.0

    def term_at_3(line: str) -> None:
        if line.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        _tiny_run(tmp_path / "cut", steps=8, val_every=8, log_every=1, on_line=term_at_3)
    _, state = _tiny_run(tmp_path / "cut", steps=8, val_every=8, log_every=1, stop_after=3)
    assert state.peak_memory_mb == 900.0 and state.best_step == 3


def test_a_budgeted_run_that_lost_its_step_count_takes_its_checkpoints_schedule(
    tmp_path, monkeypatch
):
    """With ``budget.json`` gone and the checkpoint kept, the rerun measured the step time
    again: another count than the schedule the checkpoint restored, so the run stopped at that
    schedule's end with the scheduler's traceback (or ended before its rate annealed)."""
    from stablenets.train import budget

    settings = {"steps": 10_000, "budget_minutes": 1.0, "val_every": 1000, "log_every": 5}
    monkeypatch.setattr(budget, "seconds_per_step", lambda *a, **k: 6.0)  # 10 steps
    _tiny_run(tmp_path, stop_after=4, **settings)
    (tmp_path / "budget.json").unlink()
    monkeypatch.setattr(budget, "seconds_per_step", lambda *a, **k: 5.0)  # 12 steps
    logs, state = _tiny_run(tmp_path, **settings)
    assert state.step == 10 and f"resumed from {tmp_path / 'checkpoint.pt'} at step 4" in logs
    assert any("10 steps, the schedule of the checkpoint resumed" in line for line in logs)
    assert json.loads((tmp_path / "budget.json").read_text())["steps"] == 10


def test_the_budget_is_timed_on_the_weights_the_run_starts_from(tmp_path, monkeypatch):
    """``budget_minutes``: the timed copy steps at learning rate 0, so its norms, and the
    sub-steps that they set and that a step costs, are those the run starts with; a schedule of
    the timed steps' own reached its peak rate within them and timed a model never trained."""

    copies, counts = [], []
    build = loop.step_graphs

    def recorded(model, *args, **kwargs):  # noqa: ANN202
        copies.append(model)
        return build(model, *args, **kwargs)

    def timed(step: Callable[[], None], sync: Callable[[], None]) -> float:
        for _ in range(6):
            step()
            counts.append([b.last_substeps for b in copies[0].constrained_blocks()])
        return 1.0  # s per step: the budget below gives 3 steps

    monkeypatch.setattr(loop, "step_graphs", recorded)
    monkeypatch.setattr(loop.budget, "seconds_per_step", timed)
    torch.manual_seed(0)
    start = build_model("nonexpansive_classifier", **TINY, time=4.0).state_dict()
    _, state = _tiny_run(tmp_path, time=4.0, steps=2, budget_minutes=0.05, lr_max=2.0)
    assert state.step == 3
    probe = copies[0].state_dict()
    power = (".u", ".sigma_estimate")  # the power iteration's state: it runs at every step
    assert all(torch.equal(probe[k], v) for k, v in start.items() if not k.endswith(power))
    assert all(c == counts[0] for c in counts), counts


PROGRESS = re.compile(
    r"step (\d+)/(\d+) loss (\S+) lr (\S+) substeps (\d+) ms/step ([0-9.]+|n/a) "
    r"peak_mem (\d+)MiB eta (\d+s|\d+m\d\ds|\d+h\d\dm|n/a)"
)


def test_a_progress_line_every_log_every_steps_gives_loss_lr_substeps_time_memory_and_eta(
    tmp_path,
):
    """The first line, after this process's first step alone (its start-up), has no pace yet:
    ``ms/step n/a`` and ``eta n/a``; the later ones do."""
    logs, state = _tiny_run(tmp_path, steps=9, log_every=4)
    lines = [m for line in logs if (m := PROGRESS.fullmatch(line))]
    rows = [r for r in state.rows if r["kind"] == "train"]
    assert [int(m[1]) for m in lines] == [r["step"] for r in rows] == [0, 4, 8]
    for m, row in zip(lines, rows, strict=True):
        assert int(m[2]) == 9 and int(m[5]) == row["substeps"] >= 2
        assert m[3] == f"{row['loss']:.4f}" and m[4] == f"{row['lr']:.3g}" and int(m[7]) > 0
    assert (lines[0][6], lines[0][8]) == ("n/a", "n/a")
    assert all(float(m[6]) > 0 for m in lines[1:])
    assert lines[-1][8] == "0s"  # the last logged step is the last step


def test_the_pace_and_time_left_of_progress_lines_leave_the_start_up_of_the_first_step_out(
    tmp_path, monkeypatch
):
    """A first step that takes 2 s longer (start-up: the CUDA context, cuDNN's tuning, a graph
    capture) is in no line's ms/step or eta: not in a fresh run's, whose first line has none
    yet, nor after a resume, whose first line comes steps after its first step."""

    step = loop._train_step

    def slow_start(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if not calls:
            time.sleep(2.0)
        calls.append(1)
        step(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", slow_start)
    paces = {}
    for name, kwargs in (("fresh", {"stop_after": 5}), ("resumed", {})):
        calls: list[int] = []
        logs, _ = _tiny_run(tmp_path, steps=12, log_every=4, checkpoint_every=100, **kwargs)
        lines = [m for line in logs if (m := PROGRESS.fullmatch(line))]
        paces[name] = [(int(m[1]), m[6], m[8]) for m in lines]
    assert [s for s, _, _ in paces["fresh"]] == [0, 4] and paces["fresh"][0][1:] == ("n/a", "n/a")
    assert [s for s, _, _ in paces["resumed"]] == [8]  # resumed at step 5
    # 2 s over a window of 4 or 3 steps would be 500 ms/step or more, the time left over 1 s
    for _, pace, eta in (paces["fresh"][1], paces["resumed"][0]):
        assert float(pace) < 500 and eta in ("0s", "1s"), paces


def test_cuda_graph_captures_in_a_progress_window_are_left_out_of_its_pace(monkeypatch):
    """Seconds counted as start-up in a later step (CUDA graph captures, ``startup_s``) are not
    in the pace of the line whose window holds them. A stand-in clock: 5 s of start-up in the
    first step, then 4 steps of 0.1 s and a 2 s capture."""

    clock = iter([0.0, 5.0, 7.4])
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    progress = loop._Progress(105, 0, torch.device("cpu"))
    progress.started(1, 5.0)
    state = RunState(step=5, startup_s=7.0, rows=[{"step": 4, "loss": 1.0, "lr": 0.1,
                                                   "substeps": 2}])  # fmt: skip
    line = progress.line(state)
    assert " ms/step 100.0 " in line and line.endswith(" eta 10s"), line


def test_memory_fraction_leaves_room_for_what_the_activation_estimate_leaves_out():
    """The paper denoiser's pass holds about 6 block inputs beyond the estimate (the last
    block's whole output, the gradients in flight): at ``memory_fraction: 1`` the guard let a
    pass through that needed 1 GiB more than there was. The schema and the library agree."""
    root = Path(__file__).resolve().parents[1]
    schema = yaml.safe_load((root / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["$defs"]["memory_fraction"]["maximum"] == MAX_MEMORY_FRACTION < 1
    assert TrainConfig(steps=10, batch_size=2, memory_fraction=MAX_MEMORY_FRACTION)
    with pytest.raises(
        ValueError, match=rf"memory_fraction must be in \(0, {MAX_MEMORY_FRACTION}\]"
    ):
        TrainConfig(steps=10, batch_size=2, memory_fraction=1.0)


def test_a_remat_setting_other_than_auto_true_or_false_is_refused_in_one_line():
    """``remat: off`` (or ``no``, ``"False"``, a typo) would be true, checkpointing every block."""
    for remat in ("off", "no", "False", "ato", 1, None):
        with pytest.raises(ValueError) as err:
            TrainConfig(steps=10, batch_size=2, remat=remat)  # type: ignore[arg-type]
        assert str(err.value) == f"remat must be 'auto', true or false, got {remat!r}"
    for remat in ("auto", True, False):
        assert TrainConfig(steps=10, batch_size=2, remat=remat).remat == remat


def test_the_validation_line_names_the_step_its_loss_and_lr_come_from_when_not_the_last(
    tmp_path,
):
    logs, state = _tiny_run(tmp_path, steps=6, log_every=4)  # logged: steps 0 and 4, run: 0-5
    val = [line for line in logs if "val_" in line]
    assert len(val) == 1 and val[0].startswith("step 6 loss "), val
    row = [r for r in state.rows if r["kind"] == "train"][-1]
    assert row["step"] == 4 and f"loss {row['loss']:.4f} (step 4) val_" in val[0]
    logs, _ = _tiny_run(tmp_path / "every", steps=6, log_every=1)
    assert re.match(r"step 6 loss \S+ val_", next(line for line in logs if "val_" in line))


def test_the_substep_limit_stops_training_before_the_first_forward_pass_that_exceeds_it(
    tmp_path,
):
    """Two blocks start with one sub-step each: a limit of 2 lets the run go, 1 stops it before
    step 0's forward pass, naming the key, a block, its count and norm, and no checkpoint yet."""
    logs, state = _tiny_run(tmp_path / "two", steps=4, log_every=1, max_substeps=2)
    assert state.step == 4 and all(r["substeps"] == 2 for r in state.rows if r["kind"] == "train")
    with pytest.raises(SubstepLimitError) as err:
        _tiny_run(tmp_path / "one", steps=4, log_every=1, max_substeps=1)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, DivergenceError)
    assert re.fullmatch(
        r"training stopped at step 0: the forward pass would take 2 sub-steps, above "
        r"train\.max_substeps=1 \(their activations would not fit in memory\); block "
        r"stages\.[01]\.0 needs 1 at norm estimate [0-9.]+; last good checkpoint: none",
        message,
    ), message


def _bytes_autograd_saves(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The truth ``activation_cost`` predicts: every tensor one training pass saves for its
    backward pass, each storage once, parameters left out."""
    return _saves(lambda: model.train()(x), model)


def _saves(run: Callable[[], object], model: torch.nn.Module) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> None:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storage.nbytes() for storage in saved.values())


def _recomputed(model: StableModel, x: torch.Tensor) -> int:
    """The largest sub-step on ``x``'s batch of a block that checkpoints them: what the
    backward pass recomputes at a time (0 without such a block)."""
    inputs: dict[torch.nn.Module, torch.Tensor] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0].detach()))
             for b in model.constrained_blocks()]  # fmt: skip
    with torch.no_grad():
        model.train()(x)
    for hook in hooks:
        hook.remove()
    sizes = [0]
    for block in model.constrained_blocks():
        if block.checkpoints((y := inputs[block]).numel() * y.element_size()):
            _, h = block.schedule(y)
            sizes.append(_saves(lambda b=block, y=y, h=h: b._substep(y.requires_grad_(), h), model))
    return max(sizes)


@pytest.mark.parametrize(
    "name, kwargs, remat, shape",
    [
        ("nonexpansive_classifier", {"base_width": 4, "input_size": 8}, None, (3, 8, 8)),
        ("nonexpansive_classifier", {"base_width": 4, "input_size": 8, "integrator": "ssprk3"},
         None, (3, 8, 8)),
        ("nonexpansive_classifier", {"base_width": 4, "input_size": 8, "integrator": "rk4"},
         None, (3, 8, 8)),
        ("cpl_classifier", {"base_width": 4, "input_size": 8}, None, (3, 8, 8)),
        ("cpl_classifier", {"base_width": 4, "input_size": 8}, True, (3, 8, 8)),  # no remat
        ("nonexpansive_denoiser", {"width": 6, "depth": 3, "integrator": "heun"}, True, (3, 9, 7)),
        ("nonexpansive_denoiser", {"width": 6, "depth": 3}, False, (3, 9, 7)),
        ("resnet_classifier", {"base_width": 4, "input_size": 8}, None, (3, 8, 8)),
    ],
)  # fmt: skip
def test_the_activation_cost_is_what_autograd_saves_at_any_sub_step_counts(
    name, kwargs, remat, shape
):
    """Measured once at the job's start (one sub-step per block on one and two images), the
    cost must predict a whole training pass at another batch and other counts, each block's
    its own (norms scaled at random), with sub-steps checkpointed (only their input kept) or
    not; it may overcount a weight-sized tensor shared by a block's sub-steps, nothing more."""
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    for block in model.constrained_blocks():
        block.checkpoint_substeps = remat
    batch = 5
    cost = activation_cost(model, torch.rand(1, *shape), batch)
    for trial in range(3):
        with torch.no_grad():
            for block in model.constrained_blocks():
                block.operator.weight.mul_(1 + 2 * torch.rand(()).item())
        model.update_norms(30)
        counts = [b.substeps(b.current_norm()) for b in model.constrained_blocks()]
        # counts differ between blocks (a CPL block is one step at any norm; a ResNet has none)
        assert trial == 0 or len(set(counts)) > 1 or name in ("cpl_classifier", "resnet_classifier")
        # the forward pass's saves, and the sub-step the backward pass recomputes (remat)
        x = torch.rand(batch, *shape)
        truth = _bytes_autograd_saves(model, x) + _recomputed(model, x)
        blocks = model.constrained_blocks()
        remats = [b.checkpoints(batch * n) for b, n in zip(blocks, cost.inputs, strict=True)]
        predicted = cost.bytes(counts, remats)
        assert truth <= predicted <= truth + sum(counts) * max(cost.shared, default=0), (
            counts, truth, predicted)  # fmt: skip
    if remat and name == "nonexpansive_denoiser":  # one input per sub-step, one recomputed
        assert all(k == 4 * 6 * 9 * 7 < s for k, s in zip(cost.inputs, cost.stages, strict=True))


def test_the_paper_classifiers_activation_cost_is_three_activations_per_euler_sub_step():
    """The arithmetic of config.yaml's comment: 24, 12 and 6 MiB per sub-step of the stage-1, 2
    and 3 blocks at batch 128 (16 ch x 32x32, 32 x 16x16, 64 x 8x8, float32, 3 activations)."""
    cost = activation_cost(build_model("nonexpansive_classifier"), torch.rand(1, 3, 32, 32), 128)
    mib = [cost.block_bytes(i, 1, False) / 2**20 for i in range(15)]
    assert mib == [24.0] * 5 + [12.0] * 5 + [6.0] * 5
    assert cost.bytes([1] * 15, [False] * 15) == 128 * cost.fixed + 2**20 * sum(mib)


def test_the_memory_left_is_read_under_every_cgroup_limit_above_the_process(tmp_path):
    """A SLURM step (cgroup v2) or a container (v1) caps the host's memory: the limit left is
    the least over the process's group and those above it, the page cache the kernel reclaims
    counted as free; "max" and v1's "unlimited" are no limit."""
    v2, v1 = tmp_path / "unified", tmp_path / "memory"
    files = {
        v2 / "system.slice/job_7/memory.max": "8589934592",  # the job: 8 GiB, 5 used, 1 of cache
        v2 / "system.slice/job_7/memory.current": "5368709120",
        v2 / "system.slice/job_7/memory.stat": "anon 4294967296\ninactive_file 1073741824",
        v2 / "system.slice/job_7/step_0/memory.max": "max",  # the step: no own limit
        v2 / "system.slice/job_7/step_0/memory.current": "5368709120",
        v2 / "memory.max": "max",
        v1 / "docker/abc/memory.limit_in_bytes": "4294967296",  # the container: 4 GiB, 3.5 used
        v1 / "docker/abc/memory.usage_in_bytes": "3758096384",
        v1 / "docker/abc/memory.stat": "cache 0\ntotal_inactive_file 0",
        v1 / "memory.limit_in_bytes": "9223372036854771712",  # the root: unlimited
        v1 / "memory.usage_in_bytes": "9000000000",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    membership = tmp_path / "cgroup"
    membership.write_text("4:memory:/docker/abc\n3:cpu:/elsewhere\n0::/system.slice/job_7/step_0\n")
    cgroups = {"v2": (v2, _CGROUPS["v2"][1]), "v1": (v1, _CGROUPS["v1"][1])}
    assert sorted(_cgroup_left(membership, cgroups)) == [2**29, 4 * 2**30]
    membership.write_text("0::/\n")
    assert _cgroup_left(membership, cgroups) == []


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_measuring_the_activation_cost_leaves_the_model_as_it_was(mode):
    """The probe runs a pass in ``train()`` mode: a batch norm's running statistics (DnCNN) and
    the model's mode must come out as they went in, or ``auto`` would change trained numbers."""
    torch.manual_seed(0)
    for model in (build_model("dncnn", depth=3, width=4), build_model("nonexpansive_denoiser",
                                                                       width=4, depth=2)):  # fmt: skip
        model.train(mode == "train")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        activation_cost(model, torch.rand(1, 3, 8, 8), 4)
        assert model.training == (mode == "train")
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), model


class _Graphs:
    """What ``_check_substeps`` reads of ``StepGraphs`` (CUDA-only): the passes captured, the
    pool's high-water mark."""

    def __init__(self, *counts: tuple[int, ...], remat: bool = False) -> None:
        self.captured = [(c, (remat,) * len(c)) for c in counts]
        self.enabled, self.why, self.pool_peak = True, "", 0

    def captured_passes(self) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
        return self.captured

    def turn_off(self, why: str, short: str) -> None:
        self.enabled, self.why = False, why


def test_a_pass_that_fits_alone_but_not_beside_the_graphs_pool_turns_the_graphs_off(tmp_path):
    """The graphs' pool holds the largest pass captured; a pass that is not replayed (eager, or
    being captured) allocates beside it. With room for 1.5 passes at the current counts: a
    replayed pass, or one with no pool, goes on with the graphs; one beside a pool of twice its
    counts turns them off, in a line; one larger than the room stops the job."""
    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", base_width=4, stages=2, blocks_per_stage=1,
                        input_size=8).train()  # fmt: skip
    cost = activation_cost(model, torch.rand(1, 3, 8, 8), 8)
    counts = tuple(b.substeps(b.current_norm()) for b in model.constrained_blocks())
    need = cost.bytes(counts, [False] * len(counts))
    limit = SubstepLimit(None, cost, budget=need * 3 // 2, free=need * 2, where="on the test")
    ckpt = tmp_path / "checkpoint.pt"
    replayed, beside, none = _Graphs(counts), _Graphs(tuple(2 * n for n in counts)), _Graphs()
    for graphs in (replayed, none):
        _check_substeps(0, model, limit, ckpt, graphs, print)  # type: ignore[arg-type]
        assert graphs.enabled
    _check_substeps(0, model, limit, ckpt, beside, print)  # type: ignore[arg-type]
    assert not beside.enabled and re.fullmatch(
        rf"the pass at {sum(counts)} sub-steps \([0-9.]+ MiB\) would not fit beside the graphs' "
        r"memory pool \([0-9.]+ MiB\) in [0-9.]+ MiB", beside.why), beside.why  # fmt: skip
    with pytest.raises(SubstepLimitError, match="would take .* above the"):
        _check_substeps(0, model, SubstepLimit(None, cost, need - 1, need, "x"), ckpt, none, print)  # type: ignore[arg-type]
    # A pool captured checkpointed holds the checkpointed pass, even when the next pass (grown
    # counts, unchecked: there is room) keeps more: priced as the pass runs now, the two would
    # seem not to fit.
    with torch.no_grad():
        for block in model.constrained_blocks():
            block.time.mul_(9)
    grown = tuple(b.substeps(b.current_norm()) for b in model.constrained_blocks())
    plain, checked = (cost.bytes(grown, [r] * len(grown)) for r in (False, True))
    limit = SubstepLimit(None, cost, plain + checked, 2 * plain, "on the test")
    checked_pool = _Graphs(grown, remat=True)
    _check_substeps(1, model, limit, ckpt, checked_pool, print)  # type: ignore[arg-type]
    assert not any(b.checkpoint_substeps for b in model.constrained_blocks())
    assert checked_pool.enabled, "the pool was priced as the pass runs now"


def test_the_graphs_pool_is_priced_at_the_largest_pass_ever_captured_also_once_evicted(tmp_path):
    """The graphs share one memory pool, which keeps the blocks of a graph evicted from the
    cache (they go only with the last graph sharing the pool): a pass beside the pool is
    priced against the largest pass ever captured, not only those still cached."""
    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", base_width=4, stages=2, blocks_per_stage=1,
                        input_size=8).train()  # fmt: skip
    cost = activation_cost(model, torch.rand(1, 3, 8, 8), 8)
    counts = tuple(b.substeps(b.current_norm()) for b in model.constrained_blocks())
    big = tuple(3 * n for n in counts)
    need, held = cost.bytes(counts, [False] * 2), cost.bytes(big, [False] * 2)
    ckpt = tmp_path / "checkpoint.pt"
    graphs = _Graphs(big)  # the big pass captured: it fits beside it, just
    _check_substeps(0, model, SubstepLimit(None, cost, need + held, 2 * need + held, "t"), ckpt,
                    graphs, print)  # type: ignore[arg-type]  # fmt: skip
    assert graphs.enabled
    graphs.captured = [(tuple(2 * n for n in counts), (False, False))]  # the big one evicted
    _check_substeps(1, model, SubstepLimit(None, cost, need + held - 1, 2 * need + held, "t"),
                    ckpt, graphs, print)  # type: ignore[arg-type]  # fmt: skip
    assert not graphs.enabled and f"graphs' memory pool ({_size(held)})" in graphs.why, graphs.why


def test_the_budget_before_a_pass_shrinks_with_the_memory_free_then_never_grows(monkeypatch):
    """Another process (or memory this one's heap gave back and someone took) can leave less
    than at the start: the budget follows it down, never up."""
    start = SubstepLimit(None, None, budget=800, free=1000, where="at start", fraction=0.8,
                         device=torch.device("cpu"))  # fmt: skip
    for free, budget, where in ((500, 400, "now"), (2000, 800, "at start")):
        monkeypatch.setattr("stablenets.train.loop.free_memory", lambda d, f=free: (f, "now"))
        now = start.now()
        assert (now.budget, now.where) == (budget, where)
    assert SubstepLimit(None, budget=5).now().budget == 5  # no device: a fixed budget


@pytest.mark.parametrize("remat", [(False, False), None])  # fixed unchecked; remat: auto
def test_a_pass_that_fit_fits_again_at_its_counts_when_only_its_freed_memory_is_missing(
    tmp_path, monkeypatch, remat
):
    """CPU, ``max_substeps: auto``: the activations a pass freed stay in this process's heap,
    which the kernel counts as taken (the memory free drops by them), but the next pass reuses
    them. At the same counts the next pass still runs unchecked; another process taking
    memory, or the heap giving its memory back to someone else, still stops it (or, under
    ``remat: auto``, checkpoints it). Free memory and the heap's free bytes are stand-ins."""
    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", **TINY, time=REMAT_TIME).train()
    cost = activation_cost(model, torch.rand(1, 3, 8, 8), 8)
    counts = [b.substeps(b.current_norm()) for b in model.constrained_blocks()]
    need = cost.bytes(counts, [False] * len(counts))
    start = 3 * need // 2  # room for the pass (80 %: 1.2 passes), not for the pass twice
    limit = SubstepLimit(None, cost, budget=int(0.8 * start), free=start, where="at start",
                         remat=remat, fraction=0.8, device=torch.device("cpu"))  # fmt: skip
    ckpt = tmp_path / "checkpoint.pt"

    def before_pass(step: int, free: int, heap: int) -> list[bool | None]:
        monkeypatch.setattr("stablenets.train.loop.free_memory", lambda d: (free, "here"))
        monkeypatch.setattr("stablenets.train.loop.heap_free", lambda: heap, raising=False)
        _check_substeps(step, model, limit, ckpt, None, print)
        return [b.checkpoint_substeps for b in model.constrained_blocks()]

    assert not any(before_pass(0, start, 0))
    # the pass ran: its activations, freed, are in the heap (with some more)
    assert not any(before_pass(1, start - need, 2 * need)), "the same pass, refused or checked"
    assert not any(before_pass(2, start - need, need))
    # room for the pass with both blocks checkpointed, not unchecked
    room = math.ceil(cost.bytes(counts, [True] * len(counts)) / 0.8)
    assert int(0.8 * room) < need
    pressed = {"another process took memory": (room // 2, room - room // 2),
               "the heap gave the pass back, someone took it": (room, 0)}  # fmt: skip
    for why, (free, heap) in pressed.items():
        if remat is None:
            assert any(before_pass(3, free, heap)), why
            _set_remat(model, [False] * len(counts))
        else:
            with pytest.raises(SubstepLimitError, match="above the"):
                before_pass(3, free, heap)


# 2 sub-steps in all (one per block) for eight steps, 6 at step 8
GROWING = {"steps": 10, "log_every": 1, "lr_max": 2.0, "warmup": 0.3}
# at T = 15: 8 sub-steps per block for seven steps, then the second block grows to 9 at step 7
REMAT_GROWING, REMAT_TIME = {**GROWING, "lr_max": 0.4}, 15.0


def test_the_automatic_limit_stops_before_the_first_pass_whose_activations_exceed_it(
    tmp_path, monkeypatch
):
    """``max_substeps: auto`` with a device that has room for exactly the first passes: the
    run stops before the first forward pass whose predicted activations do not fit, by name
    (sub-steps unchecked: checkpointing could not make room here either)."""
    logs, state = _tiny_run(tmp_path / "free", **GROWING)
    counts = [r["substeps"] for r in state.rows if r["kind"] == "train"]
    first = next(i for i, n in enumerate(counts) if n > counts[0])  # the first growth
    model = build_model(
        "nonexpansive_classifier", base_width=4, stages=2, blocks_per_stage=1, input_size=8
    )
    room = activation_cost(model, torch.rand(1, 3, 8, 8), 8).bytes([1, 1], [False, False])
    free = math.ceil(room / 0.8) + 1  # 80 % of it holds the first passes, not the one that grew
    monkeypatch.setattr("stablenets.train.loop.free_memory", lambda device: (free, "on the test"))
    with pytest.raises(SubstepLimitError) as err:
        _tiny_run(tmp_path / "tight", **GROWING, remat=False)
    assert re.fullmatch(
        rf"training stopped at step {first}: the forward pass would take {counts[first]} "
        r"sub-steps keeping [0-9.]+ [KMG]iB of activations, above the [0-9.]+ [KMG]iB that "
        r"train\.max_substeps=auto allows \(80% of the [0-9.]+ [KMG]iB on the test\); block "
        r"stages\.[01]\.0 needs \d+ at norm estimate [0-9.]+; last good checkpoint: none",
        str(err.value),
    ), (str(err.value), counts)


def _rerun_substeps(counts: Sequence[int], remat: Sequence[bool]) -> int:
    """The sub-steps a backward pass runs again: those of the checkpointed blocks."""
    return sum(n for n, r in zip(counts, remat, strict=True) if r)


def test_remat_auto_checkpoints_the_fewest_sub_steps_that_make_the_pass_fit():
    """Against every choice of blocks (brute force) on a classifier of 6 blocks in 3 stages, at
    random counts and budgets: no block while the pass fits unchecked; else a choice that fits
    and recomputes no more sub-steps than any other that fits; every block where nothing
    fits."""
    model = build_model("nonexpansive_classifier", blocks_per_stage=2)
    cost = activation_cost(model, torch.rand(1, 3, 32, 32), 128)
    choices = list(itertools.product([False, True], repeat=6))
    g = torch.Generator().manual_seed(0)
    seen = {"unchecked": 0, "some": 0, "none fits": 0}
    for _ in range(300):
        counts = torch.randint(1, 40, (6,), generator=g).tolist()
        need = {r: cost.bytes(counts, r) for r in choices}
        low, high = min(need.values()), need[(False,) * 6]
        budget = int(low + (high - low) * (1.2 * torch.rand(1, generator=g).item() - 0.1))
        chosen = tuple(_remat(SubstepLimit(None, cost, budget), counts))
        fits = [r for r in choices if need[r] <= budget]
        if high <= budget:
            assert chosen == (False,) * 6
            seen["unchecked"] += 1
        elif not fits:
            assert chosen == (True,) * 6
            seen["none fits"] += 1
        else:
            best = min(_rerun_substeps(counts, r) for r in fits)
            assert need[chosen] <= budget, (counts, budget, chosen)
            assert _rerun_substeps(counts, chosen) == best, (counts, budget, chosen)
            seen["some"] += 1
    assert min(seen.values()) > 20, seen


def test_remat_auto_says_at_once_that_nothing_fits_a_runaway_pass_without_its_dynamic_program(
    monkeypatch,
):
    """1.5 million sub-steps (a norm below ``max_norm`` can ask for 10,000x the initial count)
    over 15 blocks of the paper classifier's sizes: even every block checkpointed keeps more
    than the budget, which a bound says before the dynamic program over the sub-step total
    (seconds and hundreds of MiB at this count) would run; ``None`` in well under a second."""
    from stablenets.train import memory

    stages = tuple([3 * 4 * 64 * 32 * 32] * 5 + [3 * 4 * 128 * 16 * 16] * 5
                   + [3 * 4 * 256 * 8 * 8] * 5)  # fmt: skip
    cost = memory.ActivationCost(stages=stages, inputs=tuple(s // 3 for s in stages),
                                 shared=(0,) * 15, checkpointable=(True,) * 15, fixed=10**6,
                                 batch=128)  # fmt: skip
    counts = [100_000] * 15

    def no_program(*args: object) -> None:
        raise AssertionError("the dynamic program ran")

    monkeypatch.setattr(memory, "_frees", no_program)
    assert cost.cheapest_remat(counts, budget=40 * 2**30) is None  # no_program: not run
    assert cost.bytes(counts, [True] * 15) > 40 * 2**30  # (nothing fits indeed)


def test_remat_auto_checkpoints_the_cheapest_blocks_each_pass_needs_with_bitwise_same_weights(
    tmp_path, monkeypatch
):
    """``remat: auto`` under ``max_substeps: auto``, on a run whose sub-step counts grow: before
    each pass, the blocks checkpointed are the cheapest choice that fits (here brute force
    finds it), a log line says when that changes, and every sub-step of a checkpointed block
    is checkpointed (counted); the weights are those of a run never checkpointed and of one
    always checkpointed, to the bit (checkpointing recomputes the same sub-steps)."""
    _, state = _tiny_run(tmp_path / "free", time=REMAT_TIME, **REMAT_GROWING, remat=False)
    rows = [r for r in state.rows if r["kind"] == "train"]
    counts = [[r[f"block{i}_substeps"] for i in range(2)] for r in rows]
    cost = activation_cost(build_model("nonexpansive_classifier", **TINY, time=REMAT_TIME),
                           torch.rand(1, 3, 8, 8), 8)  # fmt: skip
    choices = list(itertools.product([False, True], repeat=2))
    need = [{r: cost.bytes(c, r) for r in choices} for c in counts]
    # room for both blocks checkpointed at every step, one block alone at none
    both = (
        max(n[True, True] for n in need) + min(min(n[True, False], n[False, True]) for n in need)
    ) // 2
    # room for the first passes unchecked, not the first that grew: then the growing block
    # checkpointed
    grown = next(i for i, c in enumerate(counts) if c != counts[0])
    partly = (need[0][False, False] + need[grown][False, False]) // 2
    for budget, kinds in ((partly, 2), (both, 1)):
        monkeypatch.setattr(
            "stablenets.train.loop.free_memory", lambda d, b=budget: (b / 0.8, "here")
        )
        expected = [
            min(
                (r for r in choices if n[r] <= budget),
                key=lambda r, c=c: (_rerun_substeps(c, r), sum(r)),
            )
            for c, n in zip(counts, need, strict=True)
        ]
        assert len(set(expected)) == kinds, expected
        calls = [0]  # sub-steps checkpointed: one call each

        def counted(*args, calls=calls, **kwargs):  # noqa: ANN202
            calls[0] += 1
            return checkpoint(*args, **kwargs)

        monkeypatch.setattr("stablenets.nn.blocks.checkpoint", counted)
        logs, auto = _tiny_run(tmp_path / f"auto{budget}", time=REMAT_TIME, **REMAT_GROWING)
        switches = [
            f"remat: {sum(r)} of 2 blocks checkpointed from step {row['step']}, where the pass "
            f"takes {sum(c)} sub-steps: "
            for i, (row, c, r) in enumerate(zip(rows, counts, expected, strict=True))
            if r != (expected[i - 1] if i else (False, False))
        ]
        lines = [line for line in logs if line.startswith("remat")]
        assert len(lines) == len(switches) > 0, "\n".join(logs)
        assert all(line.startswith(s) for line, s in zip(lines, switches, strict=True)), lines
        assert calls[0] == sum(_rerun_substeps(c, r) for c, r in zip(counts, expected, strict=True))
        assert all(torch.equal(auto.best_state[k], v) for k, v in state.best_state.items())
    monkeypatch.undo()
    _, always = _tiny_run(tmp_path / "always", time=REMAT_TIME, **REMAT_GROWING, remat=True)
    assert all(torch.equal(always.best_state[k], v) for k, v in state.best_state.items())


def _momenta(momentum, steps: int = 20, warmup: float = 0.5) -> list[float]:
    opt, sched = make_optimizer(
        build_model("nonexpansive_classifier", base_width=4),
        TrainConfig(steps=steps, batch_size=8, warmup=warmup, momentum=momentum),
    )
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    return seen


def test_the_momentum_cycles_as_the_authors_one_cycle_schedule_or_is_held():
    """The scripts pass 0.9 to SGD, and OneCycleLR's default cycle overrides it: 0.95 at the
    start, 0.85 at the learning rate's peak, 0.95 at the end. The pair reproduces that cycle
    exactly (a JSON spec's list too); a number is held."""
    for warmup in (0.5, 0.2):
        model = build_model("nonexpansive_classifier", base_width=4)
        opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=1.0, div_factor=1e5, total_steps=20, pct_start=warmup,
            anneal_strategy="linear")  # fmt: skip
        scripts = []
        for _ in range(20):
            scripts.append(opt.param_groups[0]["momentum"])
            opt.step()
            sched.step()
        assert _momenta([0.95, 0.85], warmup=warmup) == scripts
        assert scripts[0] == 0.95 and min(scripts) == 0.85 and scripts[-1] > 0.94
    assert _momenta(0.9) == [0.9] * 20
    assert TrainConfig(steps=10, batch_size=1).momentum == (0.95, 0.85)  # the scripts' default
    with pytest.raises(ValueError, match="a number or a pair"):
        TrainConfig(steps=10, batch_size=1, momentum=[0.9, 0.8, 0.7])


def test_a_schedule_one_cycle_cannot_take_is_refused_in_one_line_before_any_step():
    """A warm-up of exactly one step makes ``OneCycleLR`` divide by zero (each case below did);
    a start at or above the peak would warm up downward. Both are refused when the settings are
    made, or, with a ``budget_minutes``, when the derived steps build the schedule; each pair next
    to one that runs."""
    model = build_model("nonexpansive_classifier", base_width=4)
    for steps, warmup in ((2, 0.5), (10, 0.1), (4, 0.25)):
        with pytest.raises(ValueError, match=f"warmup {warmup} x steps {steps} is one warm-up"):
            TrainConfig(steps=steps, batch_size=1, warmup=warmup)
        with pytest.raises(ZeroDivisionError):  # what the check keeps from the jobs
            torch.optim.lr_scheduler.OneCycleLR(
                torch.optim.SGD(model.parameters(), lr=1.0),
                1.0,
                total_steps=steps,
                pct_start=warmup,
            )
        make_optimizer(model, TrainConfig(steps=steps + 1, batch_size=1, warmup=warmup))
    with pytest.raises(ValueError, match="lr_initial 0.01 must be below lr_max 0.01"):
        TrainConfig(steps=10, batch_size=1, lr_initial=0.01, lr_max=0.01)
    # no anneal left at warm-up 1: every step trained, then a division by zero at the last
    for warmup in (1.0, 1, 0.0):
        with pytest.raises(ValueError, match=f"warmup {warmup} must lie strictly between 0 and 1"):
            TrainConfig(steps=10, batch_size=1, warmup=warmup)
    budgeted = TrainConfig(steps=2, batch_size=1, budget_minutes=5.0)  # steps: a placeholder
    with pytest.raises(ValueError, match="warmup 0.5 x steps 2 is one warm-up step"):
        make_optimizer(model, budgeted)  # where the derived steps meet the schedule
    # under one step: the first step is the anneal's, at about the peak rate, no warm-up at all
    for steps, warmup in ((3, 0.2), (1, 0.5), (4, 0.2)):
        with pytest.raises(ValueError, match=f"x steps {steps} is under one warm-up step"):
            TrainConfig(steps=steps, batch_size=1, warmup=warmup)
        opt, sched = make_optimizer(model, TrainConfig(steps=10, batch_size=1, warmup=warmup))
        assert sched.get_last_lr()[0] < 0.01  # it starts low when the warm-up has a step
    opt, sched = make_optimizer(model, TrainConfig(steps=6, batch_size=1, warmup=0.2))
    assert sched.get_last_lr()[0] < 0.01  # 1.2 warm-up steps: the first at the initial rate


def test_the_budgets_calibration_takes_any_warm_up_the_run_takes(tmp_path, monkeypatch):
    """The calibration's own schedule (rate 0 throughout) had 11 steps: a warm-up of 0.05, which
    the budget's 1,000 steps take, made it under one step and refused."""
    monkeypatch.setattr(loop.budget, "seconds_per_step", lambda *a, **k: 0.06)  # 1,000 steps
    logs, state = _tiny_run(tmp_path, steps=10, budget_minutes=1.0, warmup=0.05, stop_after=2)
    assert state.step == 2 and any("1000 steps" in line for line in logs), logs


def test_a_budget_that_gives_a_one_step_warm_up_names_budget_minutes_not_steps(
    tmp_path, monkeypatch
):
    """The steps a ``budget_minutes`` derives are not the user's ``steps`` (a placeholder): the
    refusal of the schedule they make names the budget, whose change is the cure."""
    monkeypatch.setattr(loop.budget, "seconds_per_step", lambda *a, **k: 1.5)  # 2 steps
    with pytest.raises(ValueError, match=r"budget_minutes 0.05 gives 2 steps: .*change budget_"):
        _tiny_run(tmp_path, steps=10, budget_minutes=0.05)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_stop_after_ends_the_run_on_the_full_schedules_learning_rate_and_validates_its_last_step(
    tmp_path,
):
    logs, state = _tiny_run(tmp_path, steps=40_000, stop_after=6, log_every=1)
    assert state.step == 6 and "stopping after 6 steps of the 40000-step schedule" in logs[1]
    assert [r["step"] for r in state.rows if r["kind"] == "val"] == [6] and state.best_step == 6

    def lr_at(step: int, steps: int) -> float:
        """The learning rate of step ``step`` of a ``steps``-step one-cycle schedule."""
        opt, sched = make_optimizer(
            build_model("nonexpansive_classifier", base_width=4),
            TrainConfig(steps=steps, batch_size=8, lr_max=0.05),
        )
        for _ in range(step):
            opt.step()
            sched.step()
        return sched.get_last_lr()[0]

    last = [r for r in state.rows if r["kind"] == "train"][-1]
    assert last["step"] == 5 and last["lr"] == lr_at(5, 40_000)
    assert not math.isclose(last["lr"], lr_at(5, 6), rel_tol=0.5)  # not a compressed schedule


def test_a_run_stopped_early_is_checkpointed_at_its_last_step_and_a_later_stop_resumes_it(
    tmp_path,
):
    """``stop_after`` only stops (the schedule is the full run's): its last step is saved even off
    the ``checkpoint_every`` grid, a rerun with a later stop goes on from there (the resume hash
    leaves it out, like the other limits), and the clocks count each part of the work."""
    _, first = _tiny_run(tmp_path, steps=12, stop_after=5, val_every=4, checkpoint_every=4)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["run"]["step"] == 5
    # validated and saved at step 4 and at the stop; one start-up step
    assert (first.validations, first.checkpoints, first.startup_steps) == (2, 2, 1)
    logs, state = _tiny_run(tmp_path, steps=12, val_every=4, checkpoint_every=4)
    assert f"resumed from {tmp_path / 'checkpoint.pt'} at step 5" in logs and state.step == 12
    assert (state.validations, state.checkpoints, state.startup_steps) == (4, 4, 2)
    assert state.validation_s > 0 and state.checkpoint_s > 0 and 0 < state.startup_s < state.elapsed


def test_a_run_resumed_at_or_past_its_stop_after_validates_its_stop_or_names_what_it_keeps(
    tmp_path,
):
    """``stop_after`` lowered to a checkpoint's step (SIGTERM had stopped the run there): its
    loop ran no step, so the stop was never validated (another model than a run stopping there
    keeps) or, with no validation before it, the job ended in a ``RuntimeError`` traceback.
    Lowered below it, the log named a best step of -1 while the stop's model was returned."""

    def term_at(step: int) -> Callable[[str], None]:
        def on_line(line: str) -> None:
            if line.startswith(f"step {step - 1}/"):
                os.kill(os.getpid(), signal.SIGTERM)

        return on_line

    def validations(state: RunState) -> list[tuple[int, float]]:
        return [(r["step"], r["metric"]) for r in state.rows if r["kind"] == "val"]

    settings = {"steps": 20, "log_every": 1, "val_every": 7, "checkpoint_every": 100}
    _, fresh = _tiny_run(tmp_path / "fresh", stop_after=10, **settings)
    for work, cut in (("cut", 10), ("cut5", 5), ("bare", 5)):
        with pytest.raises(Interrupted):
            _tiny_run(tmp_path / work, on_line=term_at(cut), **settings)
    _, resumed = _tiny_run(tmp_path / "cut", stop_after=10, **settings)
    assert validations(resumed) == validations(fresh) and len(validations(fresh)) == 2
    assert resumed.best_step == fresh.best_step
    _, at_stop = _tiny_run(tmp_path / "cut5", stop_after=5, **settings)
    assert at_stop.best_step == 5 and [v for v, _ in validations(at_stop)] == [5]
    logs, below = _tiny_run(tmp_path / "cut5", stop_after=3, **settings)
    assert any("past stop_after=3: its best model (step 5) is kept" in line for line in logs)
    assert below.best_step == 5
    with pytest.raises(ValueError, match=r"step 5, past stop_after=3, and holds no validated"):
        _tiny_run(tmp_path / "bare", stop_after=3, **settings)


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.EIO, "Input/output error"), OSError(errno.EACCES, "Permission denied"),
     OSError(errno.ESTALE, "Stale file handle"), MemoryError()],
    ids=["EIO", "EACCES", "ESTALE", "MemoryError"],
)  # fmt: skip
def test_a_checkpoint_the_machine_fails_to_read_stops_the_rerun_and_is_kept_for_the_next(
    tmp_path, monkeypatch, failure
):
    """A read of ``checkpoint.pt`` that fails on the machine's side (a network file system's
    I/O error, permissions, memory) is not a damaged file: the rerun stops with that error (an
    ``OSError`` in one line naming the file, which the CLI prints as such) instead of starting
    at step 0 and overwriting the intact checkpoint at its first save; the next rerun resumes
    from it."""
    _tiny_run(tmp_path, steps=12, stop_after=5, checkpoint_every=4)
    ckpt = tmp_path / "checkpoint.pt"
    saved = ckpt.read_bytes()
    fail_torch_load_once(monkeypatch, failure)
    with pytest.raises(type(failure)) as err:
        _tiny_run(tmp_path, steps=12, checkpoint_every=4)
    if isinstance(failure, OSError):
        assert err.value.errno == failure.errno and str(ckpt) in str(err.value)
        assert len(str(err.value).splitlines()) == 1, str(err.value)
    assert ckpt.read_bytes() == saved
    logs, state = _tiny_run(tmp_path, steps=12, checkpoint_every=4)
    assert f"resumed from {ckpt} at step 5" in logs and state.step == 12


def test_a_truncated_checkpoint_is_ignored_with_a_log_line_and_the_run_starts_afresh(tmp_path):
    """Truncated anywhere (torch then raises ``EOFError``, ``RuntimeError`` of its zip reader,
    ``UnpicklingError`` or an ``OSError`` with ``EINVAL``), the checkpoint is a damaged file: the
    run starts at step 0, saying so in the log, and overwrites it."""
    _tiny_run(tmp_path / "full", steps=12, stop_after=5, checkpoint_every=4)
    saved = (tmp_path / "full" / "checkpoint.pt").read_bytes()
    for cut in (0, 1, len(saved) // 2, len(saved) - 100, len(saved) - 1):
        work = tmp_path / f"cut{cut}"
        work.mkdir()
        (work / "checkpoint.pt").write_bytes(saved[:cut])
        logs, state = _tiny_run(work, steps=12, stop_after=2, checkpoint_every=4)
        said = [line for line in logs if "checkpoint" in line]
        assert said[0].startswith(
            f"ignoring unreadable checkpoint: checkpoint {work / 'checkpoint.pt'} is unreadable "
            "(truncated or foreign): "
        ), (cut, said)
        assert not any("resumed" in line for line in logs) and state.startup_steps == 1
        assert read_checkpoint(work / "checkpoint.pt")["run"]["step"] == 2


def test_a_stop_signal_checkpoints_and_stops_the_run_but_at_its_last_step_lets_it_finish(tmp_path):
    def signal_at(step: int) -> Callable[[str], None]:
        """SIGTERM at the progress line of the ``step``-th step (rows count from 0)."""

        def on_line(line: str) -> None:
            if line.startswith(f"step {step - 1}/"):
                os.kill(os.getpid(), signal.SIGTERM)

        return on_line

    with pytest.raises(Interrupted, match="at step 3: checkpoint .* written; rerun to resume"):
        _tiny_run(tmp_path / "early", steps=6, log_every=1, on_line=signal_at(3))
    assert read_checkpoint(tmp_path / "early" / "checkpoint.pt")["run"]["step"] == 3
    _, state = _tiny_run(tmp_path / "last", steps=6, log_every=1, on_line=signal_at(6))
    assert state.step == 6
    assert read_checkpoint(tmp_path / "last" / "checkpoint.pt")["run"]["step"] == 6
    # during start-up (the run's first line, before any step): it killed the process; now the
    # run stops after its first step, saved
    sent: list[str] = []

    def at_start_up(line: str) -> None:
        if not sent:
            sent.append(line)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted, match="at step 1: checkpoint .* written; rerun to resume"):
        _tiny_run(tmp_path / "start", steps=6, log_every=1, on_line=at_start_up)
    assert not sent[0].startswith("step ")
    assert read_checkpoint(tmp_path / "start" / "checkpoint.pt")["run"]["step"] == 1


def test_a_stop_after_off_the_validation_grid_leaves_a_later_full_run_as_if_uninterrupted(
    tmp_path,
):
    """The stop's validation competed for the best: going on past it kept step 6's weights
    (a step the uninterrupted run never validated) and an extra row. Now it counts only for a
    run that ends there."""
    settings = {"steps": 20, "val_every": 10, "checkpoint_every": 10}
    _, whole = _tiny_run(tmp_path / "whole", **settings)
    logs, stopped = _tiny_run(tmp_path / "parts", stop_after=6, **settings)
    assert stopped.best_step == 6 and [r["step"] for r in stopped.rows if r["kind"] == "val"] == [6]
    assert stopped.best_metric > whole.best_metric  # the stop's weights would win if they could
    # not "best <another> @ <step>" beside the stop's own metric, as if that were not kept
    assert any(re.search(r" \(a stop off the validation grid\) lr ", line) for line in logs), logs
    _, parts = _tiny_run(tmp_path / "parts", **settings)

    def seen(state: RunState) -> list:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in state.rows]

    assert seen(parts) == seen(whole) and parts.best_step == whole.best_step == 10
    a, b = (read_checkpoint(tmp_path / d / "checkpoint.pt")["run"] for d in ("whole", "parts"))
    assert all(torch.equal(a["best_state"][k], b["best_state"][k]) for k in a["best_state"])


def test_the_saved_models_sub_steps_are_those_of_a_training_pass_at_its_weights() -> None:
    """The table shows them beside the best weights' accuracy: the sub-steps a training pass
    takes at the norm estimates saved with those weights (the final step's overstated an
    earlier best's, as sub-steps grow with the norms; a logged step's depended on
    ``log_every``), not the certified bounds of ``eval()``."""
    from stablenets.pipeline.jobs import _saved_substeps

    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier", **TINY, time=4.0)
    blocks = list(model.constrained_blocks())
    with torch.no_grad():
        for scale, block in zip((1.5, 3.0), blocks, strict=True):
            block.operator.weight.mul_(scale)
            block.operator.power_iteration(1)  # an estimate, below the bound
    model.train()(torch.rand(2, 3, 8, 8))
    assert _saved_substeps(model.eval()) == model.total_substeps() > len(blocks)
    model(torch.rand(2, 3, 8, 8))  # eval(): the certified bounds, other counts
    assert _saved_substeps(model) != model.total_substeps()


class _SignalWhileValidating(ClassificationTask):
    def validate(self, model):
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM's TERM, arriving while it validates
        return super().validate(model)


def test_a_stop_signal_during_validation_still_writes_the_checkpoint_it_announces(tmp_path):
    """The write was decided before validating: the job said 'checkpoint written', wrote none
    and a rerun lost every step since the last one (up to 499 at the paper's settings)."""
    with pytest.raises(Interrupted, match="at step 6: checkpoint .* written; rerun to resume"):
        _tiny_run(tmp_path, _SignalWhileValidating, steps=20, val_every=6, checkpoint_every=10)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["run"]["step"] == 6
    logs, state = _tiny_run(tmp_path, steps=20, val_every=6, checkpoint_every=10)
    assert f"resumed from {tmp_path / 'checkpoint.pt'} at step 6" in logs and state.step == 20


def test_settings_that_change_no_number_leave_the_progress_hash_so_their_change_resumes():
    """Where a job runs, how often it logs or saves, and the limits that only stop it: a rerun
    that Snakemake starts because one changed resumes (a finished training in seconds)."""
    spec = {"model": "m", "seed": 0, "device": "auto", "threads": 4,
            "train": {"steps": 12, "lr_max": 1.0, "log_every": 10}}  # fmt: skip
    same = [
        {**spec, "device": "cuda:1", "threads": 8, "eval_batch": 7},
        *({**spec, "train": {**spec["train"], k: v}} for k, v in (
            ("stop_after", 5), ("log_every", 1), ("checkpoint_every", 7), ("max_substeps", 9),
            ("max_substeps", "auto"), ("memory_fraction", 0.5), ("max_norm", 3.0),
            ("cudnn_benchmark", True), ("channels_last", True))),
    ]  # fmt: skip
    assert {_progress_hash(s) for s in same} == {_progress_hash(spec)}
    for changed in ({**spec, "seed": 1}, {**spec, "train": {**spec["train"], "lr_max": 0.5}}):
        assert _progress_hash(changed) != _progress_hash(spec)
    # a denoiser's evaluation denoises each image on its own: its batch size is memory alone;
    # a classifier's seeds its attacks per batch
    ev = {"model": "m", "seed": 0, "evaluate": {"batch_size": 8, "n_test": 10}}
    smaller = {**ev, "evaluate": {**ev["evaluate"], "batch_size": 2}}
    assert _progress_hash(smaller, "evaluate-denoiser") == _progress_hash(ev, "evaluate-denoiser")
    assert _progress_hash(smaller) != _progress_hash(ev)


class _NaNGradientAtStep3(ClassificationTask):
    """A finite loss whose gradient is NaN at the fourth step (an overflow in the backward)."""

    calls = 0

    def loss(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        loss = F.cross_entropy(out, targets)
        return loss + 0 * torch.sqrt(out - out).sum() if type(self).calls == 4 else loss


def test_a_nan_gradient_under_a_finite_loss_stops_before_a_checkpoint_of_nans_is_written(tmp_path):
    with pytest.raises(DivergenceError) as err:
        _tiny_run(tmp_path, _NaNGradientAtStep3, steps=20, checkpoint_every=4, log_every=1)
    ckpt = tmp_path / "checkpoint.pt"
    assert str(err.value) == (
        "training diverged at step 4: non-finite weights after the update (a NaN or inf "
        "gradient); last good checkpoint: none"
    )
    assert not ckpt.exists()
    _NaNGradientAtStep3.calls = -4  # the NaN in the 8th step, whose update is then saved
    with pytest.raises(DivergenceError, match=rf"at step 8: non-finite .*{ckpt} \(step 4\)$"):
        _tiny_run(tmp_path, _NaNGradientAtStep3, steps=20, checkpoint_every=4, log_every=1)
    weights = read_checkpoint(ckpt)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_the_denoising_training_and_validation_psnr_use_one_peak():
    """Both are drawn on one axis: the batch metric must be the validation's PSNR (the paper's
    per-image peak), so that a denoiser that is exact on its batch scores as validation does."""
    g = torch.Generator().manual_seed(0)
    images = 0.2 + 0.5 * torch.rand(4, 3, 8, 8, generator=g)  # peak well below 1
    task = DenoisingTask(images, images, 0.1, 0, None, 4)
    noisy = images + 0.05 * torch.randn(images.shape, generator=g)

    class Noisy(torch.nn.Module):  # returns the same noisy images on validation
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return noisy

    assert task.metric(noisy, images) == pytest.approx(task.validate(Noisy()), rel=1e-6)
