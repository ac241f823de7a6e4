"""Evaluation benchmark: the radius sweep against the per-radius evaluation, side by side.

``python -m stablenets.bench.evaluation --config config.yaml config/smoke.yaml --variant cpl_XS`` (after
``make smoke``) evaluates one trained classifier twice on the same test points with the same
attacks and seeds:

* **per radius** (the evaluation before issue 19): at every radius, the cheap attack (PGD) on
  every correctly classified point, the strong attack on every correctly classified point where
  it runs (``on_grid``: every radius), a point robust when neither breaks it;
* **sweep** (``radius_sweep.sweep`` then ``radius_sweep.bisect``, what the pipeline runs): each point
  attacked only where it can change a number.

It prints both robust-accuracy curves, their largest difference (the sweep must never be more
than one percentage point above: it is at least as strong) and both times, measured in one run,
and writes them to a CSV. ``--override`` changes the evaluation settings, e.g. a stronger attack
over the whole grid: ``'{"n_test": 60, "eps": {"num": 40}, "strong": {"attacks": ["apgd-ce",
"apgd-t"], "on_grid": true}}'`` (``benchmarks/README.md`` has the results). ``--time-points K`` also times each attack per point on ``K`` points
(the seconds per point per attack); ``--count-passes EPS`` counts the strong attack's forward
and backward image-passes per point instead (AutoAttack standard at a radius no point breaks:
7,864 forward and 1,910 backward, ``benchmarks/README.md``). ``--pass-times 500,2000,8000``
times one forward and one forward + backward image-pass of the model on the config's device at
each batch size, in float32 and under bf16 autocast with the weights pinned (on CUDA, each also
replayed from CUDA graphs), and in float32 with them hashed at every pass (the levers of an
attack's cost; an out-of-memory batch is recorded as such), and writes them to ``--out``.
``--precision bfloat16`` and ``--cuda-graphs`` run the sweep twice instead, its attacks on the
plain model and on that search model (``classification.evaluate.precision`` and
``cuda_graphs``; every counted example is checked on the plain model), and print both curves,
the search model's largest excess over the plain one and both times. ``--grid-attacks
apgd-ce,apgd-t`` likewise compares the grid bisection with the strong attack and with those
AutoAttack attacks (``strong.grid_attacks``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stablenets import data
from stablenets.evaluation import radius_sweep, robustness
from stablenets.evaluation.attack_graphs import GraphedModel, bucket
from stablenets.nn.models import Classifier, load_model
from stablenets.train.memory import is_out_of_memory

__all__ = [
    "per_radius",
    "compare",
    "compare_sweeps",
    "compare_search",
    "compare_grid_attacks",
    "search_label",
    "seconds_per_point",
    "passes_per_point",
    "seconds_per_pass",
    "main",
]


def per_radius(
    model: nn.Module, x: Tensor, y: Tensor, plan: radius_sweep.SweepPlan, cert_radius: Tensor
) -> dict[str, np.ndarray]:
    """Certified, PGD and empirical accuracy at every radius of ``plan``, attacking every
    correctly classified point at every radius (the strong attack at ``strong_radii``, the
    bisection's at the other ``bisect_radii``, all attacks with ``plan.seed``)."""
    grid = frozenset(map(radius_sweep.radius_key, plan.bisect_radii)) - plan.strong_radii
    _, correct = robustness.margins(model, x, y, plan.batch_size)
    out: dict[str, list[float]] = {"certified": [], "pgd": [], "empirical": []}
    for e in (float(r) for r in plan.radii):
        pgd = correct.clone()
        strong = correct.clone()
        key = radius_sweep.radius_key(e)
        attack = plan.strong if key in plan.strong_radii else (
            plan.bisect_attack if key in grid else None)  # fmt: skip
        if e > 0:
            pgd &= _robust(model, x, y, plan.pgd, e, plan)
            if attack is not None:
                strong &= _robust(model, x, y, attack, e, plan)
        out["certified"].append(float((correct & (cert_radius > e)).double().mean()))
        out["pgd"].append(float(pgd.double().mean()))
        out["empirical"].append(float((pgd & strong).double().mean()))
    return {k: np.asarray(v) for k, v in out.items()}


def _robust(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: radius_sweep.SeededAttack,
    e: float,
    plan: radius_sweep.SweepPlan,
) -> Tensor:
    device = robustness.model_device(model)
    flags = []
    with robustness.eval_mode(model):
        for s in range(0, len(x), plan.batch_size):
            xb, yb = x[s : s + plan.batch_size].to(device), y[s : s + plan.batch_size].to(device)
            x_adv = attack(model, xb, yb.long(), e, seed=plan.seed)
            with torch.no_grad():
                flags.append((model(x_adv).argmax(1) == yb).cpu())
    return torch.cat(flags)


def compare(
    model: nn.Module, x: Tensor, y: Tensor, plan: radius_sweep.SweepPlan, lipschitz: float
) -> tuple[list[dict], dict[str, float]]:
    """Rows per radius (both curves) and the two times, measured in one run."""
    margin, correct, rounding = robustness.clean_margins(model, x, y, plan.batch_size)
    cert = robustness.certified_radius(margin, correct, lipschitz, rounding)  # as the job's
    t0 = time.perf_counter()
    old = per_radius(model, x, y, plan, cert)
    t_old = time.perf_counter() - t0
    new, t_new = _timed_sweep(model, x, y, plan, correct, cert)
    rows = [
        {"eps": float(e), "certified": old["certified"][i], "per_radius": old["empirical"][i],
         "sweep": new["empirical"][i], "per_radius_pgd": old["pgd"][i], "sweep_pgd": new["pgd"][i]}
        for i, e in enumerate(plan.radii)
    ]  # fmt: skip
    excess = max(r["sweep"] - r["per_radius"] for r in rows)
    return rows, {"per_radius_s": t_old, "sweep_s": t_new, "speedup": t_old / t_new,
                  "max_excess_pp": 100 * excess}  # fmt: skip


def _timed_sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    plan: radius_sweep.SweepPlan,
    correct: Tensor,
    cert: Tensor,
) -> tuple[dict[str, np.ndarray], float]:
    """The sweep and bisection of ``plan`` (what the pipeline runs): its curves and seconds."""
    t0 = time.perf_counter()
    state = radius_sweep.SweepState.start(correct, cert, plan.seed)
    state = radius_sweep.sweep(model, x, y, plan, state, log=lambda line: None)
    state = radius_sweep.bisect(model, x, y, plan, state, log=lambda line: None)
    return state.accuracies(plan.radii), time.perf_counter() - t0


