"""Command line: ``python -m stablenets <job> --spec JSON ...``, one subcommand per rule kind.

Every job prints one clear line and exits non-zero on bad input instead of a deep traceback
(``--debug`` shows the traceback). A training job interrupted by SIGUSR1/SIGTERM exits with
code 75 (temporary failure) after writing its checkpoint; rerunning resumes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import experiments
from .data import DataError
from .models import CheckpointError
from .robustness import InvariantError
from .training import DivergenceError, Interrupted

EXIT_INTERRUPTED = 75

_JOBS = {
    "prepare-data": (experiments.prepare_data, ["out"]),
    "train": (experiments.train_model, ["data", "model", "log", "workdir"]),
    "evaluate-classifier": (experiments.evaluate_classifier, ["model", "data", "out"]),
    "evaluate-denoiser": (experiments.evaluate_denoiser, ["model", "data", "out"]),
    "evaluate-tv": (experiments.evaluate_tv_denoising, ["data", "out"]),
    "pnp": (experiments.run_pnp, ["model", "data", "out"]),
    "tv-deblur": (experiments.run_tv_deblur, ["data", "out"]),
    "table": (experiments.make_table, ["inputs", "out"]),
    "figure": (experiments.make_figure, ["inputs", "out"]),
    "summary": (experiments.write_summary, ["inputs", "out"]),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablenets", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="job", required=True)
    for name, (fn, paths) in _JOBS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0])
        p.add_argument("--spec", required=True, help="job specification as JSON")
        for arg in paths:
            nargs = "+" if arg == "inputs" else None
            p.add_argument(f"--{arg}", required=True, type=Path, nargs=nargs)
    return parser


def _spec(text: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--spec is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError("--spec must be a JSON object")
    return spec


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fn, paths = _JOBS[args.job]
    try:
        fn(_spec(args.spec), *(getattr(args, p) for p in paths), log=_log)
    except Interrupted as err:
        print(f"stablenets {args.job}: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (DataError, CheckpointError, DivergenceError, InvariantError, ValueError) as err:
        if args.debug:
            raise
        print(f"stablenets {args.job}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
