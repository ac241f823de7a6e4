#!/usr/bin/env bash
# `make rehearsal` (README "Rehearsal scale") on a lent GPU, in one call of the device tool
# (benchmarks/README.md "Rehearsal on a lent GPU"). Here first, once: `make device-kit` (.gpu/:
# the Snakemake, jsonschema and pyautoattack that the device's python3 lacks). Then the call:
#   run  command: bash benchmarks/run_device_rehearsal.sh 600   carry: [".gpu"]   timeout_s: 600
# The argument is the seconds the whole call may take (default 600, a call's limit): `make
# rehearsal` gets what is left of them less RESERVE_S (default 90: 15 s for `timeout -k` to end it,
# at most PARTIAL_S, default 45, for the partial cost, and 30 s of margin for the copies at the
# end), and is stopped by `timeout` (its process group: Snakemake and its jobs) when that runs out.
#
# Everything goes to $OUT as it happens. At most 8 files come back, 2 folders down at most, so
# the many small files travel as one tarball:
#   device.log        GPU, python, torch, the kit's install, this script's steps
#   make.log          the output of `make rehearsal` (Snakemake's and the jobs'), streamed
#   cost.csv cost.md summary.md   results/rehearsal/'s, when the run got that far
#   cost-partial.csv cost-partial.md cost-partial.provenance.json   when it did not: the cost
#                     of the jobs that finished (below), written straight into $OUT
#   pass-times.csv    seconds per image-pass of the paper classifier at batches 500, 2000, 8000
#                     (PASS_BATCHES), float32 and bf16, eager and from CUDA graphs, when time
#                     is left after the rehearsal (and the attack-graph tests, in device.log,
#                     where the device's python has pytest: the kit does not bring it)
#   rehearsal.tar.gz  logs/rehearsal/, benchmarks/rehearsal/ (each job's wall seconds and peak
#                     RSS) and results/rehearsal/ less data, models and checkpoints; refreshed
#                     every minute (logs and benchmarks alone if that is over 15 MB)
# A run cut short: Snakemake writes a job's benchmark TSV when the job ends, so the TSVs under
# benchmarks/rehearsal/ are the finished jobs. The script then runs the `cost` rule's function on
# them (write_cost, the lines under "partial cost" below: they need the run's results/ and
# benchmarks/, so run them where the run ran); it projects the paper DAG once every rule has a
# finished job, else it writes the measured jobs alone. A second call on the still-warm machine
# resumes: its ignored files (results/, logs/, benchmarks/rehearsal/, .snakemake/) stay between
# calls, and Snakemake reruns only what is missing.
#
# Environment: OUT (required); DEVICE_PYTHON, the interpreter (default python3); KIT, the kit
# folder (default .gpu: whl/ installed into SITE, default /tmp/site, and site/ used as is), or
# `none`: install nothing and take every package from DEVICE_PYTHON's own site-packages (the
# local test); PYTHONPATH, if set, is searched after src/ and the kit. The rules run
# `python -m stablenets ...`: a throwaway folder whose bin/ holds `python` (a script running
# DEVICE_PYTHON) and `snakemake` stands in for the venv (`make rehearsal VENV=<it> STAMP=`).
# Checked on the CPU with a tiny config/rehearsal.yaml (tests/test_rehearsal.py's TINY), in a
# clone:  DEVICE_PYTHON=$PWD/.venv/bin/python KIT=none OUT=/tmp/kit_out \
#         bash benchmarks/run_device_rehearsal.sh
set -u
LIMIT=${1:-600}
RESERVE_S=${RESERVE_S:-90}
PARTIAL_S=${PARTIAL_S:-45}
: "${OUT:?OUT: the folder that comes back}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && export OUT  # (the partial cost writes there)
PY=$(command -v "${DEVICE_PYTHON:-python3}") || { echo "no ${DEVICE_PYTHON:-python3}" >&2; exit 2; }
case $PY in /*) ;; *) PY=$PWD/$PY ;; esac
KIT=${KIT:-.gpu}
SITE=${SITE:-/tmp/site}
case $KIT in none | /*) ;; *) KIT=$PWD/$KIT ;; esac
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
LOG=$OUT/device.log
log() { echo "[$(date +%T) +$SECONDS s] $*" | tee -a "$LOG"; }

log "device; limit ${LIMIT} s, reserve ${RESERVE_S} s; python $PY; kit $KIT"
{ if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else echo "no nvidia-smi"; fi
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__,
      torch.version.cuda, 'cuda available:', torch.cuda.is_available())"
  for tool in make timeout tar find; do command -v "$tool" >/dev/null || echo "no $tool"; done
} >>"$LOG" 2>&1

# The kit: wheels into SITE (no index, no dependencies: the kit is the closure), pyautoattack as is.
if [ "$KIT" = none ]; then
    KITPATH=  # the interpreter's own packages (the stand-in below keeps its venv)
else
    log "installing the kit into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$KIT"/whl/*.whl >>"$LOG" 2>&1 || { log "kit install failed"; exit 1; }
    KITPATH=$KIT/site:$SITE
fi
export PYTHONPATH=$ROOT/src${KITPATH:+:$KITPATH}${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 GIT_PYTHON_REFRESH=quiet MPLBACKEND=Agg

# The stand-in venv for make: bin/python runs DEVICE_PYTHON, bin/snakemake runs it with -m
# snakemake. Scripts, not links: a link to a venv's interpreter (the device's python3 is
# /opt/torch/.venv/bin/python3) starts the base interpreter without the venv's packages, torch
# among them. The jobs run the `python` beside sys.executable: DEVICE_PYTHON's.
VENV=$(mktemp -d /tmp/rehearsal-venv.XXXXXX)
SNAP=$(mktemp /tmp/rehearsal-snap.XXXXXX)
trap 'rm -rf "$VENV" "$SNAP" "$SNAP.last"' EXIT
mkdir "$VENV/bin"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" >"$VENV/bin/python"
printf '#!/bin/sh\nexec "%s" -m snakemake "$@"\n' "$PY" >"$VENV/bin/snakemake"
chmod +x "$VENV/bin/python" "$VENV/bin/snakemake"
export PATH=$VENV/bin:$PATH
# What the rehearsal needs (pytest is not in the kit: only the optional graph tests below use it)
{ "$VENV/bin/snakemake" --version &&
  python -c "import stablenets, jsonschema, pyautoattack, torch; print('imports ok')"
} >>"$LOG" 2>&1 || { log "the kit does not import"; tail -n 20 "$LOG"; exit 1; }

snapshot() {  # snapshot TMP: the small files of the run so far, into $OUT/rehearsal.tar.gz
    local tmp=$1 dirs=() d
    for d in logs/rehearsal benchmarks/rehearsal results/rehearsal; do
        [ -d "$d" ] && dirs+=("$d")
    done
    [ ${#dirs[@]} -gt 0 ] || return 0
    tar czf "$tmp" --exclude=results/rehearsal/data --exclude=results/rehearsal/models \
        --exclude=results/rehearsal/checkpoints "${dirs[@]}" 2>/dev/null
    if [ "$(stat -c %s "$tmp")" -gt 15000000 ]; then  # a file comes back up to 16 MiB
        tar czf "$tmp" logs/rehearsal benchmarks/rehearsal 2>/dev/null
    fi
    cat "$tmp" >"$OUT/rehearsal.tar.gz"  # not cp: mktemp's file is private (0600)
}
reap() {  # jobs of this checkout that outlived a cut run: an evaluation given SIGTERM saves its
    # progress when the batch it is attacking ends, which can take many minutes (a rerun
    # resumes without it); left running, it would share the device with the timings below.
    # Any interpreter's (the device's is python3, behind the stand-in); the cwd: this checkout's
    local pid n=0
    for pid in $(pgrep -f -- '-m stablenets( |$)' || true); do
        [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$ROOT" ] || continue
        kill -KILL "$pid" 2>/dev/null && n=$((n + 1))
    done
    [ "$n" -eq 0 ] || log "killed $n job(s) of the cut run still running"
}
snapshots() {  # a snapshot every minute until killed
    local nap
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    while :; do sleep 60 & nap=$!; wait "$nap"; snapshot "$SNAP"; done
}

BUDGET=$((LIMIT - SECONDS - RESERVE_S))
if [ "$BUDGET" -lt 10 ]; then
    log "no time left for make rehearsal ($BUDGET s)"
    RC=124
else
    snapshots >/dev/null 2>&1 &
    SNAPPER=$!
    log "make rehearsal, at most $BUDGET s (make.log)"
    if command -v make >/dev/null; then
        REHEARSE=(make rehearsal VENV="$VENV" STAMP=)
    else  # no make there: the Makefile's rehearsal recipe, its two lines
        PROFILE=(--workflow-profile workflow/profiles/rehearsal)
        REHEARSE=(sh -c 'python -m stablenets.pipeline.locks "$@" && snakemake all_with_cost "$@"'
            sh "${PROFILE[@]}")
    fi
    env -u MAKEFLAGS -u MAKELEVEL -u MFLAGS timeout -k 15 "$BUDGET" \
        "${REHEARSE[@]}" >"$OUT/make.log" 2>&1
    RC=$?
    log "make rehearsal: rc $RC$([ $RC -eq 124 ] && echo ": cut at $BUDGET s")"
    reap
    kill "$SNAPPER" 2>/dev/null
    wait "$SNAPPER" 2>/dev/null
fi

for f in cost.csv cost.md summary.md; do
    [ -f "results/rehearsal/$f" ] && cp "results/rehearsal/$f" "$OUT/"
done
T=$((LIMIT - SECONDS - 10))  # the partial cost's time: PARTIAL_S, less if the call ends before
T=$((T < PARTIAL_S ? T : PARTIAL_S))
if [ ! -f results/rehearsal/cost.csv ] && [ -d benchmarks/rehearsal ] && [ "$T" -ge 5 ]; then
    log "partial cost of the finished jobs, at most $T s ($OUT/cost-partial.csv)"
    # partial cost: the `cost` rule's function on the benchmark TSVs that exist, into $OUT at
    # once (a call cut after it still brings it back)
    timeout -k 5 "$T" python - >>"$LOG" 2>&1 <<'EOF'
import os
from pathlib import Path

import pandas as pd

from stablenets.bench.cost import benchmark_files, dag_jobs, measure, write_cost
from stablenets.pipeline.config import load_config

schema = "workflow/schemas/config.schema.yaml"
config = load_config(["config.yaml", "config/rehearsal.yaml"], Path(schema))
results, bench = Path("results/rehearsal"), Path("benchmarks/rehearsal")
done = [Path(p) for p in benchmark_files(config, lambda p: f"{bench}/{p}") if Path(p).is_file()]
print(f"{len(done)} of {len(dag_jobs(config))} jobs finished")
spec = {"config": config, "results": str(results), "benchmarks": str(bench), "schema": schema}
out = Path(os.environ["OUT"]) / "cost-partial.csv"
try:
    write_cost(spec, done, out)
except ValueError as err:  # a rule with no finished job: nothing to project its paper jobs from
    print(err, "- writing the measured jobs alone")
    jobs = {bench / f"{job.rule}/{job.stem}.tsv": job for job in dag_jobs(config)}
    rows = []
    for tsv in done:
        m = measure(jobs[tsv], tsv, results)
        rows.append({"job": m.job.label(), "wall_s": m.wall_s, "max_rss_mb": m.max_rss_mb,
                     "unit": m.unit, "units": m.units, "variable_s": m.variable_s,
                     "fixed_s": m.fixed_s, **m.stats})
    pd.DataFrame(rows).to_csv(out, index=False)
EOF
    log "partial cost: rc $?"
fi

# Issue 19's levers, with what time is left. First whether the attack graphs replay the eager
# passes, whether margin-loss training steps replay the eager ones and whether the activation
# cost behind max_substeps: auto is what the allocator holds (tests/test_cuda.py, 120 s at
# most), then seconds per image-pass of the rehearsal's paper classifier (its evaluation
# sub-steps) at larger batches, under bf16 and replayed from CUDA graphs (pass-times.csv).
LEFT=$((LIMIT - SECONDS - 25))
if [ "$LEFT" -ge 60 ] && ! python -c "import pytest" >/dev/null 2>&1; then
    log "no pytest: graph tests skipped"
elif [ "$LEFT" -ge 60 ]; then
    T=$((LEFT < 120 ? LEFT : 120))
    log "graph tests on the device, at most $T s"
    timeout -k 5 "$T" python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        -k "attack_graphs or graphed_pgd or pass_times_on_the_device or (eager_training_trains and margin) or activation_cost or make_way" \
        >>"$LOG" 2>&1
    log "graph tests: rc $?"
fi
MODEL=results/rehearsal/models/classification/nonexpansive/seed0/model.pt
LEFT=$((LIMIT - SECONDS - 25))
if [ -f "$MODEL" ] && [ "$LEFT" -ge 40 ]; then
    log "pass times of the paper classifier, at most $LEFT s (pass-times.csv)"
    timeout -k 5 "$LEFT" python -m stablenets.bench.evaluation --config config.yaml \
        config/rehearsal.yaml --variant nonexpansive --pass-times "${PASS_BATCHES:-500,2000,8000}" \
        --out "$OUT/pass-times.csv" >>"$LOG" 2>&1
    log "pass times: rc $?"
fi
snapshot "$SNAP.last"

for f in $(find logs/rehearsal -name '*.log' 2>/dev/null | sort); do
    echo "---- $f"
    tail -n 3 "$f"
done
echo "---- make.log"
tail -n 25 "$OUT/make.log" 2>/dev/null | cut -c1-240
echo "---- device.log"
tail -n 15 "$LOG"
grep -h '^total' "$OUT"/cost*.csv 2>/dev/null
ls -l "$OUT"
exit "$RC"
