"""Every encoder GEMM, vitriton's kernels and cuBLAS side by side: TFLOP/s and the ratio to ``F.linear`` + bias.

    python3 -m benchmarks.bench_gemm [--models clip-vit-l14-336 ...] [--batch-sizes 8 128] [--out DIR]
    pytest benchmarks/bench_gemm.py --benchmark-only

Each model's qkv, out_proj, fc1 and fc2 GEMMs, M = batch * tokens, against these candidates:
  cublas             ``F.linear(x, w, b)``: the reference, ratio 1
  cublaslt-gelu      ``torch._addmm_activation(b, x, w.t(), use_gelu=True)``, cuBLASLt's bias + GELU (tanh)
                     epilogue: the ceiling for any fused fc1 (fc1)
  cublas+act         ``F.linear``, then the model's activation as separate ops (fc1)
  vitriton           ``linear_triton``, the model's activation fused at fc1, none at out_proj and fc2 (the
                     persistent TMA kernel for 16-bit operands on Hopper); ``qkv_projection_triton``, q, k
                     and v written head-split, at qkv
  vitriton-tiled     ``linear_triton(persistent=False)``: one program per tile
  vitriton-ws        ``linear_triton(warp_specialize=True)``: the persistent kernel warp-specialised (a producer
                     warp and two consumer warpgroups; 16-bit on Hopper only) (out_proj, fc1, fc2)
  vitriton-sigmoid   ``vitriton`` with the activation's sigmoid from ex2 and a reciprocal (``FAST_TANH`` "sigmoid",
                     the form before the tanh instruction) (fc1)
  vitriton-bf16x2    ``vitriton`` with the tanh alone on bf16 pairs (``FAST_TANH`` "bf16x2", the bf16 form before
                     "bf16x2_math"; bf16 runs only) (fc1)
  cublas-packed-qkv  ``F.linear`` viewed as (B, S, 3, H, D): the head split as views, no extra pass (qkv)
ratio = cublas ms / candidate ms (above 1: faster than cuBLAS); TFLOP/s counts 2 * M * N * K. On CUDA every
call is timed with the L2 cache flushed before it (``common.flushed_ms``). Each candidate's first output is
checked against the cuBLAS output with the candidate's activation applied in fp32; one out of bounds is marked
wrong and not timed, and the command exits 1. Without CUDA it is a smoke run of the toy presets through the
Triton interpreter in fp32 and fp16, so the command works everywhere: its timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from benchmarks import render  # noqa: E402
from benchmarks.common import fast_tanh, flushed_ms, gpu_name, relative_error, run_benchmark, write_rows  # noqa: E402
from benchmarks.models import PRESETS, tokens_per_sample  # noqa: E402
from benchmarks.report import RESULTS, device_slug  # noqa: E402
from vitriton.kernels._launch import _layers  # noqa: E402
from vitriton.kernels._matmul import config_name, last_config, tma_device  # noqa: E402
from vitriton.kernels.linear import PLANS as LINEAR_PLANS  # noqa: E402
from vitriton.kernels.linear import (  # noqa: E402
    _linear_kernel,
    _linear_persistent_kernel,
    _linear_ws_kernel,
    linear_reference,
    linear_triton,
)
from vitriton.kernels.qkv import _qkv_kernel, qkv_projection_triton  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# ||out - ref|| / ||ref||: a few roundings of the output dtype; a wrong tile or epilogue gives ~1. fp32 allows
# torch's CPU ``_addmm_activation``, which computes the exact erf GELU, 2e-4 from the tanh form it is checked on.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}
GPU_MODELS = ("clip-vit-b16-224", "clip-vit-l14-336", "siglip-so400m-384", "clip-vit-h14-224", "clip-vit-bigg14-224")
CPU_MODELS = ("tiny-clip-vit", "tiny-siglip-vit")
GPU_BATCH_SIZES = (8, 128)
CPU_BATCH_SIZES = (2,)
CANDIDATES = {
    "qkv": ("cublas", "cublas-packed-qkv", "vitriton"),
    "out_proj": ("cublas", "vitriton", "vitriton-ws", "vitriton-tiled"),
    "fc1": (
        "cublas",
        "cublaslt-gelu",
        "cublas+act",
        "vitriton",
        "vitriton-ws",
        "vitriton-sigmoid",
        "vitriton-bf16x2",
        "vitriton-tiled",
    ),
    "fc2": ("cublas", "vitriton", "vitriton-ws", "vitriton-tiled"),
}

# Candidates that force one kernel, whose tuned config the table notes.
FORCED_KERNELS = {"vitriton-tiled": _linear_kernel, "vitriton-ws": _linear_ws_kernel}


@dataclass(frozen=True)
class Gemm:
    """One GEMM of an encoder layer: x (batch, seq, k) @ w (n, k)^T + b, then ``activation`` (fc1 only)."""

    model: str
    batch: int
    layer: str  # a key of CANDIDATES
    seq: int
    k: int
    n: int
    heads: int
    activation: str | None

    @property
    def m(self) -> int:
        return self.batch * self.seq

    @property
    def name(self) -> str:
        return f"{self.model} b{self.batch} {self.layer}"


def gemms(models: Sequence[str], batch_sizes: Sequence[int], layers: Sequence[str] | None = None) -> list[Gemm]:
    found = []
    for model in models:
        spec = PRESETS[model]
        config = spec.make_config()
        seq, d, mlp = tokens_per_sample(config, spec), config.hidden_size, config.intermediate_size
        every = (("qkv", d, 3 * d, None), ("out_proj", d, d, None), ("fc1", d, mlp, config.hidden_act))
        for batch in batch_sizes:
            for layer, k, n, activation in (*every, ("fc2", mlp, d, None)):
                if layers is None or layer in layers:
                    found.append(Gemm(model, batch, layer, seq, k, n, config.num_attention_heads, activation))
    return found


class Candidate(NamedTuple):
    call: Callable[[], torch.Tensor]
    activation: str | None = None  # what the output carries on top of x @ w^T + b
    head_split: bool = False  # the output is (3, B, H, S, D), not (..., N)


def operands(gemm: Gemm, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(gemm.batch, gemm.seq, gemm.k, generator=generator, device=DEVICE).to(dtype)
    w = (torch.randn(gemm.n, gemm.k, generator=generator, device=DEVICE) / gemm.k**0.5).to(dtype)
    b = torch.randn(gemm.n, generator=generator, device=DEVICE).to(dtype)
    return x, w, b


def candidates(gemm: Gemm, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict[str, Candidate]:
    act = gemm.activation
    split = (gemm.batch, gemm.seq, 3, gemm.heads, gemm.n // (3 * gemm.heads))
    x2d = x.view(gemm.m, gemm.k)
    if gemm.layer == "qkv":
        ours = Candidate(lambda: qkv_projection_triton(x, w, b, gemm.heads), head_split=True)
    else:
        ours = Candidate(lambda: linear_triton(x, w, b, act), act)
    every = {
        "cublas": Candidate(lambda: F.linear(x, w, b)),
        "cublaslt-gelu": Candidate(lambda: torch._addmm_activation(b, x2d, w.t(), use_gelu=True), "gelu_pytorch_tanh"),
        "cublas+act": Candidate(lambda: linear_reference(x, w, b, act), act),
        "cublas-packed-qkv": Candidate(lambda: F.linear(x, w, b).view(split)),
        "vitriton": ours,
        "vitriton-tiled": Candidate(lambda: linear_triton(x, w, b, act, persistent=False), act),
        "vitriton-sigmoid": Candidate(with_tanh("sigmoid", x.dtype, lambda: linear_triton(x, w, b, act)), act),
    }
    if x.dtype != torch.float32 and tma_device(x.device):
        every["vitriton-ws"] = Candidate(lambda: linear_triton(x, w, b, act, warp_specialize=True), act)
    if x.dtype == torch.bfloat16:
        every["vitriton-bf16x2"] = Candidate(with_tanh("bf16x2", x.dtype, lambda: linear_triton(x, w, b, act)), act)
    return {name: every[name] for name in CANDIDATES[gemm.layer] if name in every}


def with_tanh(form: str, dtype: torch.dtype, call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``call`` with the activations' tanh evaluated as ``form`` (``linear.FAST_TANH``; part of the plan key)."""

    def run() -> torch.Tensor:
        with fast_tanh(dtype, form):
            return call()

    return run


