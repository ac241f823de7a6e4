"""The pipeline's jobs: one function per rule kind, reading inputs and writing declared outputs.

Each function takes a JSON-able ``spec`` (built by the Snakefile from ``config.yaml``) and paths.
Logic lives in the library layers below; this module wires files to them and records provenance.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from stablenets import data
from stablenets.atomic import remove_stale_temporaries
from stablenets.errors import InvariantError
from stablenets.evaluation import metrics, pnp, radius_sweep, robustness, tv
from stablenets.interrupt import Interrupted, StopFlag
from stablenets.nn.losses import loss_label
from stablenets.nn.models import (
    CLASSIFIERS,
    DENOISERS,
    CheckpointError,
    Classifier,
    DnCNN,
    NonexpansiveDenoiser,
    StableModel,
    build_model,
    load_model,
    read_checkpoint,
    save_model,
)
from stablenets.nn.operators import full_float32, pinned_weights
from stablenets.pipeline.labels import radius_label
from stablenets.pipeline.resume import SavedProgress, in_groups
from stablenets.pipeline.runtime import (
    config_hash,
    content_sha256,
    provenance,
    select_device,
    write_results,
    write_sidecar,
)
from stablenets.pipeline.specs import SEARCH_SETTINGS, run_only
from stablenets.train.augment import AugmentConfig
from stablenets.train.loop import TrainConfig, train, write_log
from stablenets.train.memory import is_out_of_memory, peak_memory_mb
from stablenets.train.tasks import ClassificationTask, DenoisingTask

__all__ = [
    "prepare_data",
    "train_model",
    "evaluate_classifier",
    "evaluate_denoiser",
    "evaluate_tv_denoising",
    "run_pnp",
    "run_tv_deblur",
]

Log = Callable[[str], None]
_Model = TypeVar("_Model", bound=StableModel)
# The models of each task (``load_model`` builds them from the names in CLASSIFIERS, DENOISERS).
_CLASSIFIER_KINDS = (Classifier,)
_DENOISER_KINDS = (NonexpansiveDenoiser, DnCNN)


def prepare_data(spec: dict, cache: Path, urls: list[str], out: Path, log: Log = print) -> None:
    """Download (checksummed, into the folder ``cache``, from the first of ``urls`` that serves
    it) and convert a dataset, or generate the offline smoke stand-in."""
    source = spec["source"]
    for stale in remove_stale_temporaries(out):  # one job at a time writes ``out``
        log(f"removed {stale}, left by a conversion that was killed")
    prov = {"source": source, "dataset": spec["dataset"]}
    seed = (spec.get(source) or {}).get("seed", spec.get("split_seed", -1))  # -1: no seed
    extra = provenance(spec, seed)  # config hash, seed, package versions, git commit
    if source == "download":
        archive = cache / spec["archive"]
        data.download(urls, archive, md5=spec.get("md5"), sha256=spec.get("sha256"), log=log)
        prov.update(md5=spec.get("md5"), sha256=spec.get("sha256"))
        if spec["dataset"] == "cifar10":
            data.prepare_cifar10(
                archive, out, spec["val_fraction"], spec["split_seed"], prov, extra_attrs=extra
            )
        else:
            data.prepare_bsds500(archive, out, tuple(spec["size"]), prov, extra_attrs=extra)
    elif source in ("synthetic", "photos"):  # the stand-ins: their section is their arguments
        make = {"synthetic": data.make_synthetic_classification, "photos": data.make_smoke_photos}
        _settings(functools.partial(make[source], out, extra_attrs=extra), source, spec[source])
    else:
        raise ValueError(f"data source {source!r} unknown; allowed: download, synthetic, photos")
    log(f"wrote {out} from {source}")


def _setup(spec: dict) -> torch.device:
    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.manual_seed(int(spec["seed"]))
    return select_device(spec.get("device", "auto"))


def _split(data_path: Path, split: str, task: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``data.read_split`` of a dataset made for ``task`` (its ``task`` attribute): a denoiser
    would otherwise train and be evaluated on CIFAR-10 without a word."""
    made_for = data.read_attrs(data_path).get("task")  # None: not ours (read_split says more)
    if made_for not in (None, task):
        raise data.DataError(f"{data_path} holds a {made_for} dataset; this job needs {task} data")
    return data.read_split(data_path, split)


_Settings = TypeVar("_Settings")


def _settings(
    cls: Callable[..., _Settings], section: str, values: dict[str, Any], **given: Any
) -> _Settings:
    """``cls(**values, **given)``; a key missing from, foreign to or doubled in a hand-written
    spec's ``section`` is one line naming it, not a traceback (the pipeline's specs are
    schema-checked; ``--debug`` shows the original error)."""
    try:
        inspect.signature(cls).bind(**values, **given)  # the arguments alone: not cls's own errors
    except TypeError as err:
        raise ValueError(f"--spec {section}: {err}") from err
    return cls(**values, **given)


def _task(spec: dict, data_path: Path, device: torch.device) -> ClassificationTask | DenoisingTask:
    train_x, train_y = _split(data_path, "train", spec["task"])
    val_x, val_y = _split(data_path, "val", spec["task"])
    if spec["task"] == "classification":
        if train_y is None or val_y is None:
            raise data.DataError(f"{data_path}: a classification dataset needs labels")
        augment: dict[str, Any] = {  # schema-checked config values, lists made tuples
            k: tuple(v) if isinstance(v, list) else v for k, v in spec["augment"].items()
        }
        return ClassificationTask(
            train_x.to(device),
            train_y.to(device),
            val_x.to(device),
            val_y.to(device),
            _settings(AugmentConfig, "augment", augment),
            spec["eval_batch"],
        )
    patch = spec.get("patch")
    return DenoisingTask(
        train_x.to(device),
        val_x.to(device),
        float(spec["sigma"]),
        int(spec["noise_seed"]),
        tuple(patch) if patch else None,
        spec["eval_batch"],
    )


