#!/usr/bin/env bash
# The GPU runs behind benchmarks/results/<gpu>/: `bash benchmarks/gpu_session.sh kernels|report OUTDIR`.
# kernels: GPU kernel tests, the GEMM sweep and the per-op benchmarks; report: the encoder report (make bench);
# launch: GPU kernel tests, host cost per op call, and batch-1 latency against transformers and torch.compile;
# paths: the per-op breakdown of a ViT-L/14-336 forward, the patch embedding, whole-model path A/B, max-autotune;
# auto: the CUDA-graph and tower GPU tests, then batch 1 as loaded (automatic graphs) against explicit graphs, no
# graphs, transformers sdpa and torch.compile on the four reference models;
# suite: every single-GPU test, its test ids dealt round-robin over the visible GPUs, one pytest per GPU;
# gemm_ws: the linear kernels' GPU tests, every encoder GEMM at batch 128 against cuBLAS (the warp-specialised
# kernel among the candidates), and attention against cuDNN;
# compile: the compiled models' GPU tests, host cost per op call, and batch 1 of the four reference models compiled
# as loaded (default and reduce-overhead modes) against the plain call, explicit graphs, transformers sdpa and
# transformers compiled with reduce-overhead.
# epilogue: the linear kernels' GPU tests on the persistent path, and fc1 (the activation epilogue) of every encoder
# at batch 8 and 128 against cuBLAS;
# linear_all: every linear and launch-plan test on the GPU (the unmarked ones take the GPU there too), then the
# persistent kernel's config sweep at every fc1 shape;
# forms: the linear kernels' GPU tests, full-size bf16 parity of every reference model, and fc1 and qkv of every
# encoder at batch 1, 8 and 128 against cuBLAS, cuBLASLt's GELU epilogue and the former bf16 activation form;
# b128: batch-128 throughput of the three reference vision towers against transformers sdpa and both
# torch.compile modes, with the (delta, residual) pair path beside the single-rank stream (A/B), then batch 1 of the
# four reference models, both paths, against transformers compiled with reduce-overhead;
# stream: the GPU tests of the LayerNorm kernel, the encoders, graphs and patch, then batch 128 of ViT-L/14-336 and
# so400m on the single-rank stream and on the pair path (A/B) against transformers compiled (default mode);
# profile: the per-op breakdown of a ViT-L/14-336 batch-128 forward on the stream, on the pair path and compiled, and
# so400m's;
# diagnose: batch 1 of the four reference models plain, on the pair path, compiled and with explicit graphs
# (interleaved rounds), then batch 1's host profile of the plain and the compiled call (ViT-L/14-336, text L/14);
# verify: the GPU tests of the encoders, graphs and patch;
# small_m: whole-model A/B of the path choices at batch 1 and 8 (automatic graphs), cuBLAS into the packed q/k/v
# layout at every M among them.
set -uo pipefail
stage=${1:?kernels, report, launch, paths, auto, suite, gemm_ws, compile, epilogue, linear_all, forms, b128, stream, profile, diagnose, verify or small_m}
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
gemm_ws)
    run gpu_tests_linear 300 python3 -m pytest tests/kernels/test_linear.py tests/kernels/test_launch.py -m gpu -q \
        -p no:cacheprovider
    run gemm_b128 240 python3 -m benchmarks.bench_gemm --models clip-vit-l14-336 siglip-so400m-384 clip-vit-b16-224 \
        --batch-sizes 128 --layers fc1 fc2 out_proj --out "$out"
    run attention 60 python3 benchmarks/bench_attention.py --json "$out/attention.json"
    tail -3 "$out/gpu_tests_linear.log"
    grep -E "fc1|fc2|out_proj" "$out/gemm_b128.log" | head -60
    grep -A 12 "^case" "$out/attention.log"
    ;;
epilogue)
    run gpu_tests_linear 300 python3 -m pytest tests/kernels/test_linear.py tests/kernels/test_launch.py -m gpu \
        -q -p no:cacheprovider
    run tests_launch 60 python3 -m pytest tests/kernels/test_launch.py -q -p no:cacheprovider
    run bench_launch 60 python3 benchmarks/bench_launch.py --json "$out/bench_launch.json"
    run gemm_fc1 240 python3 -m benchmarks.bench_gemm --models clip-vit-b16-224 clip-vit-l14-336 siglip-so400m-384 \
        clip-vit-h14-224 clip-vit-bigg14-224 --batch-sizes ${BATCHES:-1 8} --layers fc1 --out "$out"
    tail -2 "$out/gpu_tests_linear.log" "$out/tests_launch.log"
    tail -14 "$out/bench_launch.log"
    grep -E "fc1|cublas  |vitriton  " "$out/gemm_fc1.log" | head -80
    ;;
