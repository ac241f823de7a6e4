"""Training-step benchmark: the real training path against the plain reference, side by side.

    python -m stablenets.bench.training                      # paper sizes, CPU or CUDA (auto)
    python -m stablenets.bench.training --quick              # small sizes, seconds
    python -m stablenets.bench.training --models classifier,resnet --repeats 5 --threads 1

For each model (``classifier``: non-expansive classifier, batch 128, 32x32; ``resnet``: the ResNet
baseline; ``denoiser``: non-expansive denoiser, batch 5, 321x481; ``dncnn``; the layer families
``cpl``, ``sll``, ``aol``, ``orthogonal`` in the same classifier skeleton, at each ``--widths``)
it times training steps of the real path (``training._train_step``: data drawn and augmented on
the device, fused power iteration, the model's forward/backward, SGD + one-cycle) and of the
model's baseline built from the same weights: for the non-expansive models the plain reference
of ``reference.py``, for CPL the plain convolution pair ``x - h W^T sigma(W x + b)`` (the floor
of any 1-Lipschitz residual block). Classifier rows also give the time per epoch and the step
time relative to CPL at the same width. Every (model,
implementation) runs in its own subprocess (so the CPU peak memory is that process's RSS
high-water mark) and the repeats interleave all of them, so that ours and the reference see the
same machine load; ratios are medians over repeats of per-repeat ratios. Warm-up steps are
excluded. FLOPs per step come from ``torch.utils.flop_counter.FlopCounterMode``; the device's
peak is measured with a large matrix product. The table is printed and written to
``benchmarks/results/<device>.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from stablenets.bench.cost import RULES, projected_by_rule, stop_lead_s, submissions
from stablenets.bench.rows import (
    BENCH_NAME,
    MODEL_SPECS,
    STAGES,
    bench_key,
    classifier_width,
    substep_theta,
    variant_width,
)
from stablenets.nn.families import FAMILIES
from stablenets.pipeline.config import SCHEMA, load_config

if TYPE_CHECKING:  # the workers import these on first use
    from stablenets.bench.reference import _ReferenceModel
    from stablenets.nn.models import StableModel
    from stablenets.train.cuda_graphs import StepGraphs
    from stablenets.train.loop import TrainConfig
    from stablenets.train.tasks import Task

__all__ = ["main", "project_hours"]

# --quick: (batch, size, kwargs) of small models (cheap construction-time certificates too)
QUICK = {
    "classifier": (16, (16, 16), {"base_width": 8, "blocks_per_stage": 2}),
    "resnet": (16, (16, 16), {"base_width": 8, "blocks_per_stage": 2}),
    "denoiser": (2, (32, 40), {"width": 8, "depth": 3}),
    "dncnn": (2, (32, 40), {"width": 8, "depth": 5}),
    **{f: (16, (16, 16), {"base_width": 8, "blocks_per_stage": 2}) for f in FAMILIES},
}
_PREPARED: dict[str, StableModel] = {}  # state path -> prepared model (in-process runs)
BIG_PIXELS = 100_000  # images above this many pixels get --big-steps / --big-repeats
GRAPH_WARMUP = 2  # --cuda-graphs: step 1 runs eagerly, step 2 captures (``StepGraphs``' policy)
PROFILE_ROWS = 25  # --profile: rows of the printed table
STEADY_POWER_ITERS = 50  # prepare_state: iterations beyond construction's 20, then
STEADY_MARGIN = 0.9  # each block's time this far below its one-sub-step limit
FLOP_PROBE = (64, 64)  # denoisers: FLOPs counted on a 64x64 image and scaled by pixels

COLUMNS = [
    "device", "device_name", "torch", "threads", "model", "impl", "base_width", "batch", "height",
    "width",
    "warmup_steps", "timed_steps", "repeats", "steps_per_s", "step_ms", "blocks", "substeps_total",
    "ms_per_substep", "ratio_vs_reference", "epoch_s", "time_vs_cpl", "peak_mem_mb", "mem_kind",
    "flops_per_step", "achieved_gflops", "device_peak_gflops", "achieved_fraction", "options",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Worker: one (model, implementation) in one process


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")  # pragma: no cover


def _build(
    job: dict, device: torch.device
) -> tuple[
    StableModel | _ReferenceModel,
    Task,
    TrainConfig,
    torch.optim.Optimizer,
    torch.optim.lr_scheduler.LRScheduler | None,
]:
    from stablenets.nn.models import build_model
    from stablenets.train.augment import AugmentConfig
    from stablenets.train.loop import TrainConfig, make_optimizer, prepare_for_speed
    from stablenets.train.tasks import ClassificationTask, DenoisingTask

    spec = MODEL_SPECS[job["model"]]
    size = tuple(job["size"])
    if job["state"] in _PREPARED:  # in-process: no second construction (minutes at width 128)
        model = copy.deepcopy(_PREPARED[job["state"]])
    else:
        saved = torch.load(job["state"], weights_only=True)
        kwargs = dict(saved["kwargs"])
        if "time" in saved:  # skip the construction-time certificate: the state holds the times
            kwargs["time"] = 1.0
        model = build_model(spec["model"], **kwargs)
        model.load_state_dict(saved["state_dict"])
    model = model.to(device)
    g = torch.Generator().manual_seed(1)
    pool = max(2 * job["batch"], 8) if spec["task"] == "denoising" else 1024
    images = torch.rand(pool, 3, *size, generator=g).to(device)
    if spec["task"] == "classification":
        labels = torch.randint(0, 10, (pool,), generator=g).to(device)
        task = ClassificationTask(images, labels, images[:8], labels[:8], AugmentConfig())
    else:
        task = DenoisingTask(images, images[:2], sigma=0.15)
    cfg = TrainConfig(
        steps=10**6,
        batch_size=job["batch"],
        warmup=spec["warmup"],
        log_every=10**9,
        amp=bool(job.get("amp")),
        channels_last=bool(job.get("channels_last")),
        cudnn_benchmark=bool(job.get("cudnn_benchmark")),
        remat={"auto": "auto", "on": True, "off": False}[job.get("remat", "auto")],
        cuda_graphs=bool(job.get("cuda_graphs")),
        # a count, not auto: remat auto is then the input-size rule, the same for every row
        # (on for the full-image denoiser), and "remat off" rows time the unchecked step
        max_substeps=10**9,
    )
    if job["impl"] in ("reference", "plain"):
        from stablenets.bench.reference import from_model

        model = from_model(model, plain=job["impl"] == "plain")
        opt = torch.optim.SGD(
            model.parameters(), lr=1e-3, momentum=cfg.momenta[0], weight_decay=cfg.weight_decay
        )
        return model, task, cfg, opt, None
    prepare_for_speed(model, cfg)  # what training.train does with these settings
    opt, sched = make_optimizer(model, cfg)
    return model, task, cfg, opt, sched


def _log(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


def _stepper(
    job: dict,
    model: StableModel | _ReferenceModel,
    task: Task,
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    device: torch.device,
    workdir: Path,
) -> tuple[Callable[[], None], StepGraphs | None]:
    """The timed step and its CUDA graphs (``None`` without ``--cuda-graphs``)."""
    from stablenets.nn.models import StableModel
    from stablenets.train.checkpoints import RunState
    from stablenets.train.cuda_graphs import StepGraphs
    from stablenets.train.loop import _train_step, step_graphs, substep_limit
    from stablenets.train.tasks import step_batch

    state = RunState()

    if job["impl"] in ("reference", "plain"):
        graphs = None
        if cfg.cuda_graphs and device.type == "cuda":  # the plain pair (the reference: eager)

            def forward_loss(
                inputs: torch.Tensor, targets: torch.Tensor, capturing: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
                out = model(inputs)
                return out, task.loss(out, targets)

            graphs = StepGraphs(model, forward_loss, cfg.cuda_graph_cache, _log)

        def step() -> None:
            model.train()
            inputs, targets = step_batch(task, cfg.batch_size, 0, state.step)
            model.update_norms()
            if graphs is None:
                loss = task.loss(model(inputs), targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            else:
                _, loss = graphs(inputs, targets)
            opt.step()
            float(loss.detach())
            state.step += 1

        return step, graphs

    if not isinstance(model, StableModel) or sched is None:
        raise TypeError(f"impl {job['impl']!r}: expected a StableModel and its schedule")
    graphs = step_graphs(model, task, cfg, device, _log)
    limit = substep_limit(model, task, cfg, device)

    def step() -> None:  # amp, channels_last, cudnn_benchmark: the training step's own settings
        ckpt = workdir / "none.pt"
        _train_step(model, task, cfg, opt, sched, state, device, ckpt, limit, graphs, _log)
        state.step += 1

    return step, graphs


def _total_substeps(model: torch.nn.Module) -> int:
    return getattr(model, "total_substeps", lambda: 0)()


def _count_blocks(model: torch.nn.Module) -> int:
    from stablenets.bench.reference import ReferenceBlock
    from stablenets.nn.blocks import NonexpansiveBlock, ResidualBlock
    from stablenets.nn.families import AOLBlock, OrthogonalBlock, SLLBlock

    kinds = (NonexpansiveBlock, ResidualBlock, ReferenceBlock, SLLBlock, AOLBlock, OrthogonalBlock)
    return sum(isinstance(m, kinds) for m in model.modules())


def _count_flops(
    job: dict, model: StableModel | _ReferenceModel, task: Task, device: torch.device
) -> float:
    """FLOPs of one training step. Forward + backward are counted at batches 1 and 2 (denoisers
    on a 64x64 image), which splits them into a per-image part, scaled by batch and pixels
    (exact for stride-1 convolutions and pointwise ops), and a weight-only part (SLL's and AOL's
    rescalings, counted once); plus the norm update at its own, fixed size. FFTs (the orthogonal
    family's Cayley transform) are not counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    from stablenets.nn.models import StableModel
    from stablenets.train.loop import update_norms

    spec = MODEL_SPECS[job["model"]]
    size = tuple(job["size"])
    probe = (
        size
        if spec["task"] == "classification"
        else tuple(min(a, b) for a, b in zip(size, FLOP_PROBE, strict=True))
    )
    model.train()

    def count(n: int) -> int:
        x = torch.rand(n, 3, *probe, device=device)
        with FlopCounterMode(display=False) as counter:
            out = model(x)
            loss = (
                F.cross_entropy(out, torch.zeros(n, dtype=torch.long, device=device))
                if spec["task"] == "classification"
                else F.mse_loss(out, x)
            )
            loss.backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    one, two = count(1), count(2)
    per_image = (two - one) * size[0] * size[1] / (probe[0] * probe[1])
    step_flops = (2 * one - two) + per_image * job["batch"]
    with FlopCounterMode(display=False) as counter:
        if job["impl"] in ("reference", "plain"):
            model.update_norms()
        elif isinstance(model, StableModel):
            update_norms(model, 1)
    return step_flops + counter.get_total_flops()


def prepare_state(job: dict, path: Path) -> None:
    """Build the model once (its construction computes certificates) and save its state, so that
    every worker starts from the same initial weights, vectors and integration times."""
    from stablenets.nn.models import build_model
    from stablenets.nn.operators import power_iteration_all

    spec = MODEL_SPECS[job["model"]]
    size = tuple(job["size"])
    kwargs = dict(spec["kwargs"], **job.get("kwargs", {}), input_size=list(size))
    if spec["model"] == "nonexpansive_denoiser" and min(size) < 64:
        kwargs["power_size"] = [min(16, s) for s in size]
    torch.manual_seed(0)
    # Non-expansive models: skip the construction-time certificate (minutes for 64 channels);
    # each block gets the time that makes one sub-step from its norm estimate after 70 power
    # iterations, 10% below the limit, so that the estimate's slow growth during the timed steps
    # changes no sub-step count (a steady count, as the certificate-based default gives in early
    # training; with 2% the counts of the paper classifier went from 15 to 26 in 25 steps).
    has_time = spec["model"].startswith("nonexpansive")
    model = build_model(spec["model"], **(dict(kwargs, time=1.0) if has_time else kwargs))
    saved: dict[str, Any] = {"kwargs": kwargs}
    blocks = list(model.constrained_blocks())
    if blocks:
        saved["time"] = True
        power_iteration_all([block.operator for block in blocks], STEADY_POWER_ITERS)
        with torch.no_grad():  # longer integration time: about that many sub-steps per block
            for block in blocks:
                sigma = float(block.operator.sigma_estimate)
                limit = 2 * block.tableau.step_radius * block.theta
                block.time.fill_(STEADY_MARGIN * limit / (block.activation.lipschitz * sigma**2))
                block.time.mul_(job["substeps"])
    saved["state_dict"] = model.state_dict()
    torch.save(saved, path)
    if job.get("inprocess"):
        _PREPARED[str(path)] = model


@contextlib.contextmanager
def _profiler(job: dict, device: torch.device) -> Iterator[None]:
    """With ``--profile``: ``torch.profiler`` over the timed steps; the operators and kernels
    taking the most device time (CPU time on the CPU) go to stderr."""
    if not job.get("profile"):
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=kinds) as prof:
        yield
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=PROFILE_ROWS, max_name_column_width=60)
    _log(f"profile of {job['model']}/{job['impl']} ({job['steps']} steps):\n{table}")


