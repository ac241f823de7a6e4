"""Command line: ``python -m stablenets <job> --spec JSON ...``, one subcommand per rule kind.

Every job prints one clear line and exits non-zero on bad input instead of a deep traceback
(``--debug`` shows the traceback), and so does a job that runs out of memory (naming the settings
that bound it). A training job interrupted by SIGUSR1/SIGTERM exits with
code 75 (temporary failure) after writing its checkpoint; rerunning resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

EXIT_INTERRUPTED = 75

# The modules behind the jobs: imported when their job runs (the report jobs without torch).
_RUN, _REPORT, _COST = (
    "stablenets.pipeline.jobs",
    "stablenets.pipeline.reports",
    "stablenets.bench.cost",
)
# job -> (module, function, path arguments, help).
_JOBS = {
    "prepare-data": (_RUN, "prepare_data", ["cache", "urls", "out"],
                     "download and convert a dataset"),
    "train": (_RUN, "train_model", ["data", "model", "log", "workdir"], "train a model"),
    "evaluate-classifier": (_RUN, "evaluate_classifier", ["model", "data", "out", "workdir"],
                            "certify and attack a classifier"),
    "evaluate-denoiser": (_RUN, "evaluate_denoiser", ["model", "data", "out", "workdir"],
                          "denoising PSNR of a model"),
    "evaluate-tv": (_RUN, "evaluate_tv_denoising", ["data", "out", "workdir"],
                    "TV denoising PSNR"),
    "pnp": (_RUN, "run_pnp", ["model", "data", "out", "workdir"],
            "PnP deblurring with a denoiser"),
    "tv-deblur": (_RUN, "run_tv_deblur", ["data", "out", "workdir"], "TV deblurring"),
    "table": (_REPORT, "make_table", ["inputs", "out"], "a table from result files"),
    "figure": (_REPORT, "make_figure", ["inputs", "out"], "a figure from result files"),
    "summary": (_REPORT, "write_summary", ["inputs", "out"], "the results summary"),
    "cost": (_COST, "write_cost", ["inputs", "out"], "measured cost and paper-scale projection"),
}  # fmt: skip
# Errors a job reports in one line (``--debug``: the traceback), besides ``ValueError``.
_CLEAR_ERRORS = {
    "stablenets.data.format": ["DataError"],
    "stablenets.nn.models": ["CheckpointError"],
    "stablenets.train.loop": ["DivergenceError"],
    "stablenets.errors": ["InvariantError"],
}


# job -> the settings that bound its memory, as (config key, spec path) pairs, and whether a
# rerun resumes from what the job saved. ``{task}``: the training job's task; a variant's own
# ``train`` settings override the task's.
_MEMORY_SETTINGS: dict[str, tuple[list[tuple[str, tuple[str, ...]]], bool]] = {
    "train": ([("{task}.train.batch_size", ("train", "batch_size")),
               ("{task}.train.max_substeps", ("train", "max_substeps")),
               ("{task}.eval_batch", ("eval_batch",))], True),
    "evaluate-classifier": ([("classification.evaluate.batch_size", ("evaluate", "batch_size"))],
                            True),
    "evaluate-denoiser": ([("denoising.evaluate.batch_size", ("evaluate", "batch_size")),
                           ("denoising.evaluate.group_size", ("evaluate", "group_size")),
                           # its float64 search takes them all at once: 6.5 GB for 2 at 321x481
                           ("denoising.evaluate.lipschitz_search.images",
                            ("evaluate", "lipschitz_search", "images"))], True),
    # their choice on validation images solves every one at once (17 MB each at 321x481)
    "pnp": ([("pnp.batch_size", ("pnp", "batch_size")),
             ("pnp.group_size", ("pnp", "group_size")),
             ("pnp.val_images", ("pnp", "val_images"))], True),
    "tv-deblur": ([("pnp.group_size", ("pnp", "group_size")),
                   ("pnp.val_images", ("pnp", "val_images"))], True),
    # its weight is chosen on every validation image at once (37 MB each at 321x481)
    "evaluate-tv": ([("denoising.tv.group_size", ("tv", "group_size")),
                     ("denoising.tv.val_images", ("tv", "val_images"))], True),
}  # fmt: skip


def _at(spec: dict, path: tuple[str, ...]) -> object:
    """``spec[path[0]][path[1]]...``, ``None`` where a key is missing."""
    value: object = spec
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _out_of_memory_line(job: str, spec: dict, err: BaseException) -> str:
    """One line for a job that ran out of memory: where, how much it asked for, which settings
    to lower (with their values) and whether a rerun resumes."""
    text = str(err)
    where = "CUDA" if "CUDA" in text else "CPU" if "CPUAllocator" in text else "host"
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ ?\w+)", text)
    what = where + (f", tried to allocate {asked[1]}" if asked else "")
    from stablenets.pipeline.specs import SEARCH_SETTINGS, run_only

    settings, resumes = _MEMORY_SETTINGS.get(job, ([], False))
    # restart: the settings saved progress is tied to; regroup: those its image groups are
    keys, restart, search, regroup = [], [], [], []
    for key, path in settings:
        value = _at(spec, path)
        if path == ("train", "max_substeps") and value == "auto":  # the limit is a share
            key, path = (
                key.replace("max_substeps", "memory_fraction"),
                (*path[:-1], "memory_fraction"),
            )
            value = _at(spec, path)
        key = key.format(task=spec.get("task", "<task>"))
        keys.append(f"{key} (now {value})")
        if path[: len(SEARCH_SETTINGS)] == SEARCH_SETTINGS:
            search.append(key)
        elif not run_only(path, job):
            restart.append(key)
        elif path[-1] == "group_size":  # groups saved by their size (resume.in_groups)
            regroup.append(key)
    advice = f"lower {_either(keys)}" if keys else "run it where more memory is free"
    if not resumes:
        rerun = "a rerun starts it again"
    elif restart:
        rerun = (f"what the job saved is kept, and a rerun resumes from it unless it changes "
                 f"{_either(restart)}, which starts it again")  # fmt: skip
    else:
        rerun = "what the job saved is kept, and a rerun resumes from it"
    if resumes and search:
        rerun += f" (a change of {_either(search)} redoes only its Lipschitz search)"
    if resumes and regroup:
        rerun += f" (a change of {_either(regroup)} solves its saved image groups again)"
    return f"stablenets {job}: error: out of memory ({what}): {advice}; {rerun}"


def _either(names: list[str]) -> str:
    """``a, b or c``."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablenets", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="job", required=True)
    for name, (_, _, paths, text) in _JOBS.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("--spec", required=True, help="job specification as JSON")
        for arg in paths:
            nargs = "+" if arg == "inputs" else None
            kind = _url_list if arg == "urls" else Path
            p.add_argument(f"--{arg}", required=True, type=kind, nargs=nargs)
    return parser


