#!/usr/bin/env bash
# The CUDA benchmark behind benchmarks/results/cuda.csv: one call on a lent GPU, under 10 minutes
# (the stages' limits add up to 9.3).
#   OUT=benchmarks/results bash benchmarks/run_cuda.sh
# Every stage has its own time limit and a failure does not stop the next one; the logs go to
# $OUT/*.log. Runs from a source checkout (PYTHONPATH=src) with whatever torch is installed.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# shellcheck disable=SC2206  # BENCH_EXTRA (e.g. "--quick --device cpu" for a dry run) splits
BENCH=(python -m stablenets.bench --inprocess --threads 8 --out "$OUT/cuda.csv")
EXTRA=(${BENCH_EXTRA:-})
stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log, report the exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: rc $? in $((SECONDS - t0)) s"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
} >"$OUT/device.log" 2>&1
cat "$OUT/device.log"
stage test_cuda 75 python -m pytest tests/test_cuda.py -q -x -p no:cacheprovider
stage paper 150 "${BENCH[@]}" --models classifier,resnet,denoiser,dncnn \
    --steps 20 --warmup 5 --repeats 3 --big-steps 5 --big-repeats 2 "${EXTRA[@]}"
stage remat-off 45 "${BENCH[@]}" --append --no-reference --remat off --models denoiser --warmup 5 \
    --big-steps 5 --big-repeats 2 "${EXTRA[@]}"
stage fast 90 "${BENCH[@]}" --append --no-reference --amp --channels-last --cudnn-benchmark \
    --models classifier,resnet,denoiser,dncnn \
    --steps 20 --warmup 5 --repeats 2 --big-steps 5 --big-repeats 2 "${EXTRA[@]}"
stage families-small 80 "${BENCH[@]}" --append --models cpl,sll,aol,orthogonal,classifier \
    --widths 16,32 --steps 10 --warmup 3 --repeats 2 "${EXTRA[@]}"
stage families-large 120 "${BENCH[@]}" --append --models cpl,sll,aol,orthogonal,classifier \
    --widths 64,128 --steps 10 --warmup 3 --repeats 2 "${EXTRA[@]}"
stage project 20 python -m stablenets.bench --project "$OUT/cuda.csv" --config config.yaml
for f in "$OUT"/*.log; do echo "---- $f"; tail -n 6 "$f"; done
