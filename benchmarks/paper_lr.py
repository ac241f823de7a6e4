"""Sub-step growth of the paper classifier over the first steps of the paper's own schedule.

``python benchmarks/paper_lr.py STEPS WORKDIR``: the rehearsal's CIFAR-sized synthetic stand-in
(47,500 + 2,500 images of 32x32, made once in WORKDIR), ``config.yaml``'s classifier settings
(batch 128, lr_max 1, one-cycle with warm-up 0.5 over 40,000 steps) stopped after STEPS steps,
one CPU thread; prints the progress lines and, at the end, the total sub-steps by step as JSON.
"""

import json
import sys
import time
from pathlib import Path

import torch

from stablenets import data
from stablenets.data.format import read_split
from stablenets.nn.models import build_model
from stablenets.train import ClassificationTask, TrainConfig, train
from stablenets.train.augment import AugmentConfig


def main(stop: int, workdir: Path) -> None:
    torch.set_num_threads(1)
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
    task = ClassificationTask(x, y, vx, vy, AugmentConfig(), eval_batch=500)
    cfg = TrainConfig(
        steps=40000, batch_size=128, lr_max=1.0, warmup=0.5, val_every=100000,
        checkpoint_every=100000, log_every=50, max_substeps=100000, stop_after=stop,
    )  # fmt: skip
    start = time.time()
    _, state = train(
        model, task, cfg, workdir / "work", "paper_lr",
        lambda line: print(f"{time.time() - start:.0f}s {line}", flush=True),
    )  # fmt: skip
    rows = [r for r in state.rows if r["kind"] == "train"]
    print(json.dumps({"substeps": [(r["step"], r["substeps"]) for r in rows]}))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
