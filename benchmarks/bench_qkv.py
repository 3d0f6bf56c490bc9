"""QKV projection with the head split in the epilogue against cuBLAS ``F.linear`` with and without the split.

    python3 benchmarks/bench_qkv.py [--dtype bf16] [--json PATH]
    pytest benchmarks/bench_qkv.py --benchmark-only

Columns: ours = ``vitriton.kernels.qkv_projection`` (q, k, v written as contiguous (B, H, S, D));
gemm = F.linear alone, output left packed (B, S, 3 * H * D): the target is ours >= 0.95x of it;
gemm+split = F.linear then view/permute/contiguous into the same (3, B, H, S, D) layout, what an eager model
pays. ratio = their time / ours (above 1: ours is faster). TFLOP/s counts 2 * M * N * K with M = B * S.
Without CUDA it is a smoke run at a tiny shape through the Triton interpreter: the timings then mean nothing.
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
from vitriton.kernels.qkv import _qkv_kernel, qkv_projection  # noqa: E402

ON_GPU = torch.cuda.is_available()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (name, batch, seq, hidden, heads, head_dim)
GPU_CASES = [
    ("L/14-336 b128", 128, 577, 1024, 16, 64),
    ("so400m b128", 128, 729, 1152, 16, 72),
    ("B/16 b128", 128, 197, 768, 12, 64),
    ("H/14 b128", 128, 257, 1280, 16, 80),
    ("bigG/14 b64", 64, 257, 1664, 16, 104),
    ("so400m tp2 b128", 128, 729, 1152, 8, 72),
    ("L/14-336 b1", 1, 577, 1024, 16, 64),
    ("so400m b1", 1, 729, 1152, 16, 72),
    ("B/32 b1", 1, 50, 768, 12, 64),
]
CPU_CASES = [("cpu smoke", 1, 16, 32, 1, 72)]
CASES = GPU_CASES if ON_GPU else CPU_CASES


def implementations(case, dtype: torch.dtype) -> dict[str, object]:
    _, batch, seq, hidden, heads, head_dim = case
    device = "cuda" if ON_GPU else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    n = 3 * heads * head_dim
    x = torch.randn(batch, seq, hidden, generator=generator, device=device).to(dtype)
    w = (torch.randn(n, hidden, generator=generator, device=device) / hidden**0.5).to(dtype)
    b = torch.randn(n, generator=generator, device=device).to(dtype)

    def gemm_split():
        packed = F.linear(x, w, b).view(batch, seq, 3, heads, head_dim)
        return packed.permute(2, 0, 3, 1, 4).contiguous()

    return {
        "ours": lambda: qkv_projection(x, w, b, heads),
        "gemm": lambda: F.linear(x, w, b),
        "gemm+split": gemm_split,
    }


def measure(case, dtype: torch.dtype) -> dict[str, object]:
    name, batch, seq, hidden, heads, head_dim = case
    reps = 30 if ON_GPU else 2
    fns = implementations(case, dtype)
    times = {impl: median_ms(fn, warmup=3 if ON_GPU else 1, reps=reps) for impl, fn in fns.items()}
    fns["ours"]()
    config = last_config(_qkv_kernel)
    m, n, k = batch * seq, 3 * heads * head_dim, hidden
    flop = 2 * m * n * k
    return {
        "case": name,
        "M": m,
        "N": n,
        "K": k,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": str(dtype).removeprefix("torch."),
        "config": config,
        "ours_ms": times["ours"],
        "gemm_ms": times["gemm"],
        "gemm_split_ms": times["gemm+split"],
        "ratio_vs_gemm": times["gemm"] / times["ours"],
        "ratio_vs_gemm_split": times["gemm+split"] / times["ours"],
        "ours_tflops": flop / times["ours"] * 1e-9,
        "gemm_tflops": flop / times["gemm"] * 1e-9,
    }


def print_table(rows: list[dict[str, object]]) -> None:
    header = (
        f"{'case':<16} {'M':>6} {'N':>5} {'K':>5} {'hd':>4} {'dtype':<8} {'ours ms':>8} {'gemm ms':>8} "
        f"{'+split ms':>9} {'vs gemm':>7} {'vs +split':>9} {'ours TF/s':>9} {'gemm TF/s':>9}  config"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['case']:<16} {row['M']:>6} {row['N']:>5} {row['K']:>5} {row['head_dim']:>4} {row['dtype']:<8} "
            f"{row['ours_ms']:>8.3f} {row['gemm_ms']:>8.3f} {row['gemm_split_ms']:>9.3f} "
            f"{row['ratio_vs_gemm']:>6.2f}x {row['ratio_vs_gemm_split']:>8.2f}x "
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
        write_rows(args.json, "qkv", rows)


@pytest.mark.parametrize("impl", ["ours", "gemm", "gemm+split"])
@pytest.mark.parametrize("case", CASES, ids=[case[0].replace("/", "").replace(" ", "-") for case in CASES])
def test_qkv(benchmark, case, impl):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    run_benchmark(benchmark, implementations(case, dtype)[impl], case[0])


if __name__ == "__main__":
    main()