def _model_kwargs(spec: dict, data_path: Path) -> dict[str, Any]:
    kwargs = dict(spec.get("kwargs", {}))
    if spec["task"] == "denoising" and spec["model"] in {"nonexpansive_denoiser", "dncnn"}:
        images, _ = _split(data_path, "test", "denoising")
        kwargs.setdefault("input_size", list(images.shape[-2:]))
    return kwargs


def train_model(
    spec: dict, data_path: Path, out_model: Path, out_log: Path, workdir: Path, log: Log = print
) -> None:
    """Train one (variant, seed); resumable from ``workdir``; writes the best model and its log."""
    device = _setup(spec)
    kwargs = _model_kwargs(spec, data_path)
    # values the config's checks cannot judge without building every model (30 s at paper size
    # on a CPU, at each Snakemake start): refused here, named by their config key
    try:
        model = build_model(spec["model"], **kwargs).to(device)
    except ValueError as err:
        raise ValueError(f"{spec['task']}.variants.{spec['variant']}.kwargs: {err}") from err
    task = _task(spec, data_path, device)
    cfg = _settings(TrainConfig, "train", spec["train"], seed=int(spec["seed"]))
    chash = _training_hash(spec, data_path)
    log(f"training {spec['variant']} seed {spec['seed']} on {device} (config {chash})")
    model, state = train(model, task, cfg, workdir, chash, log)
    write_sidecar(out_log, spec, spec["seed"], [data_path])
    write_log(state.rows, out_log)
    save_model(
        model,
        out_model,
        best_step=state.best_step,
        best_metric=state.best_metric,
        train_time_s=state.elapsed,
        epoch_time_s=state.elapsed / max(state.step, 1) * task.steps_per_epoch(cfg.batch_size),
        peak_memory_mb=state.peak_memory_mb or peak_memory_mb(device),  # where steps ran
        total_substeps=_saved_substeps(model),
        **state.time_split(),
        **state.run_clocks(),
        **provenance(spec, spec["seed"], state.device or device, [data_path]),
    )
    log(f"best val {task.metric_name} {state.best_metric:.4f} at step {state.best_step}")


def _progress_settings(spec: dict, job: str | None = None) -> dict:
    """The settings saved progress (a training checkpoint, a sweep's state) must match to
    resume: the spec without its ``RUN_ONLY`` settings (and ``job``'s own, ``JOB_RUN_ONLY``)
    and its Lipschitz search's (``SEARCH_SETTINGS``, which ``_empirical_lipschitz`` checks
    itself)."""
    where, search = SEARCH_SETTINGS
    if search in spec.get(where, {}):
        spec = {**spec, where: {k: v for k, v in spec[where].items() if k != search}}
    kept = {k: v for k, v in spec.items() if not run_only((k,), job)}
    for section, value in spec.items():
        if isinstance(value, dict) and section in kept:
            kept[section] = {k: v for k, v in value.items() if not run_only((section, k), job)}
    return kept


def _progress_hash(spec: dict, job: str | None = None) -> str:
    """The hash of ``_progress_settings``."""
    return config_hash(_progress_settings(spec, job))


def _training_hash(spec: dict, data_path: Path) -> str:
    """The hash a training checkpoint must match to resume: the job's (``_progress_hash``) and
    what its data file holds (``content_sha256``): other images or splits, a new run."""
    return f"{_progress_hash(spec)}-{content_sha256(data_path)[:16]}"


def _saved_substeps(model: StableModel) -> int:
    """The sub-steps of the training pass that led to the saved (best) weights: each constrained
    block's count at the norm estimate saved with them. Sub-steps grow with the norms, so the
    final step's overstated an earlier best's; and a logged step's depends on ``log_every``."""
    return sum(b.substeps(b.operator.sigma_value()) for b in model.constrained_blocks())


def _trained_settings(extra: dict) -> dict:
    """The spec a model was trained with, as its checkpoint records it (``{}`` if it does not)."""
    return json.loads(extra["config"]) if isinstance(extra.get("config"), str) else {}


def _load(
    model_path: Path, spec: dict, task: str, classes: tuple[type[_Model], ...]
) -> tuple[_Model, dict, torch.device]:
    """The trained model for this job; a checkpoint of another kind of model, another variant
    or another noise level fails with one line naming the file, what it holds and what the job
    expected."""
    device = _setup(spec)
    ckpt = read_checkpoint(model_path)
    kinds = sorted({"classification": CLASSIFIERS, "denoising": DENOISERS}[task])
    if ckpt.get("name") not in kinds:
        raise CheckpointError(
            f"checkpoint {model_path} holds model {ckpt.get('name')!r}, not a {task} model; "
            f"expected one of {kinds}"
        )
    extra = ckpt.get("extra", {})
    trained = _trained_settings(extra)
    for key in ("variant", "sigma"):
        if key in trained and key in spec and trained[key] != spec[key]:
            raise CheckpointError(
                f"checkpoint {model_path} was trained for {key} {trained[key]!r}, "
                f"this job expects {spec[key]!r}"
            )
    model = load_model(model_path, map_location=device)
    if not isinstance(model, classes):  # the name check above admits no other class
        raise CheckpointError(f"checkpoint {model_path} holds a {type(model).__name__}")
    return model, extra, device


def _accuracy_attrs(eps: np.ndarray, acc: dict[str, np.ndarray]) -> dict[str, float]:
    return {f"auc_{k}": robustness.auc(eps, v) for k, v in acc.items()}