def compare_sweeps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    evs: dict[str, dict],
    seed: int,
    lipschitz: float,
) -> tuple[list[dict], dict[str, float]]:
    """The sweeps of two evaluation configs (label -> ``classification.evaluate``; the first is
    the reference) on the same points with the same seeds: rows per radius (each curve under its
    label) and both times, measured in one run. A cheaper config must not be a weaker one:
    ``max_excess_pp`` is how far the second curve rises above the reference's."""
    (ref, ref_ev), (label, _) = evs.items()
    margin, correct, rounding = robustness.clean_margins(model, x, y, ref_ev["batch_size"])
    cert = robustness.certified_radius(margin, correct, lipschitz, rounding)  # as the job's
    plans = {name: radius_sweep.SweepPlan.from_config(ev, seed) for name, ev in evs.items()}
    curves, times = {}, {}
    for name, plan in plans.items():
        curves[name], times[f"{name}_s"] = _timed_sweep(model, x, y, plan, correct, cert)
    radii = plans[ref].radii
    rows = [
        {"eps": float(e), "certified": curves[ref]["certified"][i],
         **{name: curves[name]["empirical"][i] for name in evs}}
        for i, e in enumerate(radii)
    ]  # fmt: skip
    excess = max(r[label] - r[ref] for r in rows)
    times["speedup"] = times[f"{ref}_s"] / times[f"{label}_s"]
    return rows, {**times, "max_excess_pp": 100 * excess}


def compare_search(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    ev: dict,
    seed: int,
    search: dict[str, Any],
    lipschitz: float,
) -> tuple[list[dict], dict[str, float]]:
    """``compare_sweeps`` of the attacks on the plain model (float32, eager) and on the search
    model of ``search`` (``precision``, ``cuda_graphs``: ``radius_sweep.SearchModel``), the
    second under ``search_label(search)``."""
    plain = {**ev, "precision": "float32", "cuda_graphs": False}
    evs = {"float32": plain, search_label(search): {**plain, **search}}
    return compare_sweeps(model, x, y, evs, seed, lipschitz)