def error_of(gemm: Gemm, candidate: Candidate, out: torch.Tensor, cublas_out: torch.Tensor) -> float:
    """||out - act(cublas_out)|| / ||act(cublas_out)||, the activation applied in fp32."""
    expected = cublas_out.float().reshape(gemm.m, gemm.n)
    if candidate.activation is not None:
        expected = ACT2FN[candidate.activation](expected)
    rows = out.permute(1, 3, 0, 2, 4) if candidate.head_split else out
    return relative_error(rows.reshape(gemm.m, gemm.n), expected)


def kernel_config(gemm: Gemm) -> str:
    """The tile config of the kernel ``vitriton`` ran at ``gemm``, read off the newest linear plan of its M, N and K
    (the plan records which kernel and config it launches)."""
    if gemm.layer == "qkv":
        return last_config(_qkv_kernel)
    persistent = _layers(_linear_persistent_kernel)[-1]
    for plan, *_, static in reversed(LINEAR_PLANS.plans.values()):
        if tuple(static[:3]) == (gemm.m, gemm.n, gemm.k) and plan.config is not None:
            return ("persistent " if plan.jit is persistent else "") + config_name(plan.config)
    return "-"


def measure(gemm: Gemm, dtype: torch.dtype, only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every candidate at ``gemm`` (or those of ``only``, and cuBLAS): checked once against cuBLAS, then timed if
    it passed."""
    x, w, b = operands(gemm, dtype)
    found = candidates(gemm, x, w, b)
    if only:
        found = {name: candidate for name, candidate in found.items() if name == "cublas" or name in only}
    cublas_out = found["cublas"].call()
    rows, cublas_ms = [], None
    for name, candidate in found.items():
        row: dict[str, Any] = {
            "model": gemm.model,
            "batch": gemm.batch,
            "layer": gemm.layer,
            "M": gemm.m,
            "N": gemm.n,
            "K": gemm.k,
            "dtype": next(key for key, value in DTYPES.items() if value is dtype),
            "candidate": name,
            "activation": candidate.activation,
            "status": "wrong",
        }
        rows.append(row)
        try:
            row["rel_err"] = error_of(gemm, candidate, candidate.call(), cublas_out)
        except (RuntimeError, ValueError) as error:
            row.update(status="error", note=f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
            continue
        if name == "vitriton":
            row["note"] = kernel_config(gemm)
        if name in FORCED_KERNELS:
            row["note"] = last_config(FORCED_KERNELS[name])
        if row["rel_err"] > TOLERANCE[dtype]:
            continue
        ms = flushed_ms(candidate.call)
        cublas_ms = ms if name == "cublas" else cublas_ms
        tflops = 2 * gemm.m * gemm.n * gemm.k / ms * 1e-9
        row.update(status="ok", ms=ms, tflops=tflops, ratio=cublas_ms / ms if cublas_ms else None)
    return rows


def table(rows: Sequence[dict[str, Any]], title: str) -> Table:
    result = Table(title=title, title_justify="left", caption="ratio = cublas ms / candidate ms")
    for column in ("shape", "M x N x K", "candidate", "activation", "TF/s", "ratio", "rel err", "note"):
        result.add_column(column, justify="right" if column in ("TF/s", "ratio", "rel err") else "left")
    shape = None
    for row in rows:
        this = f"{row['model']} b{row['batch']} {row['layer']} {row['dtype']}"
        if shape is not None and this != shape:
            result.add_section()
        ok = row["status"] == "ok"
        ratio = f"{row['ratio']:.2f}x" if ok and row["ratio"] else "-"
        error = f"{row['rel_err']:.1e}" if "rel_err" in row else "-"
        result.add_row(
            this if this != shape else "",
            f"{row['M']} x {row['N']} x {row['K']}" if this != shape else "",
            row["candidate"],
            row["activation"] or "",
            render.number(row["tflops"]) if ok else f"[red]{row['status'].upper()}[/red]",
            ratio,
            error,
            row.get("note", ""),
        )
        shape = this
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.bench_gemm", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=list(PRESETS), help=f"(default: GPU {GPU_MODELS}, CPU {CPU_MODELS})"
    )
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int, help=f"(default: GPU {GPU_BATCH_SIZES}, CPU {CPU_BATCH_SIZES})"
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), help="(default: bf16 on a GPU, fp32 fp16 on the CPU)"
    )
    parser.add_argument("--layers", nargs="+", choices=list(CANDIDATES), help="(default: every layer)")
    every_candidate = sorted({name for names in CANDIDATES.values() for name in names})
    parser.add_argument(
        "--candidates", nargs="+", choices=every_candidate, help="only these besides cublas (default: all)"
    )
    parser.add_argument("--out", type=Path, help="output directory (default: benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    models = args.models or (GPU_MODELS if ON_GPU else CPU_MODELS)
    batch_sizes = args.batch_sizes or (GPU_BATCH_SIZES if ON_GPU else CPU_BATCH_SIZES)
    dtypes = args.dtypes or (["bf16"] if ON_GPU else ["fp32", "fp16"])

    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
    device = gpu_name()
    console.rule(f"GEMM benchmark · {device if ON_GPU else 'CPU smoke run through the Triton interpreter'}")
    rows = []
    with console.status("") as status:
        for dtype in dtypes:
            for gemm in gemms(models, batch_sizes, args.layers):
                status.update(f"{gemm.name} {dtype}")
                rows += measure(gemm, DTYPES[dtype], args.candidates)
    console.print(table(rows, f"{device} · {' '.join(dtypes)}" + (" · L2 flushed" if ON_GPU else "")))
    out = args.out or RESULTS / (device_slug(device) if ON_GPU else "cpu")
    write_rows(out / "gemm.json", "gemm", rows)
    failed = [f"{r['model']} b{r['batch']} {r['layer']} {r['candidate']}" for r in rows if r["status"] != "ok"]
    if failed:
        console.print(f"[red]{len(failed)} failed:[/red] {', '.join(failed)}")
    return 1 if failed else 0


def _cases(gemm_list: list[Gemm], marks: Sequence[pytest.MarkDecorator]) -> list[Any]:
    return [
        pytest.param(gemm, name, marks=marks, id=f"{gemm.name}-{name}".replace(" ", "-"))
        for gemm in gemm_list
        for name in CANDIDATES[gemm.layer]
    ]


GPU_ONLY = (pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device"))


# On the CPU one toy model (odd head_dim, tanh GELU) keeps the interpreted suite short.
@pytest.mark.parametrize(
    ("gemm", "name"),
    _cases(gemms(GPU_MODELS, GPU_BATCH_SIZES), GPU_ONLY) + _cases(gemms(CPU_MODELS[-1:], CPU_BATCH_SIZES), ()),
)
def test_gemm(benchmark, gemm: Gemm, name: str) -> None:
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x, w, b = operands(gemm, dtype)
    found = candidates(gemm, x, w, b)
    if name not in found:
        pytest.skip(f"{name} does not run {dtype} on {DEVICE}")
    candidate = found[name]
    error = error_of(gemm, candidate, candidate.call(), F.linear(x, w, b))
    benchmark.extra_info.update(rel_err=error, M=gemm.m, N=gemm.n, K=gemm.k)
    assert error <= TOLERANCE[dtype], f"{gemm.name} {name}: rel err {error:.2e} exceeds {TOLERANCE[dtype]:.0e}"
    run_benchmark(benchmark, candidate.call, gemm.name)


if __name__ == "__main__":
    sys.exit(main())
