"""Host cost of one call of each op at a tiny shape, next to an empty Triton kernel and ``F.linear``.

    python3 benchmarks/bench_launch.py [--calls 2000] [--json PATH]

At these shapes the GPU finishes a kernel in a few microseconds, faster than Python can launch the next one,
so back-to-back calls measure the host: microseconds per call = wall time of ``calls`` calls (synchronised
once at the end) / ``calls``. Every row runs in the same process, after warm-up (plans built, kernels
compiled). The vitriton rows call the public ops the encoders call. Without CUDA it is a smoke run through the
interpreter: the numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.common import run_benchmark, synchronize, write_rows  # noqa: E402
from vitriton.kernels.attention import attention  # noqa: E402
from vitriton.kernels.layernorm import layer_norm  # noqa: E402
from vitriton.kernels.linear import linear, linear_triton  # noqa: E402
from vitriton.kernels.qkv import qkv_projection  # noqa: E402

ON_GPU = torch.cuda.is_available()


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):  # noqa: ARG001 - the launch is what is measured
    pass


def calls() -> dict[str, object]:
    """Name -> zero-argument call, at a tiny shape: batch 1, 8 tokens, hidden 64, 2 heads of 32."""
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    x, delta = randn(1, 8, 64), randn(1, 8, 64)
    ln_w, ln_b = randn(64), randn(64)
    w_qkv, b_qkv = randn(192, 64), randn(192)
    w_fc1, b_fc1 = randn(256, 64), randn(256)
    q, k, v = randn(1, 2, 8, 32), randn(1, 2, 8, 32), randn(1, 2, 8, 32)
    keep = torch.ones(1, 8, dtype=torch.bool, device=device)
    # An encoder's epilogue-free GEMM at batch 1 (ViT-L/14-336 out_proj): cuBLAS, which ``linear`` calls for it,
    # against our kernel; here the GPU time (~10 us) is near the host time, so the row says which launches faster.
    m, n = (577, 1024) if ON_GPU else (7, 16)
    x_b1, w_b1, b_b1 = randn(1, m, n), randn(n, n), randn(n)
    return {
        "empty triton kernel": lambda: _empty_kernel[(1,)](x, 8, BLOCK=16),
        "F.linear": lambda: F.linear(x, w_fc1, b_fc1),
        "F.layer_norm": lambda: F.layer_norm(x, (64,), ln_w, ln_b, 1e-5),
        "layer_norm (add + LN)": lambda: layer_norm(delta, ln_w, ln_b, 1e-5, x),
        "qkv_projection": lambda: qkv_projection(x, w_qkv, b_qkv, 2),
        "attention": lambda: attention(q, k, v),
        "linear + quick_gelu": lambda: linear(x, w_fc1, b_fc1, "quick_gelu"),
        # the path small M took before plans encoded TMA descriptors once per address (the row above: TMA,
        # persistent, on Hopper)
        "linear + quick_gelu, plain": lambda: linear_triton(x, w_fc1, b_fc1, "quick_gelu", tma=False),
        "attention (causal + mask)": lambda: attention(q, k, v, causal=True, key_padding_mask=keep),
        f"F.linear {m}x{n}x{n}": lambda: F.linear(x_b1, w_b1, b_b1),
        f"linear_triton {m}x{n}x{n}": lambda: linear_triton(x_b1, w_b1, b_b1),
    }


def host_us(fn, count: int) -> float:
    for _ in range(20):
        fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(count):
        fn()
    synchronize()
    return (time.perf_counter() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000 if ON_GPU else 20)
    parser.add_argument("--json", type=Path, help="write the rows and the versions here")
    args = parser.parse_args()
    if not ON_GPU:
        print("CPU smoke run through the Triton interpreter: the timings are not performance numbers.")
    rows = []
    for name, fn in calls().items():
        rows.append({"op": name, "host_us": host_us(fn, args.calls)})
    empty = rows[0]["host_us"]
    for row in rows:
        row["vs_empty_triton"] = row["host_us"] / empty
    print(f"{'op':<28} {'us/call':>8} {'x empty':>8}")
    for row in rows:
        print(f"{row['op']:<28} {row['host_us']:>8.1f} {row['vs_empty_triton']:>7.2f}x")
    if args.json:
        write_rows(args.json, "launch", rows, calls=args.calls)


@pytest.mark.parametrize("name", list(calls()))
def test_launch(benchmark, name):
    run_benchmark(benchmark, calls()[name], "launch")


if __name__ == "__main__":
    main()
