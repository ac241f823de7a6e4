"""Checkpointing only the blocks a pass needs (``train.remat: auto``, session 15), in one run.

    .venv/bin/python benchmarks/partial_remat.py                 # Euler and RK4 denoisers
    .venv/bin/python benchmarks/partial_remat.py --size 96 --integrators rk4

The paper denoiser (10 blocks) with its integration times scaled up (``--scale``, default 3: 30
sub-steps), one training step (forward + backward of a mean-square loss) timed three ways on the
same batch: no block checkpointed, every block checkpointed (what ``remat: auto`` did before
session 15 for a pass that did not fit unchecked) and the blocks that
``ActivationCost.cheapest_remat`` chooses for a memory budget a quarter, half and three quarters
of the way from every block checkpointed to none (``ActivationCost``: the bytes each choice
keeps). One thread: the ratios, not the seconds, are the result.
"""

from __future__ import annotations

import argparse
import time

import torch

from stablenets.nn.models import build_model
from stablenets.train.loop import _set_remat
from stablenets.train.memory import activation_cost


def _seconds(
    model: torch.nn.Module, x: torch.Tensor, choices: list[list[bool]], repeats: int
) -> list[float]:
    """The best of ``repeats`` training steps for each choice of checkpointed blocks, the
    choices interleaved in every repeat (a drift of the machine's speed hits them alike)."""
    best = [float("inf")] * len(choices)
    for repeat in range(repeats + 1):  # the first round warms up
        for k, remat in enumerate(choices):
            _set_remat(model, remat)  # type: ignore[arg-type]
            model.zero_grad()
            start = time.perf_counter()
            model(x).square().mean().backward()
            if repeat:
                best[k] = min(best[k], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--integrators", default="euler,rk4")
    parser.add_argument("--size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--scale", type=float, default=3.0, help="integration times x this")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("integrator | sub-steps | blocks checkpointed | MiB kept | s/step | vs unchecked")
    for integrator in args.integrators.split(","):
        torch.manual_seed(0)
        model = build_model("nonexpansive_denoiser", integrator=integrator, power_size=[32, 32])
        with torch.no_grad():
            for block in model.constrained_blocks():
                block.time.mul_(args.scale)
        model.train()
        x = torch.rand(args.batch, 3, args.size, args.size)
        cost = activation_cost(model, x, args.batch)
        counts = [b.substeps(b.current_norm()) for b in model.constrained_blocks()]
        none, every = [False] * len(counts), [True] * len(counts)
        plain, checked = cost.bytes(counts, none), cost.bytes(counts, every)
        choices = [none, every] + [
            cost.cheapest_remat(counts, int(checked + f * (plain - checked))) or every
            for f in (0.75, 0.5, 0.25)
        ]
        seconds = _seconds(model, x, choices, args.repeats)
        for remat, s in zip(choices, seconds, strict=True):
            kept = cost.bytes(counts, remat) / 2**20
            print(f"{integrator} | {sum(counts)} | {sum(remat)} of {len(remat)} | {kept:.0f} | "
                  f"{s:.3f} | {s / seconds[0]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