def run_worker(job: dict) -> dict:
    """Warm up, time ``steps`` steps, report steps/s, peak memory, sub-steps and FLOPs."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    torch.backends.cudnn.benchmark = bool(job.get("cudnn_benchmark"))
    with tempfile.TemporaryDirectory() as tmp:
        model, task, cfg, opt, sched = _build(job, device)
        step, graphs = _stepper(job, model, task, cfg, opt, sched, device, Path(tmp))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        base = _rss_mb()
        # with graphs, the warm-up includes the capture: a timed one would be extrapolated
        warmup = job["warmup"] if graphs is None else max(job["warmup"], GRAPH_WARMUP)
        for _ in range(warmup):
            step()
        sync()
        if device.type == "cuda" and graphs is None:  # graph pools are allocated at capture
            torch.cuda.reset_peak_memory_stats(device)
        before = _graph_work(graphs)
        with _profiler(job, device):
            t0 = time.perf_counter()
            for _ in range(job["steps"]):
                step()
            sync()
            elapsed = time.perf_counter() - t0
        # replayed: every timed step one replay, no eager step and no capture among them
        replayed = graphs is not None and _graph_work(graphs) == before
        if device.type == "cuda":
            peak, kind = (
                torch.cuda.max_memory_allocated(device) / 2**20,
                "cuda max_memory_allocated"
                + (" (warm-up and captures included)" if graphs is not None else ""),
            )
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            kind = f"process peak RSS (setup RSS {base:.0f} MB)"
            if job.get("inprocess"):
                kind = "not isolated (in-process run)"
        substeps, blocks = _total_substeps(model), _count_blocks(model)
        flops = _count_flops(job, model, task, device) if job.get("flops", True) else float("nan")
    return {
        "elapsed": elapsed,
        "steps": job["steps"],
        "peak_mem_mb": peak,
        "mem_kind": kind,
        "substeps": substeps,
        "blocks": blocks,
        "flops": flops,
        "graphs": "" if graphs is None else ("replayed" if replayed else graphs.summary()),
    }


def _graph_work(graphs: StepGraphs | None) -> tuple[int, int, float]:
    """What ``graphs`` did other than replaying: eager steps, captures kept, capture seconds
    (the power iteration's capture too)."""
    if graphs is None:
        return 0, 0, 0.0
    return graphs.eager_steps, graphs.captures, graphs.capture_s


def _spawn(job: dict) -> dict:
    if job.get("inprocess"):
        return run_worker(job)
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]))
    out = subprocess.run(
        [sys.executable, "-m", "stablenets.bench.training", "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"bench worker {job['model']}/{job['impl']} failed:\n{out.stderr[-3000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Device peak


def device_peak_gflops(
    device: torch.device, threads: int, dtype: torch.dtype = torch.float32
) -> float:
    """Measured throughput of a large matrix product (the practical peak of this device) in the
    precision the convolutions run in: ``dtype`` (bf16 for ``--amp``), and on CUDA in float32
    with TF32 when cuDNN uses it (PyTorch's default for convolutions)."""
    torch.set_num_threads(threads)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    try:
        return _matmul_gflops(device, dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = math.inf
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)  # timed; the product is discarded
        sync()
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return f"{name} ({os.cpu_count()} cpus)"


# --------------------------------------------------------------------------------------------
# Driver


def _jobs(args: argparse.Namespace) -> list[dict]:
    jobs = []
    for name in args.models:
        spec = MODEL_SPECS[name]
        batch, size, kwargs = spec["batch"], spec["size"], {}
        if args.quick:
            batch, size, kwargs = QUICK[name]
        if args.batch is not None:
            batch = args.batch
        if args.size is not None and spec["task"] == "denoising":
            size = tuple(args.size)
        big = size[0] * size[1] > BIG_PIXELS
        impls = ["ours"]
        if spec["baseline"] and not args.no_reference:
            impls.append(spec["baseline"])
        widths = [None]
        if args.widths and spec["task"] == "classification":
            widths = args.widths
        for width, impl in ((w, i) for w in widths for i in impls):
            graphed = args.cuda_graphs and impl in ("ours", "plain")
            jobs.append(
                dict(
                    model=name,
                    impl=impl,
                    kwargs=kwargs if width is None else dict(kwargs, base_width=width),
                    batch=batch,
                    size=list(size),
                    device=str(args.device),
                    threads=args.threads,
                    warmup=max(args.warmup, GRAPH_WARMUP) if graphed else args.warmup,
                    steps=args.big_steps if big else args.steps,
                    repeats=args.big_repeats if big else args.repeats,
                    substeps=args.substeps,
                    amp=args.amp and impl == "ours",
                    channels_last=args.channels_last and impl == "ours",
                    cudnn_benchmark=args.cudnn_benchmark and impl == "ours",
                    inprocess=args.inprocess,
                    remat=args.remat,
                    cuda_graphs=graphed,
                    profile=args.profile,
                )
            )
    return jobs


def _width(job: dict) -> int | str:
    """Base width of a classifier job (the skeleton's default when not set), '' otherwise."""
    if MODEL_SPECS[job["model"]]["task"] != "classification":
        return ""
    return classifier_width(job["kwargs"])


def _median_ratio(res: list[dict], base: list[dict]) -> float:
    """Median over repeats of the per-repeat ratio of steps/s (interleaved repeats)."""
    return statistics.median(
        (a["steps"] / a["elapsed"]) / (b["steps"] / b["elapsed"])
        for a, b in zip(res, base, strict=False)
    )


def _summarise(
    args: argparse.Namespace,
    jobs: list[dict],
    results: list[list[dict]],
    peak: float,
    name: str,
) -> list[dict]:
    rows = []
    by_key = {(j["model"], j["impl"], _width(j)): (j, results[i]) for i, j in enumerate(jobs)}
    for (model, impl, width), (job, res) in by_key.items():
        rates = [r["steps"] / r["elapsed"] for r in res]
        sps = statistics.median(rates)
        baseline = MODEL_SPECS[model]["baseline"]
        ratio = ""
        if impl == "ours" and (model, baseline, width) in by_key:
            ratio = f"{_median_ratio(res, by_key[(model, baseline, width)][1]):.3f}"
        vs_cpl = ""
        if width != "" and ("cpl", "ours", width) in by_key:
            vs_cpl = f"{1 / _median_ratio(res, by_key[('cpl', 'ours', width)][1]):.3f}"
        epoch = ""
        if width != "":
            epoch = f"{math.ceil(args.epoch_images / job['batch']) / sps:.4g}"
        flops = res[-1]["flops"]
        substeps = res[-1]["substeps"]
        options = [k for k in ("amp", "channels_last", "cudnn_benchmark") if job.get(k)]
        if res[-1].get("graphs"):  # "replayed": every timed step was one graph replay
            options.append(f"cuda_graphs {res[-1]['graphs']}")
        if impl == "ours" and job["remat"] != "auto":
            options.append(f"remat {job['remat']}")
        if args.substeps > 1:
            options.append(f"time x{args.substeps}")
        rows.append(
            {
                "device": args.device.type,
                "device_name": name,
                "torch": torch.__version__,
                "threads": args.threads,
                "model": model,
                "impl": impl,
                "base_width": width,
                "batch": job["batch"],
                "height": job["size"][0],
                "width": job["size"][1],
                "warmup_steps": job["warmup"],
                "timed_steps": job["steps"],
                "repeats": job["repeats"],
                "steps_per_s": f"{sps:.4g}",
                "step_ms": f"{1000 / sps:.4g}",
                "substeps_total": substeps,
                "blocks": res[-1]["blocks"],
                "ms_per_substep": f"{1000 / sps / substeps:.4g}" if substeps else "",
                "ratio_vs_reference": ratio,
                "epoch_s": epoch,
                "time_vs_cpl": vs_cpl,
                "peak_mem_mb": f"{max(r['peak_mem_mb'] for r in res):.0f}",
                "mem_kind": res[-1]["mem_kind"],
                "flops_per_step": f"{flops:.4g}",
                "achieved_gflops": f"{flops * sps / 1e9:.4g}",
                "device_peak_gflops": f"{peak:.4g}",
                "achieved_fraction": f"{flops * sps / 1e9 / peak:.3f}",
                "options": " ".join(options),
            }
        )
    return rows


def _print_table(rows: list[dict]) -> None:
    cols = ["model", "impl", "base_width", "batch", "height", "width", "steps_per_s", "step_ms",
            "substeps_total", "ratio_vs_reference", "epoch_s", "time_vs_cpl", "peak_mem_mb",
            "flops_per_step", "achieved_fraction"]  # fmt: skip
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    for r in rows:
        if r["model"] == "cpl" and r["impl"] == "plain" and r["time_vs_cpl"]:
            print(
                f"cpl (width {r['base_width']}): {1 / float(r['time_vs_cpl']):.3f}x the step time "
                "of the plain convolution pair (goal: within 1.2x)"
            )
    res = {r["model"]: r for r in rows if r["impl"] == "ours"}
    if "classifier" in res and "resnet" in res:
        ours, base = res["classifier"], res["resnet"]
        per_sub = float(ours["step_ms"]) / ours["substeps_total"]
        per_block = float(base["step_ms"]) / base["blocks"]
        print(
            f"classifier: {per_sub:.2f} ms per sub-step ({ours['substeps_total']} sub-steps) vs "
            f"ResNet {per_block:.2f} ms per block ({base['blocks']} blocks): "
            f"ratio {per_sub / per_block:.3f} "
            "(step time divided by count, lift/transitions/head included in both)"
        )


def epoch_images(cfg: dict) -> int:
    """Training images per epoch of a validated config: the training split of its CIFAR-10
    data (``data.prepare_cifar10``'s split of the archive, or the synthetic ``n_train``)."""
    from stablenets.data.shapes import cifar10_shape

    return cifar10_shape(cfg["data"]["cifar10"]).n_train


def project_hours(
    csv_paths: Path | list[Path],
    config_path: Path,
    options: str | None = None,
    schema: Path = SCHEMA,
) -> list[tuple[str, int, float]]:
    """Projected device-hours of the training jobs of ``config_path`` from results CSVs:

        hours = sum over training jobs of steps / (steps/s of its model) / 3600,

    using the CSVs' ``ours`` rows (a later file's row replaces an earlier one's) run with the
    variant's own settings (``variant_options``; the eager row where none was replayed from CUDA
    graphs: an upper bound), or with ``options`` for every variant (e.g.
    ``"amp channels_last"``), for the variant's model at its base width. A non-expansive
    variant's step time is scaled by its integrator's stages per sub-step (the benchmark runs
    Euler), by the benchmark's theta over its theta (``rows.substep_theta``: sub-steps scale
    with ``1 / theta``) and by the ratio of its batch x pixels to the benchmarked ones (none at
    paper scale; linear in pixels, as the convolutions are); a variant with ``budget_minutes``
    costs exactly that. Steps only, at the rows' sub-steps (``prepare_state`` pins about one
    per block; a paper run's grow with the learning rate), without validations, checkpoints or
    start-up: a lower bound (``_print_projection`` says so). Jobs: classification and denoising
    variants x seeds (x noise levels), after ``select``. Evaluation, PnP and data jobs are not
    included. The config is validated against ``schema`` first (``load_config``). Returns
    ``(job kind, count, hours)`` rows; a label with parentheses marks an assumption."""
    cfg = load_config(config_path, schema)
    rates = {}
    for path in [csv_paths] if isinstance(csv_paths, Path) else csv_paths:
        with open(path) as fh:
            for r in csv.DictReader(fh):
                if r["impl"] == "ours":
                    width = int(r["base_width"]) if r.get("base_width") else ""
                    rates[(r["model"], width, r["options"])] = r
    seeds = len(cfg.get("seeds", [0]))
    out = []
    for task, mult in (("classification", 1), ("denoising", len(cfg["denoising"]["noise_levels"]))):
        section = cfg[task]
        for variant, v in section["variants"].items():
            label, jobs = f"{task}/{variant}", seeds * mult
            train = dict(section["train"], **v.get("train", {}))
            if train.get("budget_minutes"):
                out.append((label, jobs, jobs * train["budget_minutes"] / 60))
                continue
            model, width = BENCH_NAME.get(v["model"]), variant_width(task, v, cfg)
            if options is None:
                key, _ = bench_key(rates, model, width, train)
            else:
                key = (model, width, options)
            opts = key[2]
            if key not in rates:
                how = f" with options '{opts}'" if opts else ""
                missing = f"{v['model']} at width {key[1]}{how} not benchmarked"
                out.append((f"{label} ({missing})", 0, 0.0))
                continue
            if "block" in v.get("kwargs", {}):
                label += f" (block {v['kwargs']['block']}: not benchmarked, Euler time assumed)"
            if train.get("loss"):  # the benchmark times the task's own loss
                label += f" ({train['loss']['name']} loss: the cross-entropy step's time assumed)"
            row = rates[key]
            step_s = float(row["step_ms"]) / 1000
            step_s *= STAGES.get(v.get("kwargs", {}).get("integrator", "euler"), 1)
            theta, spec = substep_theta(v), MODEL_SPECS.get(str(key[0]))
            row_theta = substep_theta(spec) if spec else None  # the benchmark's
            if theta and row_theta:  # sub-steps ~ 1 / theta at the same norms
                step_s *= row_theta / theta
            pixels = (32, 32) if task == "classification" else tuple(cfg["data"]["bsds500"]["size"])
            if task == "denoising" and section.get("patch"):
                pixels = tuple(section["patch"])
            step_s *= train["batch_size"] * pixels[0] * pixels[1]
            step_s /= int(row["batch"]) * int(row["height"]) * int(row["width"])
            out.append((label, jobs, jobs * train["steps"] * step_s / 3600))
    return out


def _fits(hours_each: float, runtime_min: float, rule: str) -> str:
    """Whether one job of ``rule`` fits its ``resources.*.runtime`` less the SLURM profile's
    stop lead (``cost.submissions``); a training job that does not resumes from its checkpoint
    in the next submission (``retries`` on SLURM)."""
    lead = stop_lead_s(rule)
    count = submissions(hours_each, runtime_min, lead)
    if count == 0:
        return f"never: {runtime_min:.0f} min is within the {lead}s stop lead"
    return "fits" if count == 1 else f"over {runtime_min:.0f} min less {lead}s: {count} submissions"


TRAIN_RULES = {"classification": "train_classifier", "denoising": "train_denoiser"}
STEP_ONLY = (
    "lower bound: steps alone, at the benchmark rows' pinned sub-steps (about one per block; a "
    "paper run's grow with the learning rate), no validation, checkpoint or start-up (a "
    "budget_minutes variant: its minutes of steps alone)"
)


def _print_projection(args: argparse.Namespace) -> None:
    """``--project``: the training jobs from step benchmarks (``project_hours``: a lower bound,
    said in one line), each against ``resources.train.runtime`` less the SLURM stop lead
    (``_fits``); with ``--cost``, the jobs a rehearsal projected (``cost.projected_by_rule``, for
    the paper config that rehearsal named; a rule that fits at the rehearsal's sub-steps is said
    to fit at a lower bound) and the whole DAG, with the rehearsal's training projections
    (measured sub-step growth, validations and checkpoints) where ``cost.csv`` has them, else
    the step-only ones."""
    config = load_config(Path(args.config), Path(args.schema))
    rows = project_hours(
        [Path(f) for f in args.project], Path(args.config), args.project_options, Path(args.schema)
    )
    limit = config["resources"]["train"]["runtime"]
    for job, count, hours in rows:
        each = hours / count if count else 0.0
        fits = _fits(each, limit, TRAIN_RULES[job.split("/")[0]]) if count else "not projected"
        print(f"{hours:10.1f} h  {count:3d} job(s)  {each:6.2f} h each, {fits:24s}  {job}")
    paper = sum(h for job, _, h in rows if "(" not in job)
    print(f"{paper:10.1f} h  total of the benchmarked paper variants (from "
          f"{', '.join(args.project)})")  # fmt: skip
    trained = sum(h for *_, h in rows)
    print(f"{trained:10.1f} h  training, with the assumed ones")
    print(f"{'':12s}  these training hours: {STEP_ONLY}")
    if args.cost is None:
        print("evaluation, PnP and data jobs: not projected (add --cost "
              "results/rehearsal/cost.csv of a `make rehearsal` on the device)")  # fmt: skip
        return
    others = projected_by_rule(Path(args.cost), set(RULES))
    for r in others:
        fits = "fits, at a lower bound" if r["lower_bound"] else "fits"  # cost.SUBSTEP_BOUND
        if r["over"]:
            fits = f"{len(r['over'])} over {r['runtime_min']:.0f} min: {', '.join(r['over'][:4])}"
        print(f"{r['projected_h']:10.1f} h  {r['jobs']:3d} job(s)  {r['each_h']:6.2f} h at most, "
              f"{fits:24s}  {r['rule']} (from {args.cost})")  # fmt: skip
    projected = {r["rule"] for r in others}
    used = [rule for rule in TRAIN_RULES.values() if rule in projected]
    step_only = [task for task, rule in TRAIN_RULES.items() if rule not in projected]
    total = sum(r["projected_h"] for r in others)
    total += sum(h for job, _, h in rows if job.split("/")[0] in step_only)
    training = []
    if used:
        training.append(f"{', '.join(used)} of {args.cost} (measured sub-steps, validations, "
                        "checkpoints)")  # fmt: skip
    if step_only:
        training.append(f"the step-only {' and '.join(step_only)} above (for {args.config})")
    print(f"{total:10.1f} h  the whole DAG: training: {' + '.join(training)}; evaluation, PnP "
          f"and data (for the paper config of {args.cost})")  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stablenets.bench.training", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument(
        "--models",
        default="classifier,resnet,denoiser,dncnn",
        help=f"comma-separated subset of {','.join(MODEL_SPECS)}",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (recorded)")
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help=f"excluded warm-up steps per process (with --cuda-graphs at least {GRAPH_WARMUP}: "
        "the capture's)",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    p.add_argument("--big-steps", type=int, default=1, help="timed steps for >100k-pixel images")
    p.add_argument("--big-repeats", type=int, default=1, help="repeats for >100k-pixel images")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch")
    p.add_argument("--size", type=int, nargs=2, default=None, help="override the denoisers' H W")
    p.add_argument(
        "--substeps",
        type=int,
        default=1,
        help="multiply every block's integration time (about that many sub-steps)",
    )
    p.add_argument(
        "--widths",
        type=lambda v: [int(w) for w in v.split(",")],
        default=None,
        help="comma-separated base widths of the classifier models (default: the skeleton's)",
    )
    p.add_argument(
        "--epoch-images",
        type=int,
        default=None,
        help="images per epoch (epoch_s; default: the CIFAR-10 training split of --config)",
    )
    p.add_argument(
        "--no-reference", action="store_true", help="skip the baselines (reference, plain pair)"
    )
    p.add_argument("--amp", action="store_true", help="CUDA only: train.amp (bf16) for ours")
    p.add_argument("--channels-last", action="store_true", help="train.channels_last for ours")
    p.add_argument("--cudnn-benchmark", action="store_true", help="train.cudnn_benchmark for ours")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="train.cuda_graphs for ours and the plain pair (the reference stays eager)",
    )
    p.add_argument(
        "--remat",
        choices=["auto", "on", "off"],
        default="auto",
        help="train.remat of ours: sub-step activation checkpointing (auto: large images only)",
    )
    p.add_argument("--inprocess", action="store_true", help="no subprocesses (memory not isolated)")
    p.add_argument(
        "--profile", action="store_true", help="print torch.profiler's top operators per job"
    )
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/<device>.csv)")
    p.add_argument(
        "--project",
        default=None,
        nargs="+",
        metavar="CSV",
        help="print the projected hours of config.yaml's training jobs from CSVs (a later "
        "file's row replaces an earlier one's)",
    )
    p.add_argument(
        "--config", default="config.yaml", help="config for --project and --epoch-images"
    )
    p.add_argument("--schema", default=str(SCHEMA), help="JSON Schema that validates --config")
    p.add_argument(
        "--project-options",
        default=None,
        help="--project uses rows run with these options for every variant (default: each "
        "variant's own settings in the config)",
    )
    p.add_argument(
        "--cost",
        default=None,
        help="--project adds the evaluation and PnP jobs projected in this cost.csv (of `make "
        "rehearsal`) to the training jobs",
    )
    p.add_argument("--append", action="store_true", help="append rows to an existing CSV")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cost is not None and args.project is None:
        p.error("--cost adds to --project: name the benchmark CSVs with --project")
    if args.worker is None and args.project is None:
        args.models = [m for m in args.models.split(",") if m]
        unknown = sorted(set(args.models) - set(MODEL_SPECS))
        if unknown:
            p.error(f"unknown models {unknown}; allowed: {list(MODEL_SPECS)}")
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.device = torch.device(args.device)
        if args.amp and args.device.type != "cuda":
            p.error("--amp is CUDA only (no bf16 throughput on this CPU path)")
        if args.cuda_graphs and args.device.type != "cuda":
            p.error("--cuda-graphs is CUDA only")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)  # in-process runs leave the caller's setting alone
        _PREPARED.clear()


def _main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return []
    if args.project is not None:
        _print_projection(args)
        return []
    if args.epoch_images is None:
        args.epoch_images = epoch_images(load_config(Path(args.config), Path(args.schema)))
    jobs = _jobs(args)
    results: list[list[dict]] = [[] for _ in jobs]
    states = tempfile.TemporaryDirectory()
    for job in jobs:
        job["state"] = str(Path(states.name) / f"{job['model']}{_width(job)}.pt")
        if not Path(job["state"]).exists():
            prepare_state(job, Path(job["state"]))
    for r in range(max(j["repeats"] for j in jobs)):
        for i, job in enumerate(jobs):
            if r < job["repeats"]:
                t0 = time.perf_counter()
                results[i].append(_spawn(dict(job, flops=(r == 0))))
                if r > 0:
                    results[i][-1]["flops"] = results[i][0]["flops"]
                print(f"[bench] repeat {r} {job['model']}/{job['impl']}: "
                      f"{results[i][-1]['steps'] / results[i][-1]['elapsed']:.4g} steps/s "
                      f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)  # fmt: skip
    peak = device_peak_gflops(
        args.device, args.threads, torch.bfloat16 if args.amp else torch.float32
    )
    rows = _summarise(args, jobs, results, peak, device_name(args.device))
    _print_table(rows)
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"{args.device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    append = args.append and out.exists()
    with out.open("a" if append else "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if not append:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    from stablenets.pipeline.config import ConfigError

    try:
        main()
    except (ConfigError, ValueError) as err:  # one line per problem of --config or --cost
        sys.exit(f"python -m stablenets.bench.training: {err}")
