"""Sub-step growth of the paper's models over the first steps of the paper's own schedule.

``python benchmarks/paper_lr.py STEPS WORKDIR [--denoiser H W]``: the rehearsal's CIFAR-sized
synthetic stand-in (47,500 + 2,500 images of 32x32, made once in WORKDIR), ``config.yaml``'s
classifier settings (batch 128, lr_max 1, one-cycle with warm-up 0.5 over 40,000 steps) stopped
after STEPS steps, one CPU thread; prints the progress lines and, at the end, the total
sub-steps by step as JSON. ``--denoiser H W``: the paper's Euler denoiser instead, with
``config.yaml``'s denoising settings (batch 5, σ 0.15, the same schedule) on 200 H x W crops of
scikit-image photographs (the rehearsal's BSDS500 stand-in; 321x481 is the paper's size, a
smaller crop makes a CPU step affordable). ``benchmarks/norm_lag.py`` runs the classifier's
training with a record of the norm estimate's lag.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from stablenets import data
from stablenets.data.format import read_split
from stablenets.nn.models import StableModel, build_model
from stablenets.train import ClassificationTask, DenoisingTask, TrainConfig, train
from stablenets.train.augment import AugmentConfig
from stablenets.train.checkpoints import RunState


def stand_in(workdir: Path) -> tuple[StableModel, ClassificationTask]:
    """The paper classifier (seed 0) and the rehearsal's CIFAR-sized stand-in, made once."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cifar10.h5"
    if not path.exists():
        data.make_synthetic_classification(
            path, n_train=47500, n_val=2500, n_test=10000, num_classes=10, image_size=32,
            noise=0.05, seed=0,
        )  # fmt: skip
    (x, y), (vx, vy) = read_split(path, "train"), read_split(path, "val")
    assert y is not None and vy is not None
    torch.manual_seed(0)
    model = build_model("nonexpansive_classifier")
    return model, ClassificationTask(x, y, vx, vy, AugmentConfig(), eval_batch=500)


def denoising_stand_in(workdir: Path, size: tuple[int, int]) -> tuple[StableModel, DenoisingTask]:
    """The paper's Euler denoiser (seed 0) and 200 training crops of ``size``, made once."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"photos-{size[0]}x{size[1]}.h5"
    if not path.exists():
        data.make_smoke_photos(path, size, n_train=200, n_val=5, n_test=2, seed=0)
    (x, _), (vx, _) = read_split(path, "train"), read_split(path, "val")
    torch.manual_seed(0)
    model = build_model("nonexpansive_denoiser", integrator="euler", power_size=[64, 64])
    return model, DenoisingTask(x, vx, sigma=0.15)


def paper_schedule(stop: int, **overrides: object) -> TrainConfig:
    """``config.yaml``'s classifier schedule stopped after ``stop`` steps, without the sub-step
    guard (``max_substeps`` 100,000: to see the counts), validated only at the end."""
    settings: dict = dict(
        steps=40000, batch_size=128, lr_max=1.0, warmup=0.5, val_every=100000,
        checkpoint_every=100000, log_every=50, max_substeps=100000, stop_after=stop,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def run(
    model: StableModel, task: ClassificationTask | DenoisingTask, cfg: TrainConfig, workdir: Path
) -> RunState:
    """Train with timed progress lines on stdout; resumes from ``workdir``'s checkpoint."""
    start = time.time()
    _, state = train(
        model, task, cfg, workdir, "paper_lr",
        lambda line: print(f"{time.time() - start:.0f}s {line}", flush=True),
    )  # fmt: skip
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", type=int)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--denoiser", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.denoiser is None:
        model, task = stand_in(args.workdir)
        cfg, work = paper_schedule(args.steps), args.workdir / "work"
    else:
        model, task = denoising_stand_in(args.workdir, tuple(args.denoiser))
        # the guard at 500 sub-steps (this machine's memory) stops a runaway run in one line
        cfg = paper_schedule(args.steps, batch_size=5, max_substeps=500)
        work = args.workdir / "work-denoiser"
    state = run(model, task, cfg, work)
    rows = [r for r in state.rows if r["kind"] == "train"]
    print(json.dumps({"substeps": [(r["step"], r["substeps"]) for r in rows]}))


if __name__ == "__main__":
    main()
