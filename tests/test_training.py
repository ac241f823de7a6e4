"""Training helpers: augmentation is batched and seeded; the job log has a progress line every
``log_every`` steps; the sub-step limit stops a run before a forward pass that exceeds it. (Kill
and resume, signals, foreign checkpoints and divergence are in test_reliability.py.)"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stablenets.nn.models import build_model, read_checkpoint
from stablenets.pipeline.jobs import _progress_hash
from stablenets.train.augment import AugmentConfig, augment
from stablenets.train.checkpoints import RunState
from stablenets.train.loop import (
    DivergenceError,
    SubstepLimitError,
    TrainConfig,
    make_optimizer,
    train,
)
from stablenets.train.tasks import ClassificationTask, DenoisingTask


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


def _tiny_run(
    tmp_path: Path, task_type: type[ClassificationTask] = ClassificationTask, **train_kwargs
) -> tuple[list[str], RunState]:
    """A seeded nonexpansive classifier (2 blocks) trained on random 8x8 images; its log lines."""
    torch.manual_seed(0)
    model = build_model(
        "nonexpansive_classifier", base_width=4, stages=2, blocks_per_stage=1, input_size=8
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    task = task_type(x, y, x[:16], y[:16], AugmentConfig(), eval_batch=16)
    cfg = TrainConfig(batch_size=8, lr_max=0.05, **{"val_every": 100, **train_kwargs})
    logs: list[str] = []
    _, state = train(model, task, cfg, tmp_path, "h", logs.append)
    return logs, state


PROGRESS = re.compile(
    r"step (\d+)/(\d+) loss (\S+) lr (\S+) substeps (\d+) ms/step ([0-9.]+) "
    r"peak_mem (\d+)MiB eta (\d+s|\d+m\d\ds|\d+h\d\dm)"
)


def test_a_progress_line_every_log_every_steps_gives_loss_lr_substeps_time_memory_and_eta(
    tmp_path,
):
    logs, state = _tiny_run(tmp_path, steps=9, log_every=4)
    lines = [m for line in logs if (m := PROGRESS.fullmatch(line))]
    rows = [r for r in state.rows if r["kind"] == "train"]
    assert [int(m[1]) for m in lines] == [r["step"] for r in rows] == [0, 4, 8]
    for m, row in zip(lines, rows, strict=True):
        assert int(m[2]) == 9 and int(m[5]) == row["substeps"] >= 2
        assert m[3] == f"{row['loss']:.4f}" and m[4] == f"{row['lr']:.3g}"
        assert float(m[6]) > 0 and int(m[7]) > 0
    assert lines[-1][8] == "0s"  # the last logged step is the last step


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


def test_stop_after_ends_the_run_on_the_full_schedules_learning_rate_and_validates_its_last_step(
    tmp_path,
):
    logs, state = _tiny_run(tmp_path, steps=40_000, stop_after=6, log_every=1)
    assert state.step == 6 and "stopping after 6 steps of the 40000-step schedule" in logs[0]
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


def test_settings_that_change_no_number_leave_the_progress_hash_so_their_change_resumes():
    """Where a job runs, how often it logs or saves, and the limits that only stop it: a rerun
    that Snakemake starts because one changed resumes (a finished training in seconds)."""
    spec = {"model": "m", "seed": 0, "device": "auto", "threads": 4,
            "train": {"steps": 12, "lr_max": 1.0, "log_every": 10}}  # fmt: skip
    same = [
        {**spec, "device": "cuda:1", "threads": 8},
        *({**spec, "train": {**spec["train"], k: v}} for k, v in (
            ("stop_after", 5), ("log_every", 1), ("checkpoint_every", 7), ("max_substeps", 9),
            ("max_norm", 3.0))),
    ]  # fmt: skip
    assert {_progress_hash(s) for s in same} == {_progress_hash(spec)}
    for changed in ({**spec, "seed": 1}, {**spec, "train": {**spec["train"], "lr_max": 0.5}}):
        assert _progress_hash(changed) != _progress_hash(spec)


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