def _sweep(
    model: StableModel,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: radius_sweep.SweepPlan,
    state: radius_sweep.SweepState,
    name: str,
    saved: SavedProgress,
    ev: dict,
    log: Log,
) -> radius_sweep.SweepState:
    """Run (or go on with a resumed) radius sweep, saving its state to ``saved`` every
    ``save_every_s`` and at its end; a stop signal (``saved.stop``) ends the job before its next
    batch (``saved.stop_point``, exit 75), and one during the last batch lets the sweep finish."""
    last, stopped = time.monotonic(), False

    def save(s: radius_sweep.SweepState, force: bool = False) -> None:
        nonlocal last
        if force or time.monotonic() - last >= ev["save_every_s"]:
            saved["state"] = s.to_dict()
            last = time.monotonic()

    def stop() -> bool:  # polled before each batch: true, the search returns with work left
        nonlocal stopped
        stopped = saved.stop is not None and saved.stop.raised
        return stopped

    try:
        for search in (radius_sweep.sweep, radius_sweep.bisect):
            if not stopped:
                state = search(
                    model, x, y, plan, state, name, save, stop, log, ev["log_every_s"]
                )  # fmt: skip
    except Exception as err:
        if is_out_of_memory(err):  # the state is that after the last whole batch: keep it
            save(state, force=True)
        raise
    save(state, force=True)  # finished too: a rerun (a run-only setting changed) resumes here
    if stopped:
        saved.stop_point()
    return state


def _resumed_sweep(
    saved: SavedProgress, plan: radius_sweep.SweepPlan, correct: torch.Tensor, log: Log
) -> radius_sweep.SweepState | None:
    """The saved sweep state, if any. Its clean predictions (``correct``, which its curves and
    certificates come from) are kept even where this run's (``correct``) differ, with one log
    line saying on how many points: float32 logits round differently on another device or
    thread count (run-only settings, so such a rerun resumes), and a point within rounding of
    the boundary may change sides."""
    if "state" not in saved:
        return None
    state = radius_sweep.SweepState(**saved["state"])
    log(f"resuming from {saved.path}, {radius_sweep.position(plan, state)}")
    differ = int((state.correct != correct.cpu()).sum())
    if differ:
        log(
            f"the saved sweep's clean predictions differ from this run's on {differ} of "
            f"{len(correct)} points (float rounding: another device or thread count); the saved "
            "ones are kept, as its curves and the clean accuracy"
        )
    return state


def _saved_progress(
    spec: dict,
    inputs: list[Path],
    layout: str,
    workdir: Path,
    log: Log,
    stop: StopFlag | None = None,
    job: str | None = None,
    name: str = "progress.pt",
) -> SavedProgress:
    """The job's progress file ``name`` in ``workdir``. A rerun resumes from it only if it was
    saved by the same job (``_progress_hash``, ``job``'s run-only settings aside) on inputs
    holding the same (``content_sha256``: the same weights or images, whatever run record they
    carry) in the same ``layout``; given ``stop``, its ``stop_point`` is where a signal ends
    the job."""
    settings = _progress_settings(spec, job)
    digests = [content_sha256(p)[:16] for p in inputs]
    key = "-".join([config_hash(settings), *digests, layout])
    return SavedProgress(workdir / name, key, log, stop, settings)


#: What a job's choice on validation images (a TV weight, a PnP strength) does not depend on:
#: its test images' settings, and the candidates (each one's score is saved by its value).
_NOT_VALIDATION: dict[str, tuple[tuple[str, ...], ...]] = {
    "evaluate-tv": (("evaluate",), ("tv", "weights"), ("tv", "group_size")),
    "pnp": tuple(("pnp", k) for k in ("n_images", "n_show", "group_size", "seed", "strengths")),
    "tv-deblur": (
        *(("pnp", k) for k in ("n_images", "n_show", "group_size", "seed")),
        ("pnp", "tv", "weights"),
    ),
}


def _validation_progress(
    spec: dict, job: str, inputs: list[Path], layout: str, workdir: Path, log: Log,
    stop: StopFlag,
) -> SavedProgress:  # fmt: skip
    """The scores of a job's choice on validation images, saved in ``workdir/validation.pt``
    apart from its test images' progress: a change of the test images' settings (``n_test``,
    ``crops``, ...) or a candidate more keeps the scores found (hours at paper size: 6 TV
    weights x 100 images x up to 1,000 iterations); what they depend on starts them again."""
    kept = copy.deepcopy(spec)
    for path in _NOT_VALIDATION[job]:
        node = kept
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return _saved_progress(kept, inputs, f"{layout}-validation", workdir, log, stop, job,
                           "validation.pt")  # fmt: skip


