"""How far the training norm estimate lags the norm, and what a sound one changes.

``python benchmarks/norm_lag.py STEPS WORKDIR [--training-norm power|circulant] [--from CKPT]``:
``paper_lr.py``'s training (the paper classifier, the paper's schedule, the CIFAR-sized
stand-in), two threads. Before every training forward pass each block's step is compared with
the step its norm allows: ``ratio = h L ||A||^2 / (2 r theta)``, ``h = T / n`` with ``n`` from
the norm the block uses in training and ``||A||`` from 40 further power iterations from its
vector (a lower bound, so the ratio is too). Above 1 the explicit step is longer than the
non-expansive limit, and the training network is not what the paper's block promises.

``--training-norm circulant``: the blocks use the circulant bound of their convolution
(``Conv2dOperator._circulant_norm``: the symbol's largest singular value over the DFT grid,
an upper bound of ``||A||``) instead of the one-iteration power estimate, so every step is
within the limit; ``--from`` resumes from a checkpoint of the same training. Writes one JSON line
per step (largest ratio, its block, the two norms, the sub-steps from each) to
``WORKDIR/lag-<training-norm>.jsonl`` and prints the progress lines.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from paper_lr import paper_schedule, run, stand_in

from stablenets.nn.blocks import NonexpansiveBlock
from stablenets.nn.operators import Conv2dOperator

CONVERGED_ITERS = 40


def circulant_norm(block: NonexpansiveBlock, x: torch.Tensor | None = None) -> float:
    """The block's norm in training from the circulant bound (``eval()``: unchanged)."""
    op = block.operator
    if not block.training:
        return op.norm_bound(None if x is None else tuple(x.shape[-2:]))
    assert isinstance(op, Conv2dOperator)
    with torch.no_grad():
        found = op._circulant_norm(op._certificate_weight(), op.input_size)
    assert found is not None
    return found[0]


def converged_norm(block: NonexpansiveBlock) -> float:
    op = block.operator
    with torch.no_grad():
        w = op.weight.detach()
        return float(op._rayleigh(w, op._iterate(w, op.u.clone(), CONVERGED_ITERS)))


def record_lag(model: torch.nn.Module, out: Path) -> None:
    """Hooks writing each training step's largest step ratio to ``out``."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, NonexpansiveBlock)}
    step: dict = {"ratio": 0.0}

    def before(block: NonexpansiveBlock, _args: object) -> None:
        if not (block.training and torch.is_grad_enabled()):
            return
        used, norm = block.current_norm(), converged_norm(block)
        n = block.substeps(used)
        limit = 2 * block.tableau.step_radius * block.theta
        ratio = block.time_value() / n * block._ell(norm) / limit
        step["n_used"] = step.get("n_used", 0) + n
        step["n_norm"] = step.get("n_norm", 0) + block.substeps(norm)
        if ratio > step["ratio"]:
            step.update(ratio=ratio, block=names[block], used=used, norm=norm)

    def after(module: torch.nn.Module, _args: object, _out: object) -> None:
        if module.training and torch.is_grad_enabled():
            with out.open("a") as fh:
                fh.write(json.dumps(step) + "\n")
        step.clear()
        step["ratio"] = 0.0

    for block in names:
        block.register_forward_pre_hook(before)
    model.register_forward_hook(after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", type=int)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--training-norm", choices=["power", "circulant"], default="power")
    parser.add_argument("--from", dest="start", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, task = stand_in(args.workdir)
    work = args.workdir / f"work-{args.training_norm}"
    if args.start is not None:
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.start, work / "checkpoint.pt")
    if args.training_norm == "circulant":
        NonexpansiveBlock.current_norm = circulant_norm  # type: ignore[method-assign]
    record_lag(model, args.workdir / f"lag-{args.training_norm}.jsonl")
    # a checkpoint every 50 steps (to branch from); the guard at 600 sub-steps (this machine's
    # memory) stops a runaway run in one line
    run(model, task, paper_schedule(args.steps, checkpoint_every=50, log_every=10,
                                    max_substeps=600), work)  # fmt: skip


if __name__ == "__main__":
    main()
