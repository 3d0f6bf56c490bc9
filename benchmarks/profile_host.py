"""Where the time of a batch-1 forward goes, for vitriton and transformers (sdpa) side by side.

    python3 benchmarks/profile_host.py [--models siglip-so400m-384 clip-text-l14] [--top 15] [--calls 30]
        [--profile vitriton-nographs | vitriton | vitriton-graphs | vitriton-compile ...]

A batch-1 forward launches a few hundred small kernels; when the host is slower than the GPU, the wall time
is the host's. For each preset (random weights, bf16) and provider this prints, as medians over ``calls``
plain calls after warm-up:
  wall     device-synchronised wall time of one call
  enqueue  the host's time to return from the call (the GPU still running), i.e. the cost of launching it
  gpu      device time of the kernels (torch.profiler, one call), and their count
When enqueue is close to wall, the call is host-bound and only fewer or cheaper launches make it faster.
Then the cProfile of each named provider's calls (``--profile``: launched from Python, the automatic or explicit
graphs' host work around a replay, or the model compiled as loaded), sorted by own time, so the functions that
cost the most come first.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

from benchmarks.common import synchronize  # noqa: E402
from benchmarks.models import PRESETS, build_master, cast_inputs, make_inputs  # noqa: E402


def host_times(fn, calls: int) -> tuple[float, float]:
    """(wall ms, enqueue ms): medians over ``calls`` calls, each started on an idle device."""
    walls, enqueues = [], []
    for _ in range(calls):
        synchronize()
        start = time.perf_counter()
        fn()
        returned = time.perf_counter()
        synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
        enqueues.append((returned - start) * 1e3)
    return statistics.median(walls), statistics.median(enqueues)


def kernel_time(fn) -> tuple[float, int]:
    """(device ms, kernel count) of one call, from torch.profiler's device events."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        synchronize()
    kernels = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e3, len(kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["siglip-so400m-384", "clip-text-l14"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument(
        "--profile",
        nargs="+",
        choices=("vitriton-nographs", "vitriton", "vitriton-graphs", "vitriton-compile"),
        default=["vitriton-nographs"],
        help="whose calls cProfile records: every launch from Python, the host work around a graph replay, or "
        "a compiled call of the model as loaded",
    )
    args = parser.parse_args()
    import vitriton

    if not torch.cuda.is_available():
        raise SystemExit("profile_host measures GPU launches; it needs a CUDA device")
    rows, profiles = [], {}
    for name in args.models:
        spec = PRESETS[name]
        master = build_master(spec, "cuda")
        inputs = cast_inputs(make_inputs(spec, 1), torch.bfloat16, "cuda")
        hf = master.to(torch.bfloat16)
        hf.set_attn_implementation("sdpa")
        models = {
            "vitriton-nographs": vitriton.from_transformers(
                master, dtype=torch.bfloat16, device="cuda", cuda_graphs=False
            ),
            "vitriton": vitriton.from_transformers(master, dtype=torch.bfloat16, device="cuda"),  # automatic graphs
            "vitriton-graphs": vitriton.from_transformers(
                master, dtype=torch.bfloat16, device="cuda", cuda_graphs=True
            ),
            "hf-sdpa": hf,
        }
        if "vitriton-compile" in args.profile:  # its towers run as one op each (vitriton.graphs.compiled_call)
            loaded = vitriton.from_transformers(master, dtype=torch.bfloat16, device="cuda")
            models["vitriton-compile"] = torch.compile(loaded, fullgraph=True)
        with torch.inference_mode():
            for provider, model in models.items():
                fn = lambda model=model, inputs=inputs: model(inputs)  # noqa: E731
                for _ in range(5):
                    fn()
                wall, enqueue = host_times(fn, args.calls)
                gpu, kernels = kernel_time(fn)
                rows.append((name, provider, wall, enqueue, gpu, kernels))
                print(
                    f"{name:<20} {provider:<17} wall {wall:6.2f} ms  enqueue {enqueue:6.2f}  gpu {gpu:5.2f} "
                    f"({kernels} kernels)",
                    flush=True,
                )
            for provider in args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(args.calls):
                    models[provider](inputs)
                synchronize()
                profiler.disable()
                profiles[name, provider] = profiler
        del models, hf, master
        torch.cuda.empty_cache()
    for (name, provider), profiler in profiles.items():
        print(f"\n{name} b1, {provider}: cProfile of {args.calls} calls")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
    header = f"{'model':<20} {'provider':<17} {'wall ms':>8} {'enqueue':>8} {'gpu ms':>7} {'kernels':>8}"
    print(f"\n{header} {'enqueue/kernel us':>18}")
    for name, provider, wall, enqueue, gpu, kernels in rows:
        print(
            f"{name:<20} {provider:<17} {wall:8.2f} {enqueue:8.2f} {gpu:7.2f} {kernels:8d} "
            f"{enqueue / kernels * 1e3:18.1f}"
        )


if __name__ == "__main__":
    main()