def evaluate_classifier(
    spec: dict, model_path: Path, data_path: Path, out: Path, workdir: Path, log: Log = print
) -> None:
    """Clean, certified (certified Lipschitz bound, margins net of their float32 rounding:
    ``robustness.clean_margins``) and empirical robust accuracy; AUCs. One radius sweep
    (``radius_sweep.sweep``) attacks each point only where it can change a number, audits a
    sample of certified points, each near its own certified radius; its state, then each tenth of
    the empirical Lipschitz search and its bound, are saved in ``workdir``: a killed job's rerun
    resumes there (SIGTERM stops it before its next batch or search step, exit 75), and its
    clean accuracy is that of the resumed state (``_resumed_sweep``)."""
    # from the start: a stop signal during start-up (loading, the clean pass) stops the job at
    # the sweep's first poll, with its line and exit 75, instead of killing it silently
    with StopFlag() as stop:
        model, extra, device = _load(model_path, spec, "classification", _CLASSIFIER_KINDS)
        ev = spec["evaluate"]
        x, y = _split(data_path, "test", "classification")
        if y is None:
            raise data.DataError(f"{data_path}: the test split has no labels to evaluate against")
        if ev.get("n_test"):
            x, y = x[: ev["n_test"]], y[: ev["n_test"]]
        clean_start = time.perf_counter()
        margin, correct, rounding = robustness.clean_margins(model, x, y, ev["batch_size"])
        clean_s = time.perf_counter() - clean_start  # this run's: a resumed one computes it again
        lip = model.lipschitz_bound()
        eps, std_eps = radius_sweep.evaluation_radii(ev)
        plan = radius_sweep.SweepPlan.from_config(ev, spec["seed"], log)
        saved = _saved_progress(
            spec, [model_path, data_path], f"v{radius_sweep.STATE_VERSION}", workdir, log, stop
        )
        state = _resumed_sweep(saved, plan, correct, log) or radius_sweep.SweepState.start(
            correct, robustness.certified_radius(margin, correct, lip, rounding), spec["seed"]
        )
        clean = float(state.correct.double().mean())  # what the curves count: the state's
        log(f"{spec['variant']}: clean {clean:.4f}, Lipschitz bound {lip:.4g}")
        attacked_s = sum(state.seconds.values())  # a resumed sweep's: earlier runs'
        state = _sweep(model, x, y, plan, state, spec["variant"], saved, ev, log)
        if plan.search is not None:
            if graphs := plan.search.summary():
                log(graphs)
            plan.search.release()
        lower = _empirical_lipschitz(
            model, x, ev, spec["seed"], lip, f"classifier {spec['variant']!r}", saved, log
        )
    acc, std = state.accuracies(eps), state.accuracies(std_eps)
    # holds by construction (the sweep fails on a break radius below a certified one): a guard
    robustness.check_invariant(eps, acc["certified"], acc["empirical"], clean, spec["variant"])
    at = [radius_label(float(e)) for e in std_eps]

    def by_radius(values: np.ndarray) -> str:
        return ", ".join(f"{r} {v:.4f}" for r, v in zip(at, values, strict=True))

    log(
        f"{spec['variant']}: clean {clean:.4f}, Lipschitz bound {lip:.4g} (empirical lower "
        f"bound {lower:.4g}); robust accuracy at the standard radii: certified "
        f"{by_radius(std['certified'])}; PGD {by_radius(std['pgd'])}; strongest attack "
        f"{by_radius(std['empirical'])}"
    )
    attrs = {
        "variant": spec["variant"],
        "model": model.model_name,
        "clean_accuracy": clean,
        "lipschitz_bound": lip,
        "n_params": sum(p.numel() for p in model.parameters()),
        "total_substeps": extra.get("total_substeps", 0),
        "train_time_s": extra.get("train_time_s", math.nan),
        "epoch_time_s": extra.get("epoch_time_s", math.nan),
        "peak_memory_mb": extra.get("peak_memory_mb", math.nan),
        "base_width": getattr(model, "base_width", math.nan),
        "empirical_lipschitz": lower,
        "best_step": extra.get("best_step", -1),
        "n_test": len(y),
        "strong_method": radius_sweep.strong_label(ev["strong"], ev["precision"]),
        "train_loss": loss_label(_trained_settings(extra).get("train", {}).get("loss")),
        "attack_precision": ev["precision"],
        "attack_cuda_graphs": ev["cuda_graphs"],
        "audited_certified": int(sum(state.audited.values())),
        **{f"seconds_per_point_{p}": _per_point(state, p) for p in radius_sweep.PASSES},
        **{f"attacked_points_{p}": state.points[p] for p in radius_sweep.PASSES},
        # this run's own seconds (the sweep's totals count every run's), for bench.cost: its
        # clean pass (the n_test points' logits and margins) and its attacks
        "seconds_clean_run": clean_s,
        "seconds_attacks_run": sum(state.seconds.values()) - attacked_s,
        **_accuracy_attrs(eps, acc),
        **provenance(spec, spec["seed"], device, [model_path, data_path]),
    }
    datasets = {"eps": eps, **acc, "standard_eps": std_eps}
    datasets.update({f"standard_{k}": v for k, v in std.items()})
    datasets["standard_audited"] = np.array(
        [state.audited.get(radius_sweep.radius_key(e), 0) for e in std_eps]
    )
    datasets.update(
        certified_radius=state.certified_radius.numpy(),
        break_radius=state.break_radius.numpy(),
        pgd_break_radius=state.pgd_break_radius.numpy(),
    )
    write_results(out, attrs, datasets)


def _per_point(state: radius_sweep.SweepState, pass_name: str) -> float:
    """Seconds per attacked point of one pass (NaN when it attacked none)."""
    n = state.points[pass_name]
    return state.seconds[pass_name] / n if n else math.nan


def _empirical_lipschitz(
    model: torch.nn.Module,
    x: torch.Tensor,
    ev: dict,
    seed: int,
    bound: float,
    what: str,
    progress: SavedProgress,
    log: Log,
) -> float:
    """Empirical Lipschitz lower bound of ``model`` near the first ``lipschitz_search.images``
    of ``x`` (``robustness.lipschitz_lower_bound``, which moves them to the model's device),
    saved in ``progress``: the search's state (section ``lipschitz_search``, tens of MB on the
    paper's full-size images) until its bound is saved, then the bound alone. Above the
    certified ``bound`` it would prove the certificate wrong, which fails the job (``what``
    names the model). Saved with the search's settings: other settings search again."""
    search = ev[SEARCH_SETTINGS[1]]
    if progress.get("lipschitz_settings") != (settings := config_hash(search)):
        if {"empirical_lipschitz", "lipschitz_search"} & set(progress):
            log("the Lipschitz search's settings changed: searching again (the rest is kept)")
        progress.pop("empirical_lipschitz", None)
        progress.pop("lipschitz_search", None)
        progress["lipschitz_settings"] = settings
    if "empirical_lipschitz" not in progress:
        progress.stop_point()
        try:
            progress["empirical_lipschitz"] = robustness.lipschitz_lower_bound(
                model, x[: search["images"]], search["steps"], search["lr"],
                search["delta_scale"], seed, log, progress.section("lipschitz_search"),
                progress.stop,
            )  # fmt: skip
        except Interrupted as stopped:
            raise Interrupted(f"{stopped} in {progress.path}; rerun to resume") from None
    progress.pop("lipschitz_search", None)  # a kill before this keeps both: a rerun ends here
    lower = float(progress["empirical_lipschitz"])
    if lower > bound:
        raise InvariantError(
            f"{what}: empirical Lipschitz {lower:.6g} exceeds the certified bound {bound:.6g}"
        )
    return lower