linear_all)
    run tests_linear_all 400 python3 -m pytest tests/kernels/test_linear.py tests/kernels/test_launch.py -q \
        -p no:cacheprovider
    run sweep_persistent 200 python3 benchmarks/sweep_matmul.py --path persistent --case fc1 \
        --json "$out/sweep_persistent.json"
    tail -2 "$out/tests_linear_all.log"
    grep -E "fc1" "$out/sweep_persistent.log" | tail -80
    ;;
forms)
    run gpu_tests_linear 270 python3 -m pytest tests/kernels/test_linear.py -m gpu -q -p no:cacheprovider
    run gpu_parity 90 python3 -m pytest tests/encoders/test_gpu_parity.py -k bf16 -q -p no:cacheprovider -rA
    run gemm 220 python3 -m benchmarks.bench_gemm --batch-sizes 1 8 128 --layers qkv fc1 \
        --candidates cublas-packed-qkv cublaslt-gelu vitriton vitriton-bf16x2 --out "$out"
    tail -2 "$out/gpu_tests_linear.log" "$out/gpu_parity.log"
    grep -E "b1 |b8 |b128 |cublas|vitriton" "$out/gemm.log" | cut -c1-140 | head -120
    ;;
b128)
    run b128 400 python3 -m benchmarks.report --models clip-vit-l14-336 siglip-so400m-384 clip-vit-b16-224 \
        --batch-sizes 128 --providers vitriton vitriton-pair vitriton-graphs hf-sdpa hf-compile hf-compile-ro \
        --out "$out/b128"
    run b1 170 python3 -m benchmarks.report --models clip-vit-l14-336 siglip-so400m-384 clip-vit-b16-224 \
        clip-text-l14 --batch-sizes 1 --providers vitriton vitriton-pair hf-compile-ro --baseline hf-compile-ro \
        --seconds 0.2 --out "$out/b1"
    grep -E " b128 |ratio" "$out/b128.log" | head -30
    grep " b1 " "$out/b1.log"
    ;;
stream)
    run gpu_tests 260 python3 -m pytest tests/kernels/test_layernorm.py tests/encoders tests/test_graphs.py \
        tests/test_patch.py -m gpu -q -p no:cacheprovider
    run b128_ab 200 python3 -m benchmarks.report --models clip-vit-l14-336 siglip-so400m-384 --batch-sizes 128 \
        --providers vitriton vitriton-pair hf-compile --seconds 0.3 --out "$out/b128_ab"
    tail -3 "$out/gpu_tests.log"
    grep -E " b128 |ratio" "$out/b128_ab.log" | head -20
    ;;
profile)
    run profile_ops 170 python3 -m benchmarks.profile_ops --model clip-vit-l14-336 --batch 128 \
        --providers vitriton vitriton-pair hf-compile
    run profile_ops_so400m 100 python3 -m benchmarks.profile_ops --model siglip-so400m-384 --batch 128 \
        --providers vitriton
    tail -45 "$out/profile_ops.log"
    tail -20 "$out/profile_ops_so400m.log"
    ;;
diagnose)
    run b1_ab 200 python3 -m benchmarks.bench_ab --models clip-vit-l14-336 clip-text-l14 siglip-so400m-384 \
        clip-vit-b16-224 --providers vitriton vitriton-pair vitriton-compile vitriton-graphs
    run profile_host 170 python3 benchmarks/profile_host.py --models clip-vit-l14-336 clip-text-l14 \
        --profile vitriton vitriton-compile --calls 50 --top 30
    grep " b1 " "$out/b1_ab.log"
    grep -E "wall|^[a-z].*(vitriton|hf-sdpa) " "$out/profile_host.log" | tail -10
    ;;
verify)
    run gpu_tests 220 python3 -m pytest tests/encoders tests/test_graphs.py tests/test_patch.py -m gpu -q \
        -p no:cacheprovider
    tail -n 3 "$out/gpu_tests.log"
    ;;
small_m)
    run paths_small 400 python3 -m benchmarks.bench_paths --models clip-vit-l14-336 siglip-so400m-384 \
        clip-vit-b16-224 clip-vit-h14-224 clip-text-l14 --batch-sizes 1 8
    cat "$out/paths_small.log"
    ;;
compile)
    run gpu_tests_compile 200 python3 -m pytest tests/encoders/test_compile.py -m gpu -q -p no:cacheprovider
    run bench_launch 60 python3 benchmarks/bench_launch.py --json "$out/bench_launch.json"
    run compile_b1 440 python3 -m benchmarks.report --models clip-vit-l14-336 siglip-so400m-384 clip-vit-b16-224 \
        clip-text-l14 --batch-sizes 1 --providers vitriton vitriton-graphs vitriton-compile vitriton-compile-ro \
        hf-sdpa hf-compile-ro --baseline hf-compile-ro --seconds 0.2 --out "$out/compile_b1"
    tail -3 "$out/gpu_tests_compile.log"
    tail -12 "$out/bench_launch.log"
    grep " b1 " "$out/compile_b1.log"
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
