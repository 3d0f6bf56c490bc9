"""Where the host time of a batch-1 forward goes: wall ms per plain call, then cProfile's top functions.

    python3 benchmarks/profile_host.py [--models siglip-so400m-384 clip-text-l14] [--top 25]

A batch-1 forward launches a few hundred small kernels; when the host is slower than the GPU, the wall time
is the host's. This runs each preset (random weights, bf16) plainly after warm-up and prints the profile of
20 calls sorted by own time, so the functions that cost the most per forward come first.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

from benchmarks.common import synchronize  # noqa: E402
from benchmarks.models import PRESETS, build_master, cast_inputs, make_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["siglip-so400m-384", "clip-text-l14"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    import vitriton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in args.models:
        spec = PRESETS[name]
        model = vitriton.from_transformers(build_master(spec, device), dtype=torch.bfloat16, device=device)
        inputs = cast_inputs(make_inputs(spec, 1), torch.bfloat16, device)
        with torch.inference_mode():
            for _ in range(5):
                model(inputs)
            synchronize()
            start = time.perf_counter()
            for _ in range(args.calls):
                model(inputs)
            synchronize()
            wall = (time.perf_counter() - start) / args.calls * 1e3
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                model(inputs)
            synchronize()
            profiler.disable()
        print(f"\n{name} b1: {wall:.2f} ms per plain call (profile below: {args.calls} calls)")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None


if __name__ == "__main__":
    main()