def _noisy_test(
    spec: dict, data_path: Path, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    clean, _ = _split(data_path, "test", "denoising")
    n = spec["evaluate"].get("n_test")
    clean = clean[:n] if n else clean
    noisy = metrics.fixed_noise(clean, float(spec["sigma"]), int(spec["evaluate"]["noise_seed"]))
    return clean.to(device), noisy.to(device)


def _batched(model: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """``model`` on ``x`` in batches of ``batch``: the memory is that of one batch. In full
    float32 (no TF32 on a GPU): the denoising table's PSNRs come from the arithmetic PnP uses."""
    with torch.no_grad(), pinned_weights(model), full_float32():
        return torch.cat([model(chunk) for chunk in x.split(batch)])


def _crops(images: dict[str, torch.Tensor], ev: dict, first: int = 0) -> dict[str, torch.Tensor]:
    """The centre ``crop_size`` crops of those of ``images`` (named sets of the same shape)
    among the test set's first ``crops`` (``first``: the index of their first image)."""
    k, (h, w) = max(ev["crops"] - first, 0), ev["crop_size"]
    height, width = next(iter(images.values())).shape[-2:]
    h, w = min(h, height), min(w, width)
    top, left = (height - h) // 2, (width - w) // 2
    return {f"crops/{n}": t[:k, :, top : top + h, left : left + w] for n, t in images.items()}


def _psnr_sets(
    denoised: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {
        "psnr": metrics.psnr(denoised, clean),
        "psnr_1": metrics.psnr(denoised, clean, peak=1.0),
        "noisy_psnr": metrics.psnr(noisy, clean),
        "noisy_psnr_1": metrics.psnr(noisy, clean, peak=1.0),
    }


def _spread(values: torch.Tensor) -> float:
    """The sample standard deviation; NaN, without torch's warning, for one value."""
    return float(values.std()) if len(values) > 1 else math.nan


def _denoising_attrs(sets: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        "mean_psnr": float(sets["psnr"].mean()),
        "std_psnr": _spread(sets["psnr"]),
        "mean_psnr_1": float(sets["psnr_1"].mean()),
        "std_psnr_1": _spread(sets["psnr_1"]),
        "noisy_mean_psnr": float(sets["noisy_psnr"].mean()),
        "noisy_mean_psnr_1": float(sets["noisy_psnr_1"].mean()),
    }


def _denoised_in_groups(
    progress: SavedProgress,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    denoise: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    ev: dict,
    size: int,
    what: str,
    log: Log,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The test images' PSNR sets (``_psnr_sets``) and their first ``ev["crops"]`` crops, the
    images denoised ``size`` at a time (``in_groups``: each group saved in ``progress`` as it
    ends). ``denoise`` maps a group's noisy images to their denoised images and any further
    per-group tensors to keep (returned with the PSNR sets)."""

    def solve(group: slice) -> dict[str, torch.Tensor]:
        x, extra = denoise(noisy[group])
        kept = {
            **_psnr_sets(x, noisy[group], clean[group]),
            **_crops({"denoised": x}, ev, group.start),
            **extra,
        }
        return {name: t.cpu() for name, t in kept.items()}

    joined = in_groups(progress, len(clean), size, solve, what, log)
    sets = {name: torch.from_numpy(t) for name, t in joined.items()}
    crops = {
        **_crops({"clean": clean, "noisy": noisy}, ev),
        "crops/denoised": sets.pop("crops/denoised"),
        "crops/psnr": sets["psnr"][: ev["crops"]],
    }
    return sets, crops


def evaluate_denoiser(
    spec: dict, model_path: Path, data_path: Path, out: Path, workdir: Path, log: Log = print
) -> None:
    """PSNR per test image under a fixed, seeded noise draw; certified and empirical Lipschitz.
    Each group of ``evaluate.group_size`` denoised test images, then each tenth of the
    empirical Lipschitz search and its bound, is saved in ``workdir`` as it ends: a killed
    job's rerun resumes there (SIGTERM stops it before its next group or search step, exit
    75)."""
    model, _, device = _load(model_path, spec, "denoising", _DENOISER_KINDS)
    ev = spec["evaluate"]
    clean, noisy = _noisy_test(spec, data_path, device)
    size = (clean.shape[-2], clean.shape[-1])
    bound, alpha = model.lipschitz_bound(size), model.averagedness(size)
    images, seconds = 0, 0.0  # test images this run denoises, and in what time: its cost

    def denoise(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nonlocal images, seconds
        start = time.monotonic()
        denoised = _batched(model, x, ev["batch_size"])
        images, seconds = images + len(x), seconds + time.monotonic() - start
        return denoised, {}

    with StopFlag() as stop:
        progress = _saved_progress(
            spec, [model_path, data_path], _DENOISER_LAYOUT, workdir, log, stop, _DENOISER_JOB
        )
        sets, crops = _denoised_in_groups(
            progress, clean, noisy, denoise, ev, ev["group_size"], "denoiser", log
        )
        lower = _empirical_lipschitz(
            model, noisy, ev, spec["seed"], bound, f"denoiser {spec['variant']!r}", progress, log
        )
    attrs = {
        "variant": spec["variant"],
        "sigma": float(spec["sigma"]),
        "lipschitz_bound": bound,
        "averagedness": alpha,
        "empirical_lipschitz": lower,
        "tv_weight": math.nan,
        "test_images_run": images,  # this run's (a resumed one did less): its cost, bench.cost
        "denoising_s_run": seconds,  # the rest of its wall time: loading, the Lipschitz search
        **_denoising_attrs(sets),
        **provenance(spec, spec["seed"], device, [model_path, data_path]),
    }
    write_results(out, attrs, {**sets, "image_index": np.arange(len(clean)), **crops})
    log(
        f"{spec['variant']}: PSNR {attrs['mean_psnr']:.2f} dB (noisy {attrs['noisy_mean_psnr']:.2f})"
        f", Lipschitz {lower:.4f} <= {bound:.4f}"
    )


# The layout of a denoiser evaluation's saved groups and bound (``_saved_progress``; v2: in full
# float32, no TF32) and the job's command (its run-only settings, ``specs.JOB_RUN_ONLY``).
_DENOISER_LAYOUT = "denoiser-v2"
_DENOISER_JOB = "evaluate-denoiser"


def evaluate_tv_denoising(
    spec: dict, data_path: Path, out: Path, workdir: Path, log: Log = print
) -> None:
    """TV denoising baseline; its weight is chosen on validation images (the first
    ``tv.val_images`` of the split, all if null), never on test. Each weight's score, then each
    group of ``tv.group_size`` denoised test images, is saved in ``workdir`` as it ends: a killed
    job's rerun resumes there (SIGTERM stops it before its next unit, exit 75)."""
    device = _setup(spec)
    ev, tv_spec = spec["evaluate"], spec["tv"]
    val, _ = _split(data_path, "val", "denoising")
    val = val[: tv_spec["val_images"]].to(device)
    val_noisy = metrics.fixed_noise(val, float(spec["sigma"]), int(tv_spec["val_noise_seed"]))
    clean, noisy = _noisy_test(spec, data_path, device)
    with StopFlag() as stop:
        # v3: each image stops at its own tolerance
        layout = "tv-denoising-v3"
        progress = _saved_progress(spec, [data_path], layout, workdir, log, stop)
        choices = _validation_progress(spec, "evaluate-tv", [data_path], layout, workdir, log, stop)
        found = choices.section("validation")  # may hold former candidates' scores too
        solves = sum(w not in found for w in tv_spec["weights"]) * len(val)  # this run's
        start = time.monotonic()
        weight, scores = tv.select_tv_weight(
            val_noisy, val, tv_spec["weights"], tv_spec["iters"], log=log, tol=tv_spec["tol"],
            found=found, stop_point=choices.stop_point,
        )  # fmt: skip
        log(f"TV weight {weight:g} chosen: denoising {len(noisy)} test images")

        def denoise(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            nonlocal solves
            solved = tv.tv_denoise(x, weight, tv_spec["iters"], tol=tv_spec["tol"])
            solves += len(solved.x)
            return solved.x, {
                "tv_iterations": torch.tensor([solved.iterations]),
                "tv_distance": torch.tensor([solved.distance]),
            }

        sets, crops = _denoised_in_groups(
            progress, clean, noisy, denoise, ev, tv_spec["group_size"], "TV", log
        )
        seconds = time.monotonic() - start  # this run's solves: the rest is start-up, loading
    iterations, distance = (
        int(sets.pop("tv_iterations").max()),
        float(sets.pop("tv_distance").max()),
    )
    log(
        f"TV: at most {iterations} iterations, within {distance:.2g} of the minimiser "
        f"(relative, certified by the duality gap; tol {tv_spec['tol']:g})"
    )
    attrs = {
        "variant": "tv",
        "sigma": float(spec["sigma"]),
        "lipschitz_bound": None,
        "averagedness": None,
        "empirical_lipschitz": None,
        "tv_weight": weight,
        "tv_validation_scores": list(scores),
        "tv_validation_images": len(val),
        "tv_iterations": iterations,
        "tv_distance": distance,
        "image_solves_run": solves,  # this run's (a resumed one did less): its cost, bench.cost
        "denoising_s_run": seconds,
        **_denoising_attrs(sets),
        **provenance(spec, -1, device, [data_path]),
    }
    write_results(out, attrs, {**sets, "image_index": np.arange(len(clean)), **crops})
    log(f"TV weight {weight} (validation scores {scores}): PSNR {attrs['mean_psnr']:.2f} dB")


class _DeblurProblem(NamedTuple):
    """A deblurring job's images: the test images and their observations, the validation images
    a weight is chosen on and theirs (blurred and noised alike, with their own noise draw)."""

    clean: torch.Tensor
    observed: torch.Tensor
    val: torch.Tensor
    val_observed: torch.Tensor
    blur: pnp.GaussianBlur


def _deblur_problem(spec: dict, data_path: Path, device: torch.device) -> _DeblurProblem:
    p = spec["pnp"]
    clean, _ = _split(data_path, "test", "denoising")
    clean = clean[: p["n_images"]].to(device)
    val, _ = _split(data_path, "val", "denoising")
    val = val[: p["val_images"]].to(device)
    blur = pnp.GaussianBlur(p["blur"]["size"], p["blur"]["sigma"], tuple(clean.shape[1:]))
    observed = pnp.observe(clean, blur, p["noise"], p["seed"])
    val_observed = pnp.observe(val, blur, p["noise"], p["val_noise_seed"])
    return _DeblurProblem(clean, observed, val, val_observed, blur)


def _deblur_attrs(
    spec: dict,
    hist: dict[str, np.ndarray],
    final: np.ndarray,
    observed_psnr: np.ndarray,
    iters: np.ndarray,
) -> dict[str, Any]:
    p = spec["pnp"]
    return {
        "noise": p["noise"],
        "blur_size": p["blur"]["size"],
        "blur_sigma": p["blur"]["sigma"],
        "observed_mean_psnr": float(observed_psnr.mean()),
        "mean_psnr": float(np.nanmean(final)),
        "std_psnr": float(np.nanstd(final, ddof=1)) if len(final) > 1 else math.nan,
        "mean_iterations": float(np.mean(iters)),
        "converged_fraction": float(np.mean(hist.get("converged", np.zeros(len(final))))),
        # TV records no divergence (it is a convex solver): none, not a count of 0
        "diverged_count": int(np.sum(hist["diverged"])) if "diverged" in hist else None,
    }


def run_pnp(
    spec: dict, model_path: Path, data_path: Path, out: Path, workdir: Path, log: Log = print
) -> None:
    """PnP forward–backward deblurring with a trained denoiser at its strength chosen on the
    validation images (``pnp.select_pnp_strength``: the best that converges there), with
    convergence bookkeeping, ``pnp.group_size`` test images at a time. Each strength's score and
    each group is saved in ``workdir`` as it ends (a killed job's rerun resumes after the last;
    SIGTERM stops it before the next, exit 75).

    For a denoiser with an averagedness guarantee, ``||x_{k+1} - x_k||`` must be non-increasing,
    on the validation runs too: a violation fails the job naming the model and the image.
    """
    model, _, device = _load(model_path, spec, "denoising", _DENOISER_KINDS)
    p = spec["pnp"]
    clean, observed, val, val_observed, blur = _deblur_problem(spec, data_path, device)
    alpha = model.averagedness((clean.shape[-2], clean.shape[-1]))
    options = pnp.PnPOptions(
        relax=p["relax"], max_iter=p["max_iter"], tol=p["tol"], blowup=p["blowup"],
        log_every=p["log_every"],
    )  # fmt: skip

    def denoise(v: torch.Tensor) -> torch.Tensor:
        return _batched(model, v, p["batch_size"])  # memory bounded whatever the group

    def check(hist: dict[str, torch.Tensor], strength: float) -> None:
        relaxed = None if alpha is None else strength * alpha
        _monotone(
            hist["step_norm"],
            val,
            0,
            relaxed,
            spec,
            f"validation image {{}} at strength {strength:g}",
        )

    with StopFlag() as stop, pinned_weights(model):  # weights hashed once, not every iteration
        inputs = [model_path, data_path]
        progress = _saved_progress(spec, inputs, _PNP_LAYOUT, workdir, log, stop)
        choices = _validation_progress(spec, "pnp", inputs, _PNP_LAYOUT, workdir, log, stop)
        start = time.monotonic()  # the seconds of its solves, the choice included: its cost
        converged = choices.section("validation_converged")
        choice = pnp.select_pnp_strength(
            denoise, blur, val_observed, val, p["strengths"], p["eta"], alpha, check, log,
            choices.section("validation"), converged, choices.stop_point, **options,
        )  # fmt: skip
        strength, ran = choice.value, choice.image_iterations  # ran: this run's (a resumed one's)
        relaxed = None if alpha is None else strength * alpha
        log(f"PnP denoiser strength {strength:g} chosen on {len(val)} validation images")

        def solve(group: slice) -> dict[str, torch.Tensor]:
            nonlocal ran
            x, hist = pnp.pnp_forward_backward(
                pnp.relaxed_denoiser(denoise, strength), blur, observed[group], p["eta"],
                reference=clean[group], denoiser_alpha=relaxed, log=log, **options,
            )  # fmt: skip
            hist["monotone"] = _monotone(
                hist["step_norm"], clean[group], group.start, relaxed, spec
            )
            ran += int(hist["iterations"].sum())
            return {**hist, **_group_images(x, clean[group], group.start, p["n_show"])}

        hist = in_groups(progress, len(clean), p["group_size"], solve, "PnP", log)
        seconds = time.monotonic() - start  # this run's solves: the rest is loading, the model
    final, recon, monotone = hist.pop("psnr_final"), hist.pop("recon"), bool(hist["monotone"].all())
    observed_psnr = metrics.psnr(observed, clean, peak=1.0).cpu().numpy()
    attrs = {
        "method": "pnp",
        "variant": spec["variant"],
        "nonincreasing": monotone,
        "lipschitz_bound": model.lipschitz_bound((clean.shape[-2], clean.shape[-1])),
        "averagedness": alpha,  # the trained denoiser's; the one plugged in: strength * alpha
        "eta": p["eta"],
        "relax": p["relax"],
        "strength": strength,
        "strengths": list(p["strengths"]),
        "strength_validation_scores": choice.scores,
        # each strength's fraction of validation images converged: the choice is among those at 1
        "strength_validation_converged": [converged[s] for s in p["strengths"]],
        "validation_images": len(val),
        "validation_image_iterations_run": choice.image_iterations,  # a resumed run: its own
        **_deblur_attrs(spec, hist, final, observed_psnr, hist["iterations"]),
        "image_iterations_run": ran,  # the choice's included
        "deblur_s_run": seconds,
        **provenance(spec, spec["seed"], device, [model_path, data_path]),
    }
    _write_pnp(out, attrs, hist, final, observed_psnr, clean, observed, recon)
    log(
        f"PnP {spec['variant']}: PSNR {attrs['observed_mean_psnr']:.2f} -> "
        f"{attrs['mean_psnr']:.2f} dB, iterations {hist['iterations']}, monotone {monotone}"
    )


# The layout of a TV (PnP) deblurring job's saved groups (``_saved_progress``); v2: TV's images
# stop one by one (v1's groups stopped together: not resumed beside v2's), v3: each image's
# ``converged`` saved (one that met tol at the last iteration converged); pnp-v3: PnP's
# strength is chosen among those that converge, each strength's converged fraction saved before
# its score (earlier progress could resume groups solved at another strength).
_DEBLUR_LAYOUT, _PNP_LAYOUT = "deblur-v3", "pnp-v3"


def _monotone(
    step_norms: torch.Tensor,
    clean: torch.Tensor,
    first: int,
    alpha: float | None,
    spec: dict,
    images: str = "test image {}",
) -> torch.Tensor:
    """Per image, whether its step norms are non-increasing to float32 rounding; for a denoiser
    with an averagedness guarantee (``alpha``) an increase fails the job, naming the image
    (``images`` with its index: ``first`` is the group's first)."""
    p, eps32 = spec["pnp"], float(torch.finfo(torch.float32).eps)
    flags = []
    for i, diffs in enumerate(step_norms):
        atol = p["nonincreasing_atol_eps"] * eps32 * float(clean[i].norm())
        ok = pnp.check_nonincreasing(diffs, rtol=p["nonincreasing_rtol"], atol=atol) is None
        if alpha is not None and not ok:
            pnp.assert_nonincreasing(
                diffs, spec["variant"], images.format(first + i), p["nonincreasing_rtol"], atol
            )
        flags.append(ok)
    return torch.tensor(flags)


def _group_images(
    x: torch.Tensor, clean: torch.Tensor, first: int, n_show: int
) -> dict[str, torch.Tensor]:
    """What a deblurring job keeps of a group's reconstructions: their PSNR (peak 1) and those
    among the first ``n_show`` of the test set (``first``: the group's first image)."""
    return {
        "psnr_final": metrics.psnr(x, clean, peak=1.0).cpu(),
        "recon": x[: max(n_show - first, 0)].cpu(),
    }


def run_tv_deblur(spec: dict, data_path: Path, out: Path, workdir: Path, log: Log = print) -> None:
    """TV-regularised deblurring baseline; its weight is chosen on validation images (blurred and
    noised as the test images, with their own noise draw), never on test. Each weight's score
    and each group of ``pnp.group_size`` test images is saved in ``workdir`` as it is found: a
    killed job's rerun resumes from there (SIGTERM stops it before its next unit, exit 75)."""
    device = _setup(spec)
    p, tv_spec = spec["pnp"], spec["pnp"]["tv"]
    clean, observed, val, val_observed, blur = _deblur_problem(spec, data_path, device)
    with StopFlag() as stop:
        progress = _saved_progress(spec, [data_path], _DEBLUR_LAYOUT, workdir, log, stop)
        choices = _validation_progress(
            spec, "tv-deblur", [data_path], _DEBLUR_LAYOUT, workdir, log, stop
        )
        start = time.monotonic()  # the seconds of its solves, choice included: its cost
        choice = pnp.select_tv_deblur_weight(
            val_observed, val, blur, tv_spec["weights"], tv_spec["iters"], tv_spec["tol"],
            tv_spec["step"], log=log, found=choices.section("validation"),
            stop_point=choices.stop_point,
        )  # fmt: skip
        weight = choice.value
        log(f"TV weight {weight:g} chosen on {len(val)} validation images: deblurring {len(clean)}")
        ran = choice.image_iterations  # this run's image-iterations (a resumed run's cost)

        def solve(group: slice) -> dict[str, torch.Tensor]:
            nonlocal ran
            x, iterations, converged = pnp.tv_deblur(
                observed[group], blur, weight, tv_spec["iters"], tv_spec["tol"], tv_spec["step"],
                log=log, log_every=p["log_every"],
            )  # fmt: skip
            ran += int(iterations.sum())  # each image until it stopped
            return {"iterations": iterations, "converged": converged,
                    **_group_images(x, clean[group], group.start, p["n_show"])}  # fmt: skip

        hist = in_groups(progress, len(clean), p["group_size"], solve, "TV deblur", log)
        seconds = time.monotonic() - start  # this run's solves: the rest is start-up, loading
    final, recon, iters = hist.pop("psnr_final"), hist.pop("recon"), hist["iterations"]
    observed_psnr = metrics.psnr(observed, clean, peak=1.0).cpu().numpy()
    attrs = {
        "method": "tv",
        "variant": "tv",
        "nonincreasing": None,  # not recorded: TV keeps no step history (the table says n/a)
        "lipschitz_bound": None,
        "averagedness": None,
        **_deblur_attrs(spec, hist, final, observed_psnr, iters),  # converged: stopped at tol
        "tv_weight": weight,
        "tv_weights": list(tv_spec["weights"]),
        "tv_validation_scores": choice.scores,
        "tv_validation_images": len(val),
        "tv_validation_image_iterations_run": choice.image_iterations,  # a resumed run: its own
        "image_iterations_run": ran,
        "deblur_s_run": seconds,
        **provenance(spec, -1, device, [data_path]),  # no seed: nothing trained
    }
    _write_pnp(out, attrs, hist, final, observed_psnr, clean, observed, recon)
    psnrs = f"{attrs['observed_mean_psnr']:.2f} -> {attrs['mean_psnr']:.2f} dB"
    capped = int((~hist["converged"]).sum())
    cap = (
        f" ({capped} of {len(iters)} images stopped at pnp.tv.iters, not at tol)" if capped else ""
    )
    log(f"TV deblur: weight {weight:g}, at most {int(iters.max())} iterations{cap}, PSNR {psnrs}")


def _write_pnp(
    out: Path,
    attrs: dict[str, Any],
    hist: dict[str, np.ndarray],
    final: np.ndarray,
    observed_psnr: np.ndarray,
    clean: torch.Tensor,
    observed: torch.Tensor,
    recon: np.ndarray,
) -> None:
    """A deblurring job's result file: PSNRs and iterations per image, the first ``len(recon)``
    images clean, observed and reconstructed, and the per-iteration histories it recorded."""
    n_show = len(recon)
    datasets = {
        "psnr_final": final,
        "psnr_observed": observed_psnr,
        "iterations": np.asarray(hist["iterations"]),
        "images/clean": clean[:n_show],
        "images/observed": observed[:n_show],
        "images/recon": recon,
    }
    if "diverged" in hist:  # PnP's (TV does not diverge)
        datasets["diverged"] = np.asarray(hist["diverged"])
    for key in ("step_norm", "psnr_1", "residual"):
        if key in hist:
            datasets[f"history/{key}"] = np.asarray(hist[key])
    write_results(out, attrs, datasets)