def _url_list(text: str) -> list[str]:
    """``--urls``: a JSON list of URLs (``[]`` for a generated dataset)."""
    try:
        urls = json.loads(text)
    except json.JSONDecodeError:
        urls = None
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise argparse.ArgumentTypeError(f"not a JSON list of URLs: {text!r}")
    return urls


def _spec(text: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--spec is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError("--spec must be a JSON object")
    return spec


def _check_spec(job: str, spec: dict) -> None:
    """Check ``spec`` against the config schema of this code's checkout (``config.check_spec``:
    a value of the wrong type or range, an unknown key, in one line). Where the code runs from
    an installed package without the workflow folder there is no schema to check against."""
    from stablenets.pipeline import config

    schema = Path(__file__).resolve().parents[3] / config.SCHEMA
    if schema.is_file():
        config.check_spec(job, spec, config.load_schema(schema))


def _missing_spec_key(err: Exception, spec: dict) -> str | None:
    """The key of a ``KeyError`` raised where the job reads its spec (the innermost frame holds
    the spec, or a part of it): a hand-written spec lacks it there, though a key of that name
    may be elsewhere (``pnp.seed`` beside ``seed``). ``None`` for any other error, which keeps
    its traceback (``--debug`` shows every one)."""
    if type(err) is not KeyError or not err.args or err.__traceback__ is None:
        return None
    parts, todo = set(), [spec]
    while todo:
        node = todo.pop()
        parts.add(id(node))
        todo += [v for v in node.values() if isinstance(v, dict)]
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    reading = any(id(v) in parts for v in tb.tb_frame.f_locals.values())
    return str(err.args[0]) if reading else None


def _job(name: str) -> Callable:
    module, function = _JOBS[name][:2]
    return getattr(importlib.import_module(module), function)


def _loaded(module: str, name: str) -> type | None:
    """``module.name`` if that module is loaded (a job that raised its error imported it)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


ATTEMPTS_LOG = "attempts.log"
"""In the ``--workdir`` of a job that has one (training, the evaluations, PnP, TV deblurring),
and as ``<dataset>.attempts.log`` in the data job's ``--cache`` (its downloads, hours at the
kB/s of BSDS500's host): every attempt's output, appended (Snakemake empties the rule's log
before each attempt, so a killed or timed-out attempt's last lines would be lost)."""


def _history_path(args: argparse.Namespace) -> Path | None:
    """Where the job of ``args`` appends every attempt's output (``ATTEMPTS_LOG``); ``None`` for
    the report jobs, which take seconds and keep nothing between attempts, and for a data job
    that downloads nothing (a generated stand-in makes no cache folder)."""
    if getattr(args, "workdir", None) is not None:
        return args.workdir / ATTEMPTS_LOG
    if getattr(args, "cache", None) is not None and args.urls:
        return args.cache / f"{args.out.stem}.{ATTEMPTS_LOG}"
    return None


class _Tee:
    """A text stream that also appends what it is given to ``history``; a history that cannot
    be written to any more (a full disk, or closed: a logging handler made during the job keeps
    its stream) is dropped, never failing the job. ``stream`` ``None``: Python's own for a
    closed standard stream (``>&-``), which takes every write and keeps nothing."""

    def __init__(self, stream: TextIO | None, history: TextIO) -> None:
        self.stream = stream
        self.history: TextIO | None = history

    def write(self, text: str) -> int:
        if self.history is not None and not _append(self.history, text):
            self.history = None
        return len(text) if self.stream is None else self.stream.write(text)

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


def _append(history: TextIO, text: str) -> bool:
    """Append ``text`` to ``history`` at once: whether it could."""
    try:
        history.write(text)
        history.flush()
    except (OSError, ValueError):  # ValueError: closed
        return False
    return True


def _attempts(path: Path | None) -> TextIO | None:
    """The attempts log at ``path`` (``_history_path``), opened to append; None where there is
    none or it cannot be written (the job then says so itself, as it writes beside it)."""
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a path's undecodable bytes (surrogates) written escaped: never an encoding error
        return open(path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 (closed in main)
    except OSError:
        return None


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    paths = _JOBS[args.job][2]
    history = _attempts(_history_path(args))
    streams = sys.stdout, sys.stderr
    for stream in streams:  # a path's undecodable bytes are printed escaped, as stderr does
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    if history is not None:  # what the job prints, its warnings and tracebacks included
        sys.stdout, sys.stderr = _Tee(sys.stdout, history), _Tee(sys.stderr, history)
    try:
        _log(f"stablenets {args.job}: started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
             f"host {socket.gethostname()}, pid {os.getpid()}")  # fmt: skip
        return _run(args, paths)
    except BaseException:  # its traceback goes to the rule's log after this: to history too
        if history is not None:
            _append(history, traceback.format_exc())
        raise
    finally:
        sys.stdout, sys.stderr = streams
        if history is not None:
            with contextlib.suppress(OSError):
                history.close()


def _run(args: argparse.Namespace, paths: list[str]) -> int:
    """Run the job of ``args``: 0, or one line on stderr and its exit status."""
    spec: dict = {}
    try:
        spec = _spec(args.spec)
        _check_spec(args.job, spec)
        _job(args.job)(spec, *(getattr(args, p) for p in paths), log=_log)
    except Exception as err:
        interrupted = _loaded("stablenets.interrupt", "Interrupted")
        if interrupted is not None and isinstance(err, interrupted):
            print(f"stablenets {args.job}: {err}", file=sys.stderr)
            return EXIT_INTERRUPTED
        memory = _loaded("stablenets.train.memory", "is_out_of_memory")
        if not args.debug and memory is not None and memory(err):
            line = _out_of_memory_line(args.job, spec, err)
            if args.job == "train":  # where the rerun resumes from, as the divergence errors say
                from stablenets.train.checkpoints import last_good

                line += f"; last good checkpoint {last_good(args.workdir / 'checkpoint.pt')}"
            print(line, file=sys.stderr)
            return 1
        missing = _missing_spec_key(err, spec)
        if not args.debug and missing is not None:
            print(
                f"stablenets {args.job}: error: --spec has no key {missing!r} where the job "
                "reads it",
                file=sys.stderr,
            )
            return 1
        clear = [_loaded(m, name) for m, names in _CLEAR_ERRORS.items() for name in names]
        # OSError: the machine said no (a read-only or full disk, a missing file, permissions)
        if args.debug or not isinstance(err, (ValueError, OSError, *filter(None, clear))):
            raise
        print(f"stablenets {args.job}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