def compare_grid_attacks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    ev: dict,
    seed: int,
    attacks: list[str],
    lipschitz: float,
) -> tuple[list[dict], dict[str, float]]:
    """``compare_sweeps`` of the grid bisection with the strong attack (``grid strong``) and
    with the AutoAttack ``attacks`` (``strong.grid_attacks``; ``grid apgd-ce+apgd-t``)."""
    strong = {**ev["strong"], "on_grid": True, "grid_search": "bisect"}
    evs = {
        "grid strong": {**ev, "strong": {**strong, "grid_attacks": None}},
        f"grid {'+'.join(attacks)}": {**ev, "strong": {**strong, "grid_attacks": attacks}},
    }
    return compare_sweeps(model, x, y, evs, seed, lipschitz)


def search_label(search: dict[str, Any]) -> str:
    """``bfloat16``, ``float32+graphs``, ``bfloat16+graphs``: a search model's column name."""
    label = search.get("precision", "float32")
    return label + ("+graphs" if search.get("cuda_graphs") else "")


def seconds_per_point(
    model: nn.Module, x: Tensor, y: Tensor, plan: radius_sweep.SweepPlan, eps: float
) -> dict[str, float]:
    """Seconds per point of each attack at radius ``eps`` on all of ``x`` (one batch each)."""
    device = robustness.model_device(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for name, attack in (("pgd", plan.pgd), ("strong", plan.strong)):
        if attack is None:
            continue
        with robustness.eval_mode(model):
            xb, yb = x.to(device), y.to(device).long()
            sync()
            t0 = time.perf_counter()
            attack(model, xb, yb, eps, seed=plan.seed)
            sync()
        out[name] = (time.perf_counter() - t0) / len(x)
    return out


class _PassCounter(nn.Module):
    """``model`` that counts the images it forwards and back-propagates, and the images the
    same passes would take replayed from attack graphs (each batch padded to its bucket)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_images = self.backward_images = 0
        self.forward_padded = self.backward_padded = 0

    def forward(self, x: Tensor) -> Tensor:
        n = len(x)
        self.forward_images += n
        self.forward_padded += bucket(n) if n else 0
        out = self.model(x)
        if out.requires_grad:
            out.register_hook(lambda grad: self._backward(n))
        return out

    def _backward(self, n: int) -> None:
        self.backward_images += n
        self.backward_padded += bucket(n) if n else 0


def passes_per_point(
    model: nn.Module, x: Tensor, y: Tensor, attack: radius_sweep.SeededAttack, eps: float
) -> dict[str, float]:
    """Forward and backward image-passes per point that ``attack`` spends on ``x`` at ``eps``
    (device-independent: times the device's seconds per image-pass give the attack's cost),
    and the same with each batch padded to its attack-graph bucket (``*_padded``: what the
    passes cost replayed from CUDA graphs, ``attack_graphs.bucket``). At a radius where no point
    breaks, this is the cost of a point that stays robust."""
    counter = _PassCounter(model).eval()
    adv = attack(counter, x, y, eps, seed=0)
    device = robustness.model_device(model)
    robust = float((robustness.predict(model, adv.to(device)).cpu() == y.cpu()).double().mean())
    counts = {
        "forward": counter.forward_images,
        "backward": counter.backward_images,
        "forward_padded": counter.forward_padded,
        "backward_padded": counter.backward_padded,
    }
    return {**{k: v / len(x) for k, v in counts.items()}, "robust": robust}


def _timed(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


PASS_TIME_FIELDS = [
    "device",
    "batch",
    "precision",
    "weights",
    "graphs",
    "forward_s_per_image",
    "forward_backward_s_per_image",
]
"""The columns of ``--pass-times``'s CSV: the device's name, then ``seconds_per_pass``'s row."""


def seconds_per_pass(
    model: nn.Module,
    x: Tensor,
    batches: list[int],
    repeats: int = 3,
    on_row: Callable[[dict[str, object]], None] = lambda row: None,
) -> list[dict[str, object]]:
    """Seconds per image of a forward pass and of a forward + backward pass to the input (the
    gradient of the logits' log-sum-exp, as an attack's step takes one) of ``model`` in eval mode
    (its evaluation sub-step counts), at each batch size (``x`` tiled up to it), on the search
    models the attacks can run on (``radius_sweep.SearchModel``): float32 and bf16 autocast with
    the weights pinned (as the attacks run), on CUDA both again replayed from CUDA graphs
    (``graphs: yes``; ``failed`` where no pass replayed: a capture that failed or did not fit,
    timed eagerly), then float32 with every pass hashing the weights (``weights: hashed``, as
    they ran before ``pinned_weights``), on ``model``'s device. An attack's cost is its
    image-passes per point (``passes_per_point``) times these; a batch that runs out of memory
    gives ``"oom"``. ``on_row`` gets each row as soon as it is measured (a run cut short keeps
    what it measured)."""
    device = robustness.model_device(model)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    graphed = [False, True] if cuda else [False]
    settings = [(p, True, g) for p in ("float32", "bfloat16") for g in graphed]
    rows: list[dict[str, object]] = []
    largest = max(batches, default=1)  # every batch graphed, memory permitting
    for precision, pin, graphs in [*settings, ("float32", False, False)]:
        search = radius_sweep.SearchModel(precision, graphs, graph_max_batch=largest)(model)
        with robustness.eval_mode(model, pin=pin):
            for batch in batches:
                xb = x.repeat(-(-batch // len(x)), 1, 1, 1)[:batch].to(device)

                def forward(xb: Tensor = xb, m: nn.Module = search) -> None:
                    with torch.no_grad():
                        m(xb)

                def backward(xb: Tensor = xb, m: nn.Module = search) -> None:
                    xg = xb.clone().requires_grad_(True)
                    torch.autograd.grad(m(xg).float().logsumexp(1).sum(), xg)

                row: dict[str, object] = {
                    "batch": batch,
                    "precision": precision,
                    "weights": "pinned" if pin else "hashed",
                    "graphs": "yes" if graphs else "no",
                }
                replays = search.replays if isinstance(search, GraphedModel) else 0
                try:
                    for key, fn in (("forward", forward), ("forward_backward", backward)):
                        row[f"{key}_s_per_image"] = _timed(fn, sync, repeats) / batch
                except (RuntimeError, MemoryError) as err:
                    if not is_out_of_memory(err):
                        raise
                    row.setdefault("forward_s_per_image", "oom")
                    row["forward_backward_s_per_image"] = "oom"
                    if cuda:
                        torch.cuda.empty_cache()
                if isinstance(search, GraphedModel):
                    if search.replays == replays:
                        row["graphs"] = "failed"  # timed eagerly: capture failed or did not fit
                    search.release()  # the next batch's graphs get the memory
                rows.append(row)
                on_row(row)
    return rows


def _job(configs: list[Path], variant: str, seed: int) -> tuple[dict, Path, Path]:
    """The evaluation spec of ``variant`` under ``configs`` (later files overlay earlier ones, as
    Snakemake's ``--configfile``), its trained model and the CIFAR-10 file of that scale."""
    from stablenets.pipeline.config import load_config
    from stablenets.pipeline.specs import Jobs

    config = load_config(configs)
    spec = json.loads(Jobs(config).eval_spec("classification", variant, seed))
    results = Path("results") / config["scale"]
    model = results / f"models/classification/{variant}/seed{seed}/model.pt"
    return spec, model, results / "data/cifar10.h5"


def _write_pass_times(
    model: nn.Module, x: Tensor, batches: list[int], spec: dict, out: Path | None
) -> None:
    """``--pass-times``: ``seconds_per_pass`` on the spec's device, each row printed and
    appended to ``out`` (with the device's name) as soon as it is measured."""
    from stablenets.pipeline.runtime import select_device

    device = select_device(spec.get("device", "auto"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") if out is not None else contextlib.nullcontext() as fh:
        writer = csv.DictWriter(fh, PASS_TIME_FIELDS) if fh is not None else None
        if writer is not None:
            writer.writeheader()

        def on_row(row: dict[str, object]) -> None:
            r = {"device": name, **row}
            line = "  ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
            )
            print(line, flush=True)
            if writer is not None and fh is not None:  # both or neither
                writer.writerow(r)
                fh.flush()

        seconds_per_pass(model.to(device), x[: max(batches)], batches, on_row=on_row)


def main(argv: list[str] | None = None) -> None:
    from stablenets.pipeline.runtime import select_device

    p = argparse.ArgumentParser(prog="python -m stablenets.bench.evaluation", description=__doc__)
    p.add_argument(
        "--config",
        type=Path,
        nargs="+",
        default=[Path("config.yaml")],
        help="config files, later ones overlaid (e.g. config.yaml config/smoke.yaml)",
    )
    p.add_argument("--variant", required=True, help="a classification variant, trained already")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", default="{}", help="JSON merged into the evaluate settings")
    p.add_argument("--time-points", type=int, default=0, help="also time each attack per point")
    p.add_argument(
        "--count-passes",
        type=float,
        default=None,
        metavar="EPS",
        help="only count the strong attack's image-passes per correctly classified point at EPS",
    )
    p.add_argument(
        "--pass-times",
        type=lambda v: [int(b) for b in v.split(",")],
        default=None,
        metavar="B1,B2,...",
        help="only time forward and forward+backward image-passes at these batch sizes, on the "
        "config's device: float32 and bf16 with the weights pinned, float32 with them hashed",
    )
    p.add_argument(
        "--precision",
        choices=["bfloat16"],
        default=None,
        help="only compare the sweep with its attacks on the plain model and in this precision",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="only compare the sweep with its attacks on the plain model and replayed from CUDA "
        "graphs (with --precision: both)",
    )
    p.add_argument(
        "--grid-attacks",
        type=lambda v: v.split(","),
        default=None,
        metavar="A1,A2",
        help="only compare the grid bisection with the strong attack and with these AutoAttack "
        "attacks (strong.grid_attacks)",
    )
    p.add_argument("--out", type=Path, default=None, help="CSV of the per-radius rows")
    args = p.parse_args(argv)
    spec, model_path, data_path = _job(args.config, args.variant, args.seed)
    ev = spec["evaluate"]
    for key, value in json.loads(args.override).items():
        ev[key] = {**ev[key], **value} if isinstance(value, dict) else value
    torch.set_num_threads(int(spec.get("threads", 1)))
    device = select_device(spec.get("device", "auto"))  # the attacks run where the job's would
    model = load_model(model_path, map_location=device).eval()
    if not isinstance(model, Classifier):
        p.error(f"{model_path} holds a {type(model).__name__}, not a classifier")
    x, y = data.read_split(data_path, "test")
    if y is None:
        p.error(f"{data_path}: the test split has no labels")
    x, y = (x[: ev["n_test"]], y[: ev["n_test"]]) if ev.get("n_test") else (x, y)
    if args.pass_times is not None:
        _write_pass_times(model, x, args.pass_times, spec, args.out)
        return
    plan = radius_sweep.SweepPlan.from_config(ev, int(spec["seed"]))
    if args.count_passes is not None and plan.strong is not None:
        with torch.no_grad():
            keep = model(x.to(device)).argmax(1).cpu() == y
        print(passes_per_point(model, x[keep], y[keep], plan.strong, args.count_passes))
        return
    if args.grid_attacks is not None:
        rows, times = compare_grid_attacks(
            model, x, y, ev, int(spec["seed"]), args.grid_attacks, model.lipschitz_bound()
        )
    elif args.precision is not None or args.cuda_graphs:
        search = {"precision": args.precision or "float32", "cuda_graphs": args.cuda_graphs}
        rows, times = compare_search(
            model, x, y, ev, int(spec["seed"]), search, model.lipschitz_bound()
        )
    else:
        rows, times = compare(model, x, y, plan, model.lipschitz_bound())
    for r in rows:
        print("  ".join(f"{k} {v:.4f}" for k, v in r.items()))
    print("  ".join(f"{k} {v:.3f}" for k, v in times.items()))
    if args.time_points:
        k = args.time_points
        print(seconds_per_point(model, x[:k], y[:k], plan, float(ev["standard_eps"][0])))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[*rows[0], *times])
            writer.writeheader()
            writer.writerows({**r, **times} for r in rows)


if __name__ == "__main__":
    main()
