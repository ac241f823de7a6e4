"""Sub-step growth of the paper classifier over the first steps of the paper's own schedule.

``python benchmarks/paper_lr.py STEPS WORKDIR``: the rehearsal's CIFAR-sized synthetic stand-in
(47,500 + 2,500 images of 32x32, made once in WORKDIR), ``config.yaml``'s classifier settings
(batch 128, lr_max 1, one-cycle with warm-up 0.5 over 40,000 steps) stopped after STEPS steps,
one CPU thread; prints the progress lines and, at the end, the total sub-steps by step as JSON.
``benchmarks/norm_lag.py`` runs the same training with a record of the norm estimate's lag.
"""

import json
import sys
import time
from pathlib import Path

import torch

from stablenets import data
from stablenets.data.format import read_split
from stablenets.nn.models import StableModel, build_model
from stablenets.train import ClassificationTask, TrainConfig, train
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


def paper_schedule(stop: int, **overrides: object) -> TrainConfig:
    """``config.yaml``'s classifier schedule stopped after ``stop`` steps, without the sub-step
    guard (``max_substeps`` 100,000: to see the counts), validated only at the end."""
    settings: dict = dict(
        steps=40000, batch_size=128, lr_max=1.0, warmup=0.5, val_every=100000,
        checkpoint_every=100000, log_every=50, max_substeps=100000, stop_after=stop,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def run(model: StableModel, task: ClassificationTask, cfg: TrainConfig, workdir: Path) -> RunState:
    """Train with timed progress lines on stdout; resumes from ``workdir``'s checkpoint."""
    start = time.time()
    _, state = train(
        model, task, cfg, workdir, "paper_lr",
        lambda line: print(f"{time.time() - start:.0f}s {line}", flush=True),
    )  # fmt: skip
    return state


def main(stop: int, workdir: Path) -> None:
    torch.set_num_threads(1)
    model, task = stand_in(workdir)
    state = run(model, task, paper_schedule(stop), workdir / "work")
    rows = [r for r in state.rows if r["kind"] == "train"]
    print(json.dumps({"substeps": [(r["step"], r["substeps"]) for r in rows]}))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
