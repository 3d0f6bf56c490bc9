"""Fused linear (bias + activation in the epilogue) against cuBLAS ``F.linear`` plus the same ops eagerly.

    python3 benchmarks/bench_linear.py [--dtype bf16] [--json PATH]
    pytest benchmarks/bench_linear.py --benchmark-only

Columns: ours = ``linear_triton`` (our GEMM, also where the encoders call cuBLAS: the epilogue-free fc2 rows
show why they do); eager = ``linear_reference`` (F.linear with bias, then the activation); gemm = F.linear
with bias alone, the cuBLAS ceiling the fused op is held against.
speedup = eager / ours. TFLOP/s counts 2 * M * N * K. Without CUDA it is a smoke run at a tiny shape
through the Triton interpreter: the timings then mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import gpu_name, median_ms, run_benchmark, write_rows  # noqa: E402
from vitriton.kernels._matmul import last_config  # noqa: E402
from vitriton.kernels.linear import _linear_kernel, linear_reference, linear_triton  # noqa: E402

ON_GPU = torch.cuda.is_available()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (name, M, K, N, activation): the encoders' MLP GEMMs at batch 128 and 1.
GPU_CASES = [
    ("L/14-336 fc1 b128", 128 * 577, 1024, 4096, "quick_gelu"),
    ("L/14-336 fc2 b128", 128 * 577, 4096, 1024, None),
    ("so400m fc1 b128", 128 * 729, 1152, 4304, "gelu_pytorch_tanh"),
    ("so400m fc2 b128", 128 * 729, 4304, 1152, None),
    ("B/16 fc1 b128", 128 * 197, 768, 3072, "quick_gelu"),
    ("B/16 fc2 b128", 128 * 197, 3072, 768, None),
    ("L/14-336 fc1 b1", 577, 1024, 4096, "quick_gelu"),
    ("L/14-336 fc2 b1", 577, 4096, 1024, None),
    ("so400m fc1 b1", 729, 1152, 4304, "gelu_pytorch_tanh"),
    ("so400m fc2 b1", 729, 4304, 1152, None),
]
CPU_CASES = [("cpu smoke", 64, 72, 96, "quick_gelu")]
CASES = GPU_CASES if ON_GPU else CPU_CASES


def make_operands(m: int, k: int, n: int, dtype: torch.dtype):
    device = "cuda" if ON_GPU else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, generator=generator, device=device).to(dtype)
    w = (torch.randn(n, k, generator=generator, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, generator=generator, device=device).to(dtype)
    return x, w, b


def implementations(case, dtype: torch.dtype) -> dict[str, object]:
    _, m, k, n, activation = case
    x, w, b = make_operands(m, k, n, dtype)
    return {
        "ours": lambda: linear_triton(x, w, b, activation),
        "eager": lambda: linear_reference(x, w, b, activation),
        "gemm": lambda: F.linear(x, w, b),
    }


def measure(case, dtype: torch.dtype) -> dict[str, object]:
    name, m, k, n, activation = case
    reps = 30 if ON_GPU else 2
    fns = implementations(case, dtype)
    times = {impl: median_ms(fn, warmup=3 if ON_GPU else 1, reps=reps) for impl, fn in fns.items()}
    fns["ours"]()
    config = last_config(_linear_kernel)
    flop = 2 * m * n * k
    return {
        "case": name,
        "M": m,
        "N": n,
        "K": k,
        "activation": activation or "none",
        "dtype": str(dtype).removeprefix("torch."),
        "config": config,
        "ours_ms": times["ours"],
        "eager_ms": times["eager"],
        "gemm_ms": times["gemm"],
        "speedup_vs_eager": times["eager"] / times["ours"],
        "ratio_vs_gemm": times["gemm"] / times["ours"],
        "ours_tflops": flop / times["ours"] * 1e-9,
        "gemm_tflops": flop / times["gemm"] * 1e-9,
    }


def print_table(rows: list[dict[str, object]]) -> None:
    header = (
        f"{'case':<20} {'M':>6} {'N':>5} {'K':>5} {'act':<17} {'dtype':<8} {'ours ms':>8} "
        f"{'eager ms':>8} {'gemm ms':>8} {'vs eager':>8} {'vs gemm':>7} {'ours TF/s':>9} {'gemm TF/s':>9}  config"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['case']:<20} {row['M']:>6} {row['N']:>5} {row['K']:>5} {row['activation']:<17} "
            f"{row['dtype']:<8} {row['ours_ms']:>8.3f} {row['eager_ms']:>8.3f} "
            f"{row['gemm_ms']:>8.3f} {row['speedup_vs_eager']:>7.2f}x {row['ratio_vs_gemm']:>6.2f}x "
            f"{row['ours_tflops']:>9.1f} {row['gemm_tflops']:>9.1f}  {row['config']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="repeatable; default bf16 (GPU)")
    parser.add_argument("--json", type=Path, help="write the rows and the versions here")
    args = parser.parse_args()
    names = args.dtype or (["bf16"] if ON_GPU else ["fp32", "fp16"])
    if not ON_GPU:
        print("CPU smoke run through the Triton interpreter: the timings are not performance numbers.")
    print(f"device: {gpu_name()}")
    rows = [measure(case, DTYPES[name]) for name in names for case in CASES]
    print_table(rows)
    if args.json:
        write_rows(args.json, "linear", rows)


@pytest.mark.parametrize("impl", ["ours", "eager", "gemm"])
@pytest.mark.parametrize("case", CASES, ids=[case[0].replace("/", "").replace(" ", "-") for case in CASES])
def test_linear(benchmark, case, impl):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    run_benchmark(benchmark, implementations(case, dtype)[impl], case[0])


if __name__ == "__main__":
    main()
