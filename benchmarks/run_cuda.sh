#!/usr/bin/env bash
# The CUDA benchmark behind benchmarks/results/cuda.csv, on a lent GPU, one stage or several
# per call (each has its own time limit; a failure does not stop the next one):
#   OUT=benchmarks/results bash benchmarks/run_cuda.sh                 # every stage (~10 min)
#   OUT=/tmp/o bash benchmarks/run_cuda.sh test_cuda graphs families-graphs   # these stages
# The logs go to $OUT/<stage>.log. Runs from a source checkout (PYTHONPATH=src) with whatever
# torch is installed. BENCH_EXTRA (e.g. "--quick --device cpu") is added to every bench stage.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
BENCH=(python -m stablenets.bench.training --inprocess --threads 8 --out "$OUT/cuda.csv" --append)
# shellcheck disable=SC2206  # BENCH_EXTRA splits into words on purpose
EXTRA=(${BENCH_EXTRA:-})
PAPER=(--models classifier,resnet,denoiser,dncnn --steps 20 --warmup 5 --repeats 3
    --big-steps 5 --big-repeats 2)
FAMILIES=(--models cpl,sll,aol,orthogonal,classifier --steps 10 --warmup 3 --repeats 2)
ALL=(test_cuda paper remat-off fast graphs graphs-fast graphs-denoiser families-small families-large families-graphs
    project)
stage() {  # stage NAME: run it with its limit, log, report the exit status
    local name=$1 limit cmd t0=$SECONDS
    case $name in
    test_cuda) limit=120 cmd=(python -m pytest tests/test_cuda.py -q -x -p no:cacheprovider) ;;
    paper) limit=150 cmd=("${BENCH[@]}" "${PAPER[@]}" "${EXTRA[@]}") ;;
    remat-off) limit=45 cmd=("${BENCH[@]}" --no-reference --remat off --models denoiser
        --warmup 5 --big-steps 5 --big-repeats 2 "${EXTRA[@]}") ;;
    fast) limit=90 cmd=("${BENCH[@]}" --no-reference --amp --channels-last --cudnn-benchmark
        "${PAPER[@]}" --repeats 2 "${EXTRA[@]}") ;;
    graphs) limit=60 cmd=("${BENCH[@]}" --cuda-graphs --models classifier,resnet --steps 20
        --warmup 5 --repeats 3 "${EXTRA[@]}") ;;
    graphs-fast) limit=45 cmd=("${BENCH[@]}" --cuda-graphs --amp --channels-last --cudnn-benchmark
        --models classifier,resnet --steps 20 --warmup 5 --repeats 3 "${EXTRA[@]}") ;;
    graphs-denoiser) limit=45 cmd=("${BENCH[@]}" --cuda-graphs --no-reference --models denoiser
        --warmup 3 --big-steps 5 --big-repeats 2 "${EXTRA[@]}") ;;
    families-small) limit=80 cmd=("${BENCH[@]}" "${FAMILIES[@]}" --widths 16,32 "${EXTRA[@]}") ;;
    families-large) limit=120 cmd=("${BENCH[@]}" "${FAMILIES[@]}" --widths 64,128 "${EXTRA[@]}") ;;
    families-graphs) limit=120 cmd=("${BENCH[@]}" --cuda-graphs --models cpl,sll,aol,classifier
        --widths 16,32,64,128 --steps 10 --warmup 3 --repeats 2 "${EXTRA[@]}") ;;
    project) limit=20 cmd=(python -m stablenets.bench.training --project "$OUT/cuda.csv" --config config.yaml) ;;
    *) echo "unknown stage $name; known: ${ALL[*]}" >&2; return 2 ;;
    esac
    timeout "$limit" "${cmd[@]}" >"$OUT/$name.log" 2>&1
    echo "== $name: rc $? in $((SECONDS - t0)) s"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
} >"$OUT/device.log" 2>&1
cat "$OUT/device.log"
for name in "${@:-${ALL[@]}}"; do stage "$name"; done
for f in "$OUT"/*.log; do echo "---- $f"; tail -n 8 "$f"; done
