#!/usr/bin/env bash
# The GPU runs behind benchmarks/results/<gpu>/: `bash benchmarks/gpu_session.sh kernels|report OUTDIR`.
# kernels: GPU kernel tests, the GEMM sweep and the per-op benchmarks; report: the encoder report (make bench);
# launch: GPU kernel tests, host cost per op call, and batch-1 latency against transformers and torch.compile;
# paths: the per-op breakdown of a ViT-L/14-336 forward, the patch embedding, whole-model path A/B, max-autotune;
# auto: the CUDA-graph and tower GPU tests, then batch 1 as loaded (automatic graphs) against explicit graphs, no
# graphs, transformers sdpa and torch.compile on the four reference models;
# suite: every single-GPU test, its test ids dealt round-robin over the visible GPUs, one pytest per GPU;
# followup: the attention sweep with padded head dims (pad_head) at batch 128, and batch 1 of the compiled model
# as a user compiles it (default and reduce-overhead modes) against automatic and explicit graphs, and the host
# profile of the text tower's automatic graphs (what their batch-1 replays cost over explicit graphs).
set -uo pipefail
stage=${1:?kernels, report, launch, paths, auto, suite or followup}
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
    for op in attention layernorm; do
        run "bench_$op" 100 python3 "benchmarks/bench_$op.py" --json "$out/bench_$op.json"
    done
    run bench_gemm 300 python3 -m benchmarks.bench_gemm --out "$out"
    tail -3 "$out/gpu_tests.log"
    ;;
report)
    run report 560 python3 -m benchmarks.report --out "$out"
    ;;
launch)
    run gpu_kernel_tests 300 python3 -m pytest tests/kernels -m gpu -q -x -p no:cacheprovider
    run bench_launch 60 python3 benchmarks/bench_launch.py --json "$out/bench_launch.json"
    run b1 220 python3 -m benchmarks.report --batch-sizes 1 --providers vitriton vitriton-graphs hf-sdpa \
        --skip-compile --out "$out/b1"
    tail -3 "$out/gpu_kernel_tests.log"
    tail -12 "$out/bench_launch.log"
    grep -A 12 "b1\|latency" "$out/b1.log" | tail -30
    ;;
paths)
    run profile_ops 200 python3 -m benchmarks.profile_ops --model clip-vit-l14-336 --batch 128 \
        --providers vitriton hf-compile
    run bench_patch 90 python3 -m benchmarks.bench_patch --json "$out/patch_embedding.json"
    run bench_paths 200 python3 -m benchmarks.bench_paths --batch-sizes 1 128
    run max_autotune 560 python3 -m benchmarks.report --models clip-vit-l14-336 siglip-so400m-384 \
        --batch-sizes 128 --providers vitriton hf-compile-max --out "$out/max_autotune"
    tail -40 "$out/profile_ops.log"
    ;;
auto)
    run towers_gpu 300 python3 -m pytest tests/test_graphs.py tests/test_patch.py tests/encoders -m gpu -q \
        -p no:cacheprovider
    run b1 500 python3 -m benchmarks.report --models clip-vit-l14-336 siglip-so400m-384 clip-vit-b16-224 \
        clip-text-l14 --batch-sizes 1 --providers vitriton vitriton-graphs vitriton-nographs hf-sdpa hf-compile \
        --seconds 0.2 --out "$out/b1"
    tail -3 "$out/towers_gpu.log"
    grep " b1 " "$out/b1.log"
    ;;
followup)
    run attention_sweep 300 python3 benchmarks/bench_attention.py --sweep --cases b128 --json "$out/attention_sweep.json"
    run b1_compile 280 python3 -m benchmarks.report --models clip-vit-l14-336 clip-text-l14 --batch-sizes 1 \
        --providers vitriton vitriton-graphs vitriton-compile vitriton-compile-ro hf-compile-ro --seconds 0.2 \
        --out "$out/b1_compile"
    run profile_host_auto 200 python3 benchmarks/profile_host.py --models clip-text-l14 --profile vitriton --top 25
    grep -A 12 "fastest configuration" "$out/attention_sweep.log"
    tail -8 "$out/profile_host_auto.log"
    grep " b1 " "$out/b1_compile.log"
    ;;
suite)
    gpus=$(nvidia-smi -L | grep -c '^GPU')
    python3 -m pytest tests -m gpu --ignore tests/parallel/test_nccl.py --co -q -p no:cacheprovider |
        grep '::' >"$out/suite_ids.txt"
    for ((i = 0; i < gpus; i++)); do
        awk -v n="$gpus" -v i="$i" 'NR % n == i' "$out/suite_ids.txt" >"$out/suite_ids_$i.txt"
        CUDA_VISIBLE_DEVICES=$i run "suite_gpu$i" 560 python3 -m pytest -m gpu -q -p no:cacheprovider \
            $(cat "$out/suite_ids_$i.txt") &
    done
    wait
    echo "$(wc -l <"$out/suite_ids.txt") test ids over $gpus GPUs"
    for ((i = 0; i < gpus; i++)); do tail -n 1 "$out/suite_gpu$i.log"; done
    ;;
esac
