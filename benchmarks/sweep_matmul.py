"""Every candidate GEMM tile config of every kernel (plain loads, TMA, and at large M the persistent TMA kernel of
``linear``), against cuBLAS ``F.linear``.

    python3 benchmarks/sweep_matmul.py [--json PATH] [--case REGEX ...] [--path load|tma|persistent ...]
        [--tanh FORM ...] [--config REGEX ...]

The jitted kernels are called directly with explicit meta-parameters, bypassing the autotuner, so every
config is timed (``triton.testing.do_bench``, median; CUDA-graph replays at M <= 2048) and checked against
the eager reference (``err`` is ||ours - ref|| / ||ref||, on an output poisoned with NaN first). A config
that fails to compile or launch is reported in one line and skipped. Columns: ms, TFLOP/s (2 * M * N * K),
vs cuBLAS = cuBLAS ms / ours ms; each case's rows run slowest first, so its best config is printed last.
``--tanh`` sweeps the forms of the activation epilogue (``linear.FAST_TANH``) on the persistent kernel;
``--config`` keeps the configs whose name (as printed) a regex matches. Without CUDA it is a smoke run at tiny
shapes through the Triton interpreter (one config, correctness only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

from benchmarks.common import fast_tanh, gpu_name, relative_error, versions  # noqa: E402
from vitriton.kernels._matmul import (  # noqa: E402
    SMALL_M,
    set_descriptor_blocks,
)
from vitriton.kernels.linear import TANH_FORMS, linear_reference, linear_triton  # noqa: E402
from vitriton.kernels.qkv import qkv_projection_reference, qkv_projection_triton  # noqa: E402

ON_GPU = torch.cuda.is_available()

# (name, M or (batch, seq), K, N, activation or (heads, head_dim)): linear cases carry an activation name or
# None, q/k/v cases a (heads, head_dim) pair and (batch, seq) in place of M.
GPU_CASES = [
    ("L/14-336 fc1 b128", 128 * 577, 1024, 4096, "quick_gelu"),
    ("L/14-336 fc1 b8", 8 * 577, 1024, 4096, "quick_gelu"),
    ("B/16 fc1 b128", 128 * 197, 768, 3072, "quick_gelu"),
    ("so400m fc1 b8", 8 * 729, 1152, 4304, "gelu_pytorch_tanh"),
    ("H/14 fc1 b128", 128 * 257, 1280, 5120, "gelu"),
    ("bigG fc1 b128", 128 * 257, 1664, 8192, "gelu"),
    ("L/14-336 fc2 b128", 128 * 577, 4096, 1024, None),
    ("L/14-336 fc1 b128 bias only", 128 * 577, 1024, 4096, None),  # the epilogue without its activation
    ("so400m fc1 b128", 128 * 729, 1152, 4304, "gelu_pytorch_tanh"),
    ("L/14-336 qkv b128", (128, 577), 1024, 3 * 16 * 64, (16, 64)),
    ("so400m qkv b128", (128, 729), 1152, 3 * 16 * 72, (16, 72)),
    ("L/14-336 fc1 b1", 577, 1024, 4096, "quick_gelu"),
    ("B/16 fc1 b8", 8 * 197, 768, 3072, "quick_gelu"),
    ("so400m fc1 b1", 729, 1152, 4304, "gelu_pytorch_tanh"),
    ("L/14-336 qkv b1", (1, 577), 1024, 3 * 16 * 64, (16, 64)),
]
CPU_CASES = [
    ("cpu fc1", 50, 72, 104, "quick_gelu"),
    ("cpu fc2", 37, 104, 64, None),
    ("cpu qkv", (2, 7), 48, 3 * 3 * 72, (3, 72)),
]

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Shared memory is stages * (BLOCK_M + BLOCK_N) * 64 * 2
# bytes: 192 KiB at most here, under the H100's 227 KiB.
# 128x256 is kept to measure what its wgmma serialisation (ptxas C7515 under triton 3.6) costs.
LARGE_M_CONFIGS = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (256, 128, 64, 8, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 3),
]
SMALL_M_CONFIGS = [
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 4),
]
CPU_CONFIGS = [(16, 32, 32, 1, 1)]
# The persistent TMA kernel (linear cases above SMALL_M rows): the tile config, then EPILOGUE_SPLIT and
# CTAS_PER_SM. Two programs an SM need at most 113 KiB each (128x128 at 3 stages with a split store: 112 KiB
# as compiled for sm90), so that one program's epilogue runs while the other's main loop keeps the tensor
# cores busy.
PERSISTENT_CONFIGS = [
    (128, 256, 64, 8, 3, 2, 1),
    (128, 256, 64, 8, 4, 2, 1),  # 224 KiB as compiled for sm90: one more stage than the pool's 128x256
    (256, 128, 64, 8, 3, 2, 1),
    (128, 128, 64, 8, 4, 2, 1),
    (128, 128, 64, 4, 3, 2, 1),
    (128, 128, 64, 4, 3, 2, 2),
    (128, 128, 64, 4, 2, 1, 2),
    (128, 128, 64, 4, 2, 2, 2),
    (64, 256, 64, 4, 2, 2, 2),
]
# At M <= SMALL_M (batch 1 to 8) the grid is short of tiles: 64-row tiles (104 KiB at 4 stages, two an SM).
PERSISTENT_SMALL_M_CONFIGS = [
    (64, 128, 64, 4, 4, 2, 2),
    (64, 128, 64, 4, 3, 2, 2),
    (64, 128, 64, 4, 4, 2, 1),
    (128, 128, 64, 4, 3, 2, 2),
]
CPU_PERSISTENT_CONFIGS = [(16, 32, 32, 1, 1, 2, 1)]


def config_name(config: tuple[int, ...]) -> str:
    block_m, block_n, block_k, warps, stages, *persistent = config
    name = f"{block_m}x{block_n}x{block_k} w{warps} s{stages}"
    if persistent:
        name += " split{} ctas{}".format(*persistent)
    return name


def make_case(case, dtype: torch.dtype):
    """(M, N, K, reference output, cuBLAS peer, launcher ``run(config, tma, poison) -> output``)."""
    name, lead, k, n, epilogue = case
    device = "cuda" if ON_GPU else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    shape = lead if isinstance(lead, tuple) else (lead,)
    x = torch.randn(*shape, k, generator=generator, device=device).to(dtype)
    w = (torch.randn(n, k, generator=generator, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, generator=generator, device=device).to(dtype)
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]

    if isinstance(epilogue, tuple):
        heads, head_dim = epilogue
        batch, seq = shape
        out = torch.empty(3, batch, heads, seq, head_dim, dtype=dtype, device=device)
        reference = torch.stack(qkv_projection_reference(x, w, b, heads))

        def launch(config: triton.Config, path: str) -> None:
            qkv_projection_triton(x, w, b, heads, out=out, tma=path == "tma", config=config)
    else:
        out = torch.empty(m, n, dtype=dtype, device=device)
        reference = linear_reference(x2d, w, b, epilogue)

        def launch(config: triton.Config, path: str) -> None:
            persistent = path == "persistent"
            linear_triton(x2d, w, b, epilogue, out=out, tma=path != "load", persistent=persistent, config=config)

    configs: dict[tuple[int, ...], triton.Config] = {}

    def run(config: tuple[int, ...], path: str, poison: bool = False):
        if poison:  # so an element the config leaves unwritten fails the check
            out.fill_(float("nan"))
        if config not in configs:  # one Config object per tuple, so the launchers' plans are found again
            block_m, block_n, block_k, warps, stages, *persistent = config
            sizes = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
            if persistent:
                sizes |= dict(zip(("EPILOGUE_SPLIT", "CTAS_PER_SM"), persistent, strict=True))
            configs[config] = triton.Config(sizes, num_warps=warps, num_stages=stages, pre_hook=set_descriptor_blocks)
        launch(configs[config], path)
        return out

    paths = {"load": None, "tma": None}
    if not isinstance(epilogue, tuple):
        persistent = PERSISTENT_CONFIGS if m > SMALL_M else PERSISTENT_SMALL_M_CONFIGS
        paths["persistent"] = persistent if ON_GPU else CPU_PERSISTENT_CONFIGS
    return m, n, k, reference, (lambda: F.linear(x2d, w, b)), run, paths


def time_ms(fn, m: int) -> float:
    """Median ms. Below SMALL_M the kernels run for ~10-50 us, less than a Python launch, so they are timed as
    CUDA-graph replays (``do_bench_cudagraph``), which leave the host out; larger M uses plain ``do_bench``."""
    if m <= SMALL_M:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def sweep_case(
    case,
    dtype: torch.dtype,
    only_paths: list[str] | None = None,
    tanh_forms: list[str] | None = None,
    only_configs: list[str] | None = None,
) -> list[dict[str, object]]:
    name = case[0]
    m, n, k, reference, cublas, run, paths = make_case(case, dtype)
    paths = {path: configs for path, configs in paths.items() if not only_paths or path in only_paths}
    flop = 2 * m * n * k
    tflops = (lambda ms: flop / ms * 1e-9) if ON_GPU else (lambda ms: None)
    cublas_ms = time_ms(cublas, m) if ON_GPU else None
    rows = [
        {"case": name, "M": m, "N": n, "K": k, "path": "cublas", "config": "F.linear", "ms": cublas_ms}
        | {"tflops": tflops(cublas_ms) if ON_GPU else None, "vs_cublas": 1.0 if ON_GPU else None, "err": 0.0}
    ]
    tiled = CPU_CONFIGS if not ON_GPU else SMALL_M_CONFIGS if m <= SMALL_M else LARGE_M_CONFIGS
    activated = case[4] is not None and not isinstance(case[4], tuple)
    for path, configs in paths.items():
        forms = tanh_forms if tanh_forms and path == "persistent" and activated else [None]
        for form, config in itertools.product(forms, configs or tiled):
            if only_configs and not any(re.search(pattern, config_name(config)) for pattern in only_configs):
                continue
            label = config_name(config) + (f" {form}" if form else "")
            try:
                with fast_tanh(dtype, form):
                    out = run(config, path, poison=True)
                    err = relative_error(out, reference)
                    ms = time_ms(lambda config=config, path=path: run(config, path), m) if ON_GPU else None
            except Exception as error:  # a config that cannot compile or launch is skipped, not fatal
                first_line = (str(error).strip().splitlines() or [""])[0][:160]
                print(f"  {name} {path} {label}: skipped, {type(error).__name__}: {first_line}")
                continue
            row = {"case": name, "M": m, "N": n, "K": k, "path": path, "config": label, "ms": ms}
            row |= {"tflops": tflops(ms) if ON_GPU else None, "err": err}
            row["vs_cublas"] = cublas_ms / ms if ON_GPU else None
            rows.append(row)
    return rows


def print_case(rows: list[dict[str, object]]) -> None:
    """The case's rows slowest first, so the best config comes last; a row with err above 1e-2 is flagged."""
    if ON_GPU:
        rows = sorted(rows, key=lambda row: -row["ms"])
    for row in rows:
        timing = (
            f"{row['ms']:>8.3f} {row['tflops']:>7.1f} {row['vs_cublas']:>6.2f}x"
            if ON_GPU
            else f"{'-':>8} {'-':>7} {'-':>7}"
        )
        flag = "  BAD" if row["err"] > 1e-2 else ""
        print(
            f"{row['case']:<20} {row['M']:>6} {row['N']:>5} {row['K']:>5} {row['path']:<10} {row['config']:<40} "
            f"{timing} {row['err']:>8.1e}{flag}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows and the versions here")
    parser.add_argument("--case", action="append", help="only the cases whose name this regex matches (repeatable)")
    parser.add_argument(
        "--path", action="append", choices=("load", "tma", "persistent"), help="sweep only this kernel (repeatable)"
    )
    parser.add_argument(
        "--tanh", action="append", choices=TANH_FORMS, help="sweep the persistent kernel in this activation form"
    )
    parser.add_argument("--config", action="append", help="only the configs whose name this regex matches")
    args = parser.parse_args()
    dtype = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter has no bf16 dot
    cases = GPU_CASES if ON_GPU else CPU_CASES
    if args.case:
        cases = [case for case in cases if any(re.search(pattern, case[0]) for pattern in args.case)]
    if not ON_GPU:
        print("CPU smoke run through the Triton interpreter: correctness only, no timings.")
    print(f"device: {gpu_name()}  triton {triton.__version__}  torch {torch.__version__}  dtype {dtype}")
    header = (
        f"{'case':<20} {'M':>6} {'N':>5} {'K':>5} {'path':<10} {'config':<40} {'ms':>8} {'TF/s':>7} "
        f"{'vs cuBLAS':>7} {'err':>8}"
    )
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    rows = []
    for case in cases:
        case_rows = sweep_case(case, dtype, args.path, args.tanh, args.config)
        print_case(case_rows)
        rows += case_rows
    print(f"swept {len(cases)} cases in {time.perf_counter() - start:.0f} s")
    bad = [row for row in rows if row["err"] > 1e-2]
    if bad:
        print(
            f"{len(bad)} configs disagree with the reference: "
            + ", ".join(f"{r['case']} {r['path']} {r['config']}" for r in bad)
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "sweep_matmul", "dtype": str(dtype), "versions": versions(), "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
