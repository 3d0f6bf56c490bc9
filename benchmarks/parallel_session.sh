#!/usr/bin/env bash
# NCCL tests of the parallel layer on one multi-GPU host, then the TP/DP benchmark table:
# `bash benchmarks/parallel_session.sh OUTDIR`.
# Writes OUTDIR/topo.txt (nvidia-smi topo -m), versions.txt, the pytest log of the 2-rank run and, with 4 or more
# GPUs, of the 4-rank run (nccl_ranks<N>.log; each worker's JSON lines and summary.txt under tmp_ranks<N>/), the
# all-reduce timings (allreduce_ranks<N>.log, NCCL against symmetric memory), then
# `make bench-parallel` over min(4, GPUs) ranks (report_parallel.log; JSON, CSV, PNG under report/), and prints a
# summary last.
set -uo pipefail
out=${1:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# NVLink multicast (NVLS) stays off in every multi-GPU run of this project.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
status=()
run() {  # name, timeout seconds, command...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" >"$out/$name" 2>&1
    local code=$?
    status+=("$name: exit $code")
    return $code
}
run topo.txt 30 nvidia-smi topo -m
run versions.txt 60 python3 -c "import torch, triton, transformers
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', '.'.join(map(str, torch.cuda.nccl.version())))
print('triton', triton.__version__, 'transformers', transformers.__version__)
print(*[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], sep='\n')"
gpus=$(timeout 30 nvidia-smi -L 2>/dev/null | grep -c '^GPU')
for ranks in 2 4; do
    if [ "$gpus" -ge "$ranks" ]; then
        tests="ranks$ranks"
        [ "$ranks" = 4 ] && tests="$tests or two_groups"  # the symmetric-memory test of two groups needs 4 GPUs
        run "nccl_ranks$ranks.log" 480 python3 -m pytest tests/parallel/test_nccl.py -m gpu -q -rA -p no:cacheprovider \
            -k "$tests" --basetemp "$out/tmp_ranks$ranks"
    else
        status+=("nccl_ranks$ranks.log: skipped, $gpus GPUs")
    fi
done

for ranks in 2 4; do
    if [ "$gpus" -ge "$ranks" ]; then
        run "allreduce_ranks$ranks.log" 120 python3 -m torch.distributed.run --standalone --nproc-per-node "$ranks" \
            -m benchmarks.bench_allreduce
    fi
done

if [ "$gpus" -ge 2 ]; then
    run report_parallel.log 3000 make bench-parallel PYTHON=python3 NPROC=$((gpus < 4 ? gpus : 4)) \
        BENCH_ARGS="--out $out/report"
else
    status+=("report_parallel.log: skipped, $gpus GPUs")
fi

echo "== $gpus GPUs"
head -n 3 "$out/versions.txt"
for ranks in 2 4; do
    summary=$(find "$out/tmp_ranks$ranks" -name summary.txt 2>/dev/null | head -n 1)
    [ -n "$summary" ] && echo "== $ranks ranks" && cat "$summary"
    [ -f "$out/nccl_ranks$ranks.log" ] && tail -n 1 "$out/nccl_ranks$ranks.log"
done
[ -f "$out/report_parallel.log" ] && grep -A 12 "speedup over TP1" "$out/report_parallel.log"
printf '%s\n' "${status[@]}"
