"""``python3 -m benchmarks.report``: vitriton against transformers eager, sdpa and torch.compile on the encoders.

On a GPU it runs the full-size towers of ANCHORS.md (CLIP ViT-B/16-224, ViT-L/14-336, SigLIP so400m-14-384,
the CLIP L/14 text tower) at batch 1, 8, 32 and 128 in bf16, all providers in one process. Without a GPU it
is a smoke run of toy configs through the eager path, so the command works everywhere. It prints a table
per model and the ANCHORS.md targets, and writes JSON, CSV and a PNG under benchmarks/results/<device>/.

How each number is taken:
- ms: median of device-synchronised calls (CUDA events, a sync per call, so b1 includes launch overhead),
  after warm-up; the call count is sized to --seconds per cell, within [--min-reps, --max-reps].
- TFLOP/s: the analytic FLOPs of ``models.flops_per_sample`` over that time; % peak: against an 8192^3
  matmul in the run's dtype, timed first in the same process.
- first call s: the first call after a provider is built, compilation included. vitriton and hf-compile are
  built from empty caches (Triton and Inductor, on disk and in memory). vitriton-graphs reuses the kernels
  vitriton just compiled, so its first call is warm-up plus capture. Later batch sizes record their own first
  call (autotuning a new shape, a recompile, a capture).
- peak GiB: torch.cuda.max_memory_allocated over the cell, less what was allocated before the provider was
  built (the fp32 reference weights and outputs): the provider's weights, workspace and activations.
- rel err: ||out - ref|| / ||ref|| of pooler_output and of last_hidden_state, against transformers in fp32
  (eager attention, TF32 off) on the same weights and inputs.
- torch.compile keeps its defaults: the first batch size compiles static shapes and the second recompiles
  with a dynamic batch dimension that later sizes reuse; --compile-static compiles every size on its own
  (fairest kernels, about twice the compile time).

Parallel runs (``torchrun --nproc-per-node N -m benchmarks.report --parallel tensor|data|all``): ``tensor`` shards
vitriton's weights over the ranks (transformers providers are skipped); ``data`` gives every rank the full
weights and a share of each batch, outputs all-gathered (vitriton's ``parallel="data"``, and the same split
around transformers). ``all`` measures, in one run, TP1, TP2, TP4, ... (tensor parallel over ranks 0..n-1) and
DP2, DP4, ... (data parallel over ranks 0..n-1), every power of two up to N and N itself; the ranks outside a
configuration wait on a gloo barrier (no GPU work, no NCCL traffic), so each number is that configuration's
alone. It prints a table per model of latency, throughput and the speedup over TP1 of the same provider and
batch, and ANCHORS.md's tensor-parallel targets. Batch sizes stay global; times are the slowest rank's; rank 0
writes the files (and ``nvidia-smi topo -m`` into the JSON and topo.txt).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks import render
from benchmarks.common import (
    first_call,
    fresh_compile_caches,
    gpu_name,
    matmul_tflops,
    median_ms,
    relative_error,
    reps_for,
    synchronize,
    versions,
)
from benchmarks.models import (
    BASELINE,
    CPU_MODELS,
    CPU_PROVIDERS,
    GPU_MODELS,
    GPU_PROVIDERS,
    PRESETS,
    PROVIDERS,
    BuildContext,
    ModelSpec,
    Provider,
    batch_unsupported,
    build_master,
    cast_inputs,
    flops_per_sample,
    make_inputs,
    outputs_of,
    reference_outputs,
    tokens_per_sample,
    unavailable,
)

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_BATCH_SIZES = (1, 8, 32, 128)
CPU_BATCH_SIZES = (1, 8, 32)
GIB = 2**30


def _names(values: Iterable[str] | None) -> list[str] | None:
    """``--models a,b c`` -> [a, b, c]."""
    if values is None:
        return None
    return [name for value in values for name in value.split(",") if name]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks.report",
        description="Benchmark vitriton's encoders against transformers (eager, sdpa, torch.compile).",
    )
    parser.add_argument("--models", nargs="+", help=f"presets (default: GPU {GPU_MODELS}, CPU {CPU_MODELS})")
    parser.add_argument("--batch-sizes", nargs="+", help=f"(default: GPU {GPU_BATCH_SIZES}, CPU {CPU_BATCH_SIZES})")
    parser.add_argument("--providers", nargs="+", help=f"(default: GPU {GPU_PROVIDERS}, CPU {CPU_PROVIDERS})")
    parser.add_argument("--skip-compile", action="store_true", help="leave out hf-compile (saves 15-60 s a model)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="(default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="cpu forces a smoke run")
    parser.add_argument("--out", type=Path, help="output directory (default: benchmarks/results/<device>)")
    parser.add_argument("--seconds", type=float, help="timed seconds per cell (default: 0.5 on a GPU, 0.05 CPU)")
    parser.add_argument("--min-reps", type=int, default=5, help="fewest timed calls per cell (default: 5)")
    parser.add_argument("--max-reps", type=int, default=100, help="most timed calls per cell (default: 100)")
    parser.add_argument("--baseline", help=f"provider the ratios are taken against (default: {BASELINE}, else hf-sdpa)")
    parser.add_argument("--compile-static", action="store_true", help="torch.compile(dynamic=False) per size")
    parser.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument(
        "--warm-caches", action="store_true", help="use the usual on-disk Triton/Inductor caches (warm first calls)"
    )
    parser.add_argument("--matmul-size", type=int, help="side of the peak matmul (default: 8192 GPU, 1024 CPU)")
    parser.add_argument(
        "--parallel",
        choices=("none", "tensor", "data", "all"),
        default="none",
        help="under torchrun; all: TP1, TP2, ..., DPn side by side",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 in a CPU smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="for the weights and inputs (default: 0)")
    parser.add_argument("--list", action="store_true", help="list the presets and providers, then exit")
    args = parser.parse_args(argv)
    args.models = _names(args.models)
    args.providers = _names(args.providers)
    if args.batch_sizes is not None:
        try:
            args.batch_sizes = sorted({int(b) for b in _names(args.batch_sizes)})
        except ValueError:
            parser.error(f"--batch-sizes takes integers; got {args.batch_sizes}")
        if args.batch_sizes[0] < 1:
            parser.error(f"--batch-sizes must be positive; got {args.batch_sizes}")
    for option, chosen, known in (("--models", args.models, PRESETS), ("--providers", args.providers, PROVIDERS)):
        unknown = [name for name in chosen or () if name not in known]
        if unknown:
            parser.error(f"{option}: unknown {unknown}; choose from {list(known)}")
    if args.baseline is not None and args.baseline not in PROVIDERS:
        parser.error(f"--baseline {args.baseline!r} is not a provider; choose from {list(PROVIDERS)}")
    return args


@dataclass
class Parallel:
    """This process's place in a torchrun launch; a lone process is rank 0 of 1."""

    mode: str  # "none", "tensor", "data" or "all"
    device: torch.device
    rank: int = 0
    world: int = 1
    group: Any = None

    @classmethod
    def start(cls, mode: str, device: str) -> Parallel:
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(mode, torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"))
        if mode == "none":
            raise SystemExit(f"started by torchrun with WORLD_SIZE={world}; pass --parallel tensor, data or all")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return cls(mode, device, dist.get_rank(), dist.get_world_size(), dist.group.WORLD)

    @property
    def build_mode(self) -> str:
        """What the providers are told: one rank runs unsharded whatever --parallel says."""
        return self.mode if self.world > 1 else "none"

    def max_over_ranks(self, values: Sequence[float | None]) -> list[float | None]:
        if self.world == 1:
            return list(values)
        lowest = float("-inf")
        tensor = torch.tensor([lowest if v is None else v for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return [None if v == lowest else v for v in tensor.tolist()]

    def same_weights(self, module: torch.nn.Module) -> None:
        """Rank 0's weights everywhere, so every rank's reference and shards come from one model."""
        if self.group is not None:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0, group=self.group)

    def stop(self) -> None:
        if self.group is not None:
            dist.destroy_process_group()

    def sweep(self) -> list[tuple[str, Parallel | None]]:
        """``--parallel all``: (label, this rank's view of it, or None when the configuration leaves it out) for
        TP1, TP2, TP4, ... and DP2, DP4, ..., each on ranks 0..n-1. Every rank creates every group, in one order,
        as NCCL requires of new_group."""
        sizes = sorted({2**k for k in range(self.world.bit_length()) if 2**k <= self.world} | {self.world})
        groups = {n: self.group if n == self.world else dist.new_group(list(range(n))) for n in sizes}
        configs: list[tuple[str, Parallel | None]] = []
        for mode, short in (("tensor", "tp"), ("data", "dp")):
            for n in sizes:
                if mode == "data" and n == 1:
                    continue  # DP1 is TP1
                view = None
                if self.rank < n:
                    view = Parallel(mode, self.device, self.rank, n, groups[n])
                configs.append((f"{short}{n}", view))
        return configs

    def waiting_group(self) -> Any:
        """A gloo group over every rank, where ranks outside a configuration wait for it without touching a GPU."""
        if self.group is None:
            return None
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA GeForce RTX 4090' -> 'rtx-4090', 'cpu' -> 'cpu'."""
    words = [w.lower() for w in name.replace("-", " ").split() if w.lower() not in ("nvidia", "geforce", "amd")]
    kept = []
    for word in words:
        if word.endswith("gb") or word.startswith(("sxm", "pcie", "hbm", "nvl")):
            break
        kept.append("".join(c for c in word if c.isalnum()))
    return "-".join(w for w in kept if w) or "device"


@dataclass
class Run:
    """What every measurement of the run shares."""

    args: argparse.Namespace
    par: Parallel
    dtype: torch.dtype
    peak_tflops: float | None
    cache_root: str | None
    console: Console
    progress: Progress
    task: Any
    config: str = ""  # --parallel all: the configuration measured ("tp2"), appended to provider names

    @property
    def device(self) -> torch.device:
        return self.par.device

    def name(self, provider: Provider) -> str:
        return f"{provider.name}@{self.config}" if self.config else provider.name

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0


def _row(spec: ModelSpec, provider: str, batch: int, status: str, reason: str | None = None) -> dict[str, Any]:
    return {
        "model": spec.name,
        "unit": spec.unit,
        "provider": provider,
        "batch": batch,
        "status": status,
        "reason": reason,
    }


def measure(
    run: Run,
    encoder: Any,
    inputs: torch.Tensor,
    reference: tuple[torch.Tensor | None, torch.Tensor],
    *,
    spec: ModelSpec,
    provider: str,
    flops: int,
    base_bytes: int,
    first_call_kind: str,
) -> dict[str, Any]:
    """One cell: the first call (checked against the fp32 reference), then the timed median."""
    batch = inputs.shape[0]

    def call() -> Any:
        return encoder(inputs)

    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    first_s, output = first_call(call)
    pooled, hidden = outputs_of(output)
    ref_pooled, ref_hidden = reference
    err_pooled = relative_error(pooled, ref_pooled[:batch]) if pooled is not None and ref_pooled is not None else None
    err_hidden = relative_error(hidden, ref_hidden[:batch])
    del output, pooled, hidden

    estimate_ms = median_ms(call, warmup=0, reps=2)
    # Ranks of a parallel run must make the same number of calls: their collectives pair up.
    estimate_ms = run.par.max_over_ranks([estimate_ms])[0]
    warmup = reps_for(estimate_ms, run.args.seconds / 4, at_least=1, at_most=20)
    reps = reps_for(estimate_ms, run.args.seconds, at_least=run.args.min_reps, at_most=run.args.max_reps)
    ms = median_ms(call, warmup=warmup, reps=reps)
    peak = (torch.cuda.max_memory_allocated(run.device) - base_bytes) / GIB if run.cuda else None
    ms, first_s, peak, err_pooled, err_hidden = run.par.max_over_ranks([ms, first_s, peak, err_pooled, err_hidden])

    tflops = flops * batch / (ms * 1e-3) / 1e12
    peak_tflops = run.peak_tflops * run.par.world if run.peak_tflops else None
    return {
        **_row(spec, provider, batch, "ok"),
        "ms": ms,
        "items_per_s": batch / (ms * 1e-3),
        "tflops": tflops,
        "peak_fraction": tflops / peak_tflops if peak_tflops else None,
        "first_call_s": first_s,
        "first_call_kind": first_call_kind,
        "peak_mem_gib": peak,
        "rel_err_pooled": err_pooled,
        "rel_err_hidden": err_hidden,
        "reps": reps,
        "warmup": warmup,
    }


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _release(provider: Provider) -> None:
    gc.collect()
    if provider.compiles:
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_provider(
    run: Run,
    spec: ModelSpec,
    provider: Provider,
    master: torch.nn.Module,
    inputs: torch.Tensor,
    reference: tuple[torch.Tensor | None, torch.Tensor],
    batch_sizes: Sequence[int],
) -> list[dict[str, Any]]:
    rows = []
    name = run.name(provider)
    flops = flops_per_sample(spec)
    reason = unavailable(provider, run.device, run.par.build_mode)
    if reason is not None:
        rows = [_row(spec, name, b, "skipped", reason) for b in batch_sizes]
        run.progress.advance(run.task, len(batch_sizes))
        return rows

    if provider.compiles and run.cache_root is not None:
        fresh_compile_caches(run.cache_root)
    _release(provider)
    base_bytes = run.allocated()
    context = BuildContext(
        spec=spec,
        master=master,
        dtype=run.dtype,
        device=run.device,
        batch_sizes=tuple(batch_sizes),
        parallel=run.par.build_mode,
        process_group=run.par.group,
        compile_dynamic=False if run.args.compile_static else None,
        compile_mode=run.args.compile_mode,
    )
    run.progress.update(run.task, description=f"{spec.name} · {name} · building")
    try:
        t0 = time.perf_counter()
        encoder = provider.build(context)
        synchronize()
        build_s = time.perf_counter() - t0
    except Exception as error:
        run.console.print(f"[red]{spec.name} {name}: building failed[/red]\n{traceback.format_exc()}")
        run.progress.advance(run.task, len(batch_sizes))
        return [_row(spec, name, b, "error", f"build: {_short(error)}") for b in batch_sizes]

    model_inputs = cast_inputs(inputs, run.dtype, run.device)
    first_call_kind = "build"
    for batch in batch_sizes:
        run.progress.update(run.task, description=f"{spec.name} · {name} · b{batch}")
        reason = batch_unsupported(provider, batch, run.par.build_mode, run.par.world)
        if reason is not None:
            rows.append(_row(spec, name, batch, "skipped", reason))
        else:
            try:
                with torch.inference_mode():
                    row = measure(
                        run,
                        encoder,
                        model_inputs[:batch],
                        reference,
                        spec=spec,
                        provider=name,
                        flops=flops,
                        base_bytes=base_bytes,
                        first_call_kind=first_call_kind,
                    )
                row["build_s"] = build_s
                rows.append(row)
                first_call_kind = "new batch size"
            except Exception as error:
                if isinstance(error, torch.OutOfMemoryError):
                    gc.collect()
                    torch.cuda.empty_cache()
                else:
                    run.console.print(f"[red]{spec.name} {name} b{batch} failed[/red]")
                    run.console.print(traceback.format_exc(limit=-4))
                rows.append(_row(spec, name, batch, "error", _short(error)))
        run.console.print(render.cell_line(rows[-1], spec.unit), highlight=False)
        run.progress.advance(run.task)
    del encoder
    _release(provider)
    return rows


def run_model(
    run: Run,
    spec: ModelSpec,
    providers: Sequence[Provider],
    batch_sizes: Sequence[int],
    configs: Sequence[tuple[str, Parallel | None]] = (),
    waiting: Any = None,
) -> list[dict]:
    """Every provider at every batch size; with ``configs`` (``--parallel all``), once per configuration this rank
    belongs to, the other ranks waiting on ``waiting`` until it is done."""
    run.progress.update(run.task, description=f"{spec.name} · fp32 reference")
    master = build_master(spec, run.device, seed=run.args.seed)
    run.par.same_weights(master)
    inputs = make_inputs(spec, max(batch_sizes), seed=run.args.seed)
    reference = reference_outputs(master, inputs)
    rows = []
    for config, view in configs or [("", run.par)]:
        if view is not None:
            measured = dataclasses.replace(run, par=view, config=config)
            for provider in providers:
                found = run_provider(measured, spec, provider, master, inputs, reference, batch_sizes)
                if config:
                    for row in found:
                        row.update(parallel=config, ranks=view.world)
                rows += found
        if waiting is not None:
            dist.barrier(group=waiting)
    del master, reference
    gc.collect()
    return rows


# ANCHORS.md's tensor-parallel targets: (configuration, batch, what, op, bound) as ratios to TP1.
TP_TARGETS = (
    ("tp2", 8, "latency", "<=", 0.65),
    ("tp4", 8, "latency", "<=", 0.45),
    ("tp2", 128, "throughput", ">=", 1.7),
)


def add_tp1_speedups(rows: list[dict[str, Any]]) -> None:
    """``--parallel all``: each row's ``vs_tp1``, TP1's time over its own for the same model, provider and batch
    (the latency ratio inverted, and the throughput ratio: the batch is the same)."""
    tp1 = {
        (r["model"], r["provider"].rpartition("@")[0], r["batch"]): r["ms"]
        for r in rows
        if r.get("parallel") == "tp1" and r["status"] == "ok"
    }
    for row in rows:
        base = tp1.get((row["model"], row["provider"].rpartition("@")[0], row["batch"]))
        row["vs_tp1"] = base / row["ms"] if base and row["status"] == "ok" else None


def parallel_table(rows: Sequence[dict[str, Any]], model: str, unit: str, names: Sequence[str]) -> Table:
    """``--parallel all``: latency, throughput and speedup over TP1, per provider@configuration and batch size."""
    mine = {(r["provider"], r["batch"]): r for r in rows if r["model"] == model}
    batches = sorted({batch for _, batch in mine})
    table = Table(
        title=f"{model}: ms · {unit}/s · speedup over TP1",
        caption="speedup: TP1's time over this one, same provider and batch",
        title_justify="left",
    )
    table.add_column("provider@config")
    for batch in batches:
        table.add_column(f"b{batch}", justify="right")
    for name in names:
        cells = []
        for batch in batches:
            row = mine.get((name, batch))
            if row is None or row["status"] != "ok":
                cells.append(f"[dim]{row['status'] if row else '-'}[/dim]")
                continue
            speedup = "-" if row["vs_tp1"] is None else f"{row['vs_tp1']:.2f}x"
            cells.append(f"{render.number(row['ms'])} ms · {render.number(row['items_per_s'])}/s · {speedup}")
        table.add_row(name, *cells)
    return table


def tp_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """ANCHORS.md's tensor-parallel targets this run has data for, by the provider closest to each bound."""
    checks = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for config, batch, what, op, bound in TP_TARGETS:
            found = [
                r
                for r in rows
                if r["model"] == model and r.get("parallel") == config and r["batch"] == batch and r["vs_tp1"]
            ]
            if not found:
                continue
            best = max(found, key=lambda r: r["vs_tp1"])
            value = 1 / best["vs_tp1"] if what == "latency" else best["vs_tp1"]
            checks.append(
                {
                    "target": f"{model} b{batch} {config.upper()} {what} / TP1",
                    "value": value,
                    "bound": f"{op} {bound}",
                    "met": value <= bound if op == "<=" else value >= bound,
                    "provider": best["provider"],
                }
            )
    return checks


def topology() -> str | None:
    """``nvidia-smi topo -m`` (how the GPUs connect), or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi topo -m failed: {error}"
    return done.stdout if done.returncode == 0 else f"nvidia-smi topo -m exited {done.returncode}: {done.stderr}"


def model_table(specs: Sequence[ModelSpec]) -> tuple[Table, dict[str, Any]]:
    """The FLOPs each model is credited with, checked against ANCHORS.md where it gives a count."""
    table = Table(
        title="FLOPs per sample", caption="2 per multiply-add: patch conv, linears, QK^T, PV", title_justify="left"
    )
    for name in ("model", "tower", "tokens", "GFLOP", "ANCHORS.md", "check"):
        table.add_column(name, justify="left" if name in ("model", "tower", "check") else "right")
    models = {}
    for spec in specs:
        config = spec.make_config()
        gflop = flops_per_sample(spec) / 1e9
        match = None if spec.anchor_gflop is None else abs(gflop - spec.anchor_gflop) < 0.05
        check = {None: "", True: "[green]matches[/green]", False: "[red]DIFFERS[/red]"}[match]
        anchor = "" if spec.anchor_gflop is None else f"{spec.anchor_gflop:.1f}"
        tokens = tokens_per_sample(config, spec)
        shown = f"{gflop:.1f}" if gflop >= 1 else render.number(gflop)
        table.add_row(spec.name, spec.tower, str(tokens), shown, anchor, check)
        models[spec.name] = {
            "tower": spec.tower,
            "unit": spec.unit,
            "hf_class": spec.model_class.__name__,
            "tokens": tokens,
            "gflop_per_sample": gflop,
            "anchor_gflop": spec.anchor_gflop,
            "flops_match_anchor": match,
            "config": {k: getattr(config, k, None) for k in _CONFIG_FIELDS if getattr(config, k, None) is not None},
        }
    return table, models


_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "max_position_embeddings",
    "vocab_size",
    "hidden_act",
    "layer_norm_eps",
)


def environment(par: Parallel, peak_tflops: float | None, matmul_size: int, dtype: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "versions": versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "matmul_peak_tflops": peak_tflops,
        "matmul": f"{matmul_size}^3 {dtype}",
    }
    if par.device.type == "cuda":
        properties = torch.cuda.get_device_properties(par.device)
        env["gpu"] = {
            "name": properties.name,
            "memory_gib": round(properties.total_memory / GIB, 1),
            "multiprocessors": properties.multi_processor_count,
            "capability": f"{properties.major}.{properties.minor}",
            "count": par.world,
            "visible": torch.cuda.device_count(),
        }
        env["nvidia_smi_topo"] = topology()
    return env


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, spec in PRESETS.items():
            print(f"model     {name:<20} {spec.tower:<6} {render.number(flops_per_sample(spec) / 1e9):>8} GFLOP/sample")
        for name, provider in PROVIDERS.items():
            print(f"provider  {name:<20} {provider.description}")
        return 0

    par = Parallel.start(args.parallel, args.device)
    on_gpu = par.device.type == "cuda"
    smoke = not on_gpu
    specs = [PRESETS[name] for name in (args.models or (GPU_MODELS if on_gpu else CPU_MODELS))]
    batch_sizes = args.batch_sizes or list(GPU_BATCH_SIZES if on_gpu else CPU_BATCH_SIZES)
    provider_names = args.providers or [
        name
        for name in (GPU_PROVIDERS if on_gpu else CPU_PROVIDERS)
        if par.mode not in ("tensor", "all") or PROVIDERS[name].shards
    ]
    if args.skip_compile:
        provider_names = [name for name in provider_names if name != "hf-compile"]
    providers = [PROVIDERS[name] for name in provider_names]
    configs = par.sweep() if par.mode == "all" else []
    waiting = par.waiting_group() if configs else None
    # What the rows are named: provider@configuration under --parallel all.
    row_names = [f"{name}@{config}" for name in provider_names for config, _ in configs] or provider_names
    if args.baseline is None:
        args.baseline = BASELINE if BASELINE in provider_names else "hf-sdpa"
        if configs:
            args.baseline = f"{provider_names[0]}@tp1"
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = DTYPES[dtype_name]
    args.seconds = args.seconds if args.seconds is not None else (0.5 if on_gpu else 0.05)
    matmul_size = args.matmul_size or (8192 if on_gpu else 1024)
    # One thread keeps a smoke run quick on a small, shared machine, where OpenMP threads spin against each other.
    threads = args.threads or (None if on_gpu else 1)
    if threads:
        torch.set_num_threads(threads)

    console = Console(quiet=par.rank != 0, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
    device_name = gpu_name() if on_gpu else "cpu"
    kind = "CPU smoke run: eager path, not a performance measurement" if smoke else device_name
    console.rule(f"vitriton encoder benchmark · {kind}")
    console.print(
        f"dtype {dtype_name} · batch sizes {batch_sizes} · providers {provider_names}"
        f" · parallel {par.mode} x{par.world} · " + " ".join(f"{k} {v}" for k, v in versions().items())
    )
    flops_table, models = model_table(specs)
    console.print(flops_table)

    with torch.inference_mode():
        peak_tflops = matmul_tflops(matmul_size, dtype, par.device, seconds=1.0 if on_gpu else 0.2)
    peak_tflops = par.max_over_ranks([peak_tflops])[0]
    console.print(f"matmul {matmul_size}^3 {dtype_name}: {render.number(peak_tflops)} TFLOP/s (the peak)")

    cache_root = None if args.warm_caches else tempfile.mkdtemp(prefix="vitriton-bench-")
    started = time.time()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    rows: list[dict[str, Any]] = []
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            cells = len(specs) * len(providers) * len(batch_sizes) * max(len(configs), 1)
            task = progress.add_task("starting", total=cells)
            run = Run(args, par, dtype, peak_tflops, cache_root, console, progress, task)
            for spec in specs:
                rows += run_model(run, spec, providers, batch_sizes, configs, waiting)
    finally:
        if cache_root is not None:
            shutil.rmtree(cache_root, ignore_errors=True)
    wall_s = time.time() - started

    render.add_baseline_ratios(rows, args.baseline)
    checks = render.check_targets(rows, args.baseline) if not smoke else []
    if configs:
        add_tp1_speedups(rows)
        checks = tp_targets(rows)
    title = f"{'CPU smoke run (eager path)' if smoke else device_name} · {dtype_name}"
    if configs:
        title += f" · {', '.join(config.upper() for config, _ in configs)} of {par.world} ranks"
    elif par.world > 1:
        title += f" · {par.mode} parallel x{par.world}"
    console.print(render.detail_table(rows, args.baseline, title))
    for spec in specs:
        if configs:
            console.print(parallel_table(rows, spec.name, spec.unit, row_names))
        else:
            console.print(render.summary_table(rows, spec.name, spec.unit, row_names, args.baseline))
    if checks and not smoke:
        console.print(render.targets_table(checks))

    if par.rank == 0:
        slug = "cpu" if smoke else device_slug(device_name) + (f"x{par.world}" if par.world > 1 else "")
        out = args.out or RESULTS / slug
        out.mkdir(parents=True, exist_ok=True)
        stem = f"encoders_{dtype_name}"
        if configs:
            stem += f"_parallel{par.world}"
        elif par.build_mode != "none":
            stem += f"_{par.mode[0]}p{par.world}"
        meta = {
            "title": title,
            "smoke": smoke,
            "device": device_name,
            "dtype": dtype_name,
            "threads": torch.get_num_threads(),
            "parallel": {"mode": par.mode, "world_size": par.world, "configs": [config for config, _ in configs]},
            "batch_sizes": batch_sizes,
            "providers": {name: PROVIDERS[name].description for name in provider_names},
            "baseline": args.baseline,
            "compile": {"dynamic": False if args.compile_static else None, "mode": args.compile_mode},
            "cold_caches": not args.warm_caches,
            "seconds_per_cell": args.seconds,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": wall_s,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "environment": environment(par, peak_tflops, matmul_size, dtype_name),
            "targets": checks,
        }
        render.write_json(out / f"{stem}.json", meta, models, rows)
        render.write_csv(out / f"{stem}.csv", rows)
        units = {spec.name: spec.unit for spec in specs}
        render.write_plot(out / f"{stem}.png", rows, units, row_names, title)
        topo = meta["environment"].get("nvidia_smi_topo")
        if topo:
            (out / f"{stem}_topo.txt").write_text(topo)
        console.print(f"{len(rows)} cells in {wall_s:.0f} s; wrote {out}/{stem}.{{json,csv,png}}")
    par.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
