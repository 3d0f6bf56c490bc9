"""Fused residual add + LayerNorm against eager ``F.layer_norm(x + r)`` and torch.compile of the same function.

Effective bandwidth counts what the fused op must move: read x and the residual, write residual_out and
out (4 * M * N elements), plus weight and bias once. The peers compute and return the same two tensors.

    python3 benchmarks/bench_layernorm.py [--dtypes bf16 fp16] [--sweep] [--json PATH]
    pytest benchmarks/bench_layernorm.py --benchmark-only

On a machine without CUDA the script runs one tiny shape through the Triton interpreter as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import flushed_ms, versions  # noqa: E402
from vitriton.kernels.layernorm import layer_norm, layer_norm_config, layer_norm_triton  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
EPS = 1e-5
TARGET_GBPS = 2400.0
# (rows, hidden): ViT-B/16-224, ViT-L/14-336, so400m-384 and bigG-14 at batch 128.
SHAPES = [(128 * 197, 768), (128 * 577, 1024), (128 * 729, 1152), (128 * 257, 1664)]
SMOKE_SHAPES = [(16, 768)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SWEEP_BLOCK_M = (1, 2, 4, 8)
SWEEP_NUM_WARPS = (1, 2, 4, 8, 16)


def eager_add_layer_norm(x, residual, weight, bias):
    hidden = x + residual
    return F.layer_norm(hidden, (hidden.shape[-1],), weight, bias, EPS), hidden


def make_inputs(n_rows: int, n_cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x, residual = (torch.randn(n_rows, n_cols, generator=generator, device=DEVICE).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(n_cols, generator=generator, device=DEVICE)).to(dtype)
    bias = (0.1 * torch.randn(n_cols, generator=generator, device=DEVICE)).to(dtype)
    return x, residual, weight, bias


def bytes_moved(n_rows: int, n_cols: int, dtype: torch.dtype) -> int:
    element_size = torch.finfo(dtype).bits // 8
    return (4 * n_rows * n_cols + 2 * n_cols) * element_size


def peers(with_compile: bool) -> dict[str, Callable]:
    found = {"eager": eager_add_layer_norm}
    if with_compile:
        # A fresh compile per shape and dtype: one cache would pass dynamo's recompile limit and go eager.
        torch._dynamo.reset()
        found["compile"] = torch.compile(eager_add_layer_norm, dynamic=False)
    return found


def measure(shapes: list[tuple[int, int]], dtypes: list[torch.dtype], with_compile: bool) -> list[dict]:
    rows = []
    for n_rows, n_cols in shapes:
        for dtype in dtypes:
            x, residual, weight, bias = make_inputs(n_rows, n_cols, dtype)
            moved = bytes_moved(n_rows, n_cols, dtype)
            ours_ms = flushed_ms(partial(layer_norm, x, weight, bias, EPS, residual))
            # The bare launcher, without the custom op's dispatch: shows what the op wrapper costs.
            launcher_ms = flushed_ms(partial(layer_norm_triton, x, weight, bias, EPS, residual))
            for peer, fn in peers(with_compile).items():
                peer_ms = flushed_ms(partial(fn, x, residual, weight, bias))
                rows.append(
                    {
                        "shape": f"({n_rows}, {n_cols})",
                        "dtype": str(dtype).removeprefix("torch."),
                        "peer": peer,
                        "ours_ms": ours_ms,
                        "peer_ms": peer_ms,
                        "speedup": peer_ms / ours_ms,
                        "ours_gbps": moved / ours_ms / 1e6,
                        "peer_gbps": moved / peer_ms / 1e6,
                        "launcher_gbps": moved / launcher_ms / 1e6,
                    }
                )
    return rows


def sweep(shapes: list[tuple[int, int]], dtype: torch.dtype) -> list[dict]:
    """Every (BLOCK_M, num_warps) that fits, to check the defaults :func:`layer_norm_config` picks."""
    rows = []
    for n_rows, n_cols in shapes:
        x, residual, weight, bias = make_inputs(n_rows, n_cols, dtype)
        moved = bytes_moved(n_rows, n_cols, dtype)
        args = (x, weight, bias, EPS, residual)
        default_block_m, block_n, default_num_warps = layer_norm_config(n_cols, x.element_size())
        for block_m in SWEEP_BLOCK_M:
            for num_warps in SWEEP_NUM_WARPS:
                per_thread = block_m * block_n // (32 * num_warps)
                if not 1 <= per_thread <= 64:
                    continue
                launch = partial(layer_norm_triton, *args, block_m=block_m, num_warps=num_warps)
                ms = flushed_ms(launch)
                rows.append(
                    {
                        "shape": f"({n_rows}, {n_cols})",
                        "dtype": str(dtype).removeprefix("torch."),
                        "block_m": block_m,
                        "num_warps": num_warps,
                        "default": (block_m, num_warps) == (default_block_m, default_num_warps),
                        "ms": ms,
                        "gbps": moved / ms / 1e6,
                    }
                )
    return rows


def print_table(rows: list[dict], columns: list[str]) -> None:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.0f}" if value >= 100 else f"{value:.4f}"
        return str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--sweep", action="store_true", help="also time every (BLOCK_M, num_warps) tile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--json", type=Path, help="write the rows and versions here")
    args = parser.parse_args()

    if ON_CUDA:
        shapes = SHAPES
        dtypes = [DTYPES[d] for d in (args.dtypes or ["bf16"])]
        print(f"add + LayerNorm on {torch.cuda.get_device_name()}; target >= {TARGET_GBPS:.0f} GB/s effective")
    else:
        shapes = SMOKE_SHAPES
        dtypes = [DTYPES[d] for d in (args.dtypes or ["fp32"]) if d != "bf16"]
        print("CPU smoke run (Triton interpreter, no torch.compile peer): timings mean nothing")
    rows = measure(shapes, dtypes, with_compile=ON_CUDA and not args.no_compile)
    print_table(
        rows, ["shape", "dtype", "peer", "ours_ms", "peer_ms", "speedup", "ours_gbps", "peer_gbps", "launcher_gbps"]
    )
    if ON_CUDA:
        below = sorted({r["shape"] for r in rows if r["dtype"] == "bfloat16" and r["ours_gbps"] < TARGET_GBPS})
        print(f"bf16 shapes below {TARGET_GBPS:.0f} GB/s: {', '.join(below) or 'none'}")

    sweep_rows = []
    if args.sweep:
        sweep_rows = [row for dtype in dtypes for row in sweep(shapes, dtype)]
        print("\nsweep (default marks layer_norm_config's pick), best first per shape")
        sweep_rows.sort(key=lambda r: (r["shape"], r["dtype"], -r["gbps"]))
        print_table(sweep_rows, ["shape", "dtype", "block_m", "num_warps", "default", "ms", "gbps"])

    if args.json:
        args.json.write_text(json.dumps({"versions": versions(), "rows": rows, "sweep": sweep_rows}, indent=2))
        print(f"wrote {args.json}")


@pytest.mark.parametrize("impl", ["vitriton", "eager", "compile"])
@pytest.mark.parametrize("shape", SHAPES if ON_CUDA else SMOKE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_add_layer_norm(benchmark, shape: tuple[int, int], impl: str) -> None:
    if impl == "compile" and not ON_CUDA:
        pytest.skip("the torch.compile peer runs on CUDA only")
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    x, residual, weight, bias = make_inputs(*shape, dtype)
    if impl == "vitriton":

        def fn():
            return layer_norm(x, weight, bias, EPS, residual)
    else:
        peer = peers(with_compile=impl == "compile")[impl]

        def fn():
            return peer(x, residual, weight, bias)

    ms = flushed_ms(fn)
    benchmark.extra_info.update(median_ms=ms, gbps=bytes_moved(*shape, dtype) / ms / 1e6, dtype=str(dtype))

    def synchronized():
        fn()
        if ON_CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(synchronized, rounds=20 if ON_CUDA else 2, warmup_rounds=2 if ON_CUDA else 0)


if __name__ == "__main__":
    main()
