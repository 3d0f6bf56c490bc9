"""Where one forward's device time goes, by op: ``torch.profiler`` over a few calls of one model and provider.

    python3 -m benchmarks.profile_ops [--model clip-vit-l14-336] [--batch 128] [--providers vitriton hf-compile]

For each provider the kernels of ``--calls`` forwards (after warm-up) are grouped into GEMM, attention,
LayerNorm, communication and other (copies, element-wise, cast) by name, and printed as ms per forward and share,
then the most expensive kernels by name. On CUDA the time is device time; without CUDA it is CPU time of the
eager ops (a smoke run: the toy presets, fp32).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import synchronize
from benchmarks.models import PRESETS, PROVIDERS, BuildContext, build_master, cast_inputs, make_inputs

ON_CUDA = torch.cuda.is_available()
# (category, substrings of kernel or op names), first match wins; names are lower-cased.
CATEGORIES = (
    ("attention", ("attention", "attn", "fmha", "flash", "sdpa", "softmax")),
    ("layernorm", ("layer_norm", "layernorm")),
    (
        "gemm",
        ("gemm", "linear", "qkv", "matmul", "::mm", "::bmm", "addmm", "cutlass", "xmma", "nvjet", "sm90", "cublas"),
    ),
    ("communication", ("nccl", "all_reduce", "allreduce", "all_gather")),
)


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, keys in CATEGORIES if any(key in lowered for key in keys)), "other")


def profile(encoder, inputs: torch.Tensor, calls: int) -> dict[str, float]:
    """Milliseconds per forward by kernel (CUDA) or op (CPU) name."""
    with torch.inference_mode():
        for _ in range(3):
            encoder(inputs)
        synchronize()
        activities = [torch.profiler.ProfilerActivity.CUDA if ON_CUDA else torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(calls):
                encoder(inputs)
            synchronize()
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if ON_CUDA else event.self_cpu_time_total
        if us > 0:
            times[event.key] += us / 1e3 / calls
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clip-vit-l14-336" if ON_CUDA else "tiny-clip-vit", choices=PRESETS)
    parser.add_argument("--batch", type=int, default=128 if ON_CUDA else 2)
    parser.add_argument("--providers", nargs="+", default=["vitriton", "hf-compile"], choices=PROVIDERS)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    device = torch.device("cuda" if ON_CUDA else "cpu")
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    spec = PRESETS[args.model]
    master = build_master(spec, device)
    inputs = cast_inputs(make_inputs(spec, args.batch), dtype, device)
    console = Console()
    for name in args.providers:
        context = BuildContext(spec, master, dtype, device, (args.batch,))
        times = profile(PROVIDERS[name].build(context), inputs, args.calls)
        total = sum(times.values())
        by_category: dict[str, float] = defaultdict(float)
        for kernel, ms in times.items():
            by_category[category(kernel)] += ms
        table = Table(title=f"{args.model} b{args.batch} {name}: {total:.2f} ms per forward ({device.type} time)")
        for column in ("op", "ms / forward", "share"):
            table.add_column(column, justify="left" if column == "op" else "right")
        for label, ms in sorted(by_category.items(), key=lambda item: -item[1]):
            table.add_row(label, f"{ms:.3f}", f"{ms / total:.1%}")
        for kernel, ms in sorted(times.items(), key=lambda item: -item[1])[: args.top]:
            table.add_row(f"  {kernel[:90]}", f"{ms:.3f}", f"{ms / total:.1%}", style="dim")
        console.print(table)


if __name__ == "__main__":
    main()
