#!/usr/bin/env bash
# The GPU runs behind benchmarks/results/<gpu>/: `bash benchmarks/gpu_session.sh kernels|report OUTDIR`.
# kernels: GPU kernel tests, the GEMM sweep and the per-op benchmarks; report: the encoder report (make bench).
set -uo pipefail
stage=${1:?kernels or report}
out=${2:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # name, timeout seconds, command...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "$name: exit $?"
}
case $stage in
kernels)
    run gpu_tests 300 python3 -m pytest tests/kernels tests/test_graphs.py -m "gpu and not slow" -q -p no:cacheprovider
    run sweep_matmul 170 python3 benchmarks/sweep_matmul.py --json "$out/sweep_matmul.json"
    for op in attention layernorm linear qkv; do
        run "bench_$op" 100 python3 "benchmarks/bench_$op.py" --json "$out/bench_$op.json"
    done
    tail -3 "$out/gpu_tests.log"
    ;;
report)
    run report 560 python3 -m benchmarks.report --out "$out"
    ;;
esac
