"""Host work of a tower's automatic CUDA graphs around a replay, plain and compiled, on the CPU (no GPU needed).

    python3 -m benchmarks.bench_graph_host [--layers 24] [--calls 400] [--backend inductor] [--profile 30]

A batch-1 call that replays from a graph costs the GPU's replay plus the host work before the replay is launched
(the plain call's checks, and under torch.compile its guards and wrappers), so that work is what separates plain
from compiled calls, and both from explicit graphs, at batch 1. Here the graphs are the CPU tests' fakes (a replay
returns the captured call's outputs), on a CLIP vision tower of ``layers`` layers at a tiny width, so only the
host's Python is timed. Rows: microseconds from the call to the replay's launch, and to the call's return
(medians), for the plain call and the compiled one, then the automatic graphs' checks one by one, each also timed
inside the calls (the address check as the plain and the compiled call run it). Last, torch.compile's floor: the
same timing of a module whose forward is one opaque op that returns two small tensors, so what the compiled call
costs on this host with nothing of vitriton in it. ``--profile N``: the N functions with the most own time over
the compiled calls (cProfile), where torch.compile's wrappers show.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
import timeit
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

import torch  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

import vitriton  # noqa: E402
from tests.test_graphs import _FakeRunner  # noqa: E402
from vitriton.graphs import AutoGraphs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor needs a C++ compiler)")
    parser.add_argument("--profile", type=int, default=0, help="print this many functions of the compiled calls")
    args = parser.parse_args()
    AutoGraphs.device_type, AutoGraphs.runner_cls = "cpu", _FakeRunner
    launched = [0.0]
    replay = _FakeRunner.replay

    def timed_replay(self, *a, **k):
        launched[0] = time.perf_counter()
        return replay(self, *a, **k)

    _FakeRunner.replay = timed_replay
    inside = []  # the address check's time within each call
    unchanged = AutoGraphs._unchanged

    def timed_unchanged(self):
        start = time.perf_counter()
        result = unchanged(self)
        inside.append(time.perf_counter() - start)
        return result

    AutoGraphs._unchanged = timed_unchanged
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=2, image_size=32,
        patch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = vitriton.from_transformers(CLIPVisionModel(config).eval(), device="cpu")
    compiled = torch.compile(model, fullgraph=True, backend=args.backend)
    pixels = torch.randn(1, 3, 32, 32)
    print(f"torch {torch.__version__} · CLIP vision tower of {args.layers} layers · medians of {args.calls} calls")
    with torch.inference_mode():
        for name, call in (("plain", model), ("compiled", compiled)):
            for _ in range(20):
                call(pixels)  # captured, compiled
            before, total = [], []
            inside.clear()
            for _ in range(args.calls):
                start = time.perf_counter()
                call(pixels)
                total.append(time.perf_counter() - start)
                before.append(launched[0] - start)
            print(f"{name:<9} to the replay {statistics.median(before) * 1e6:7.1f} us   "
                  f"whole call {statistics.median(total) * 1e6:7.1f} us   "
                  f"address check inside {statistics.median(inside) * 1e6:5.1f} us")  # fmt: skip
        AutoGraphs._unchanged = unchanged
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(lambda: [compiled(pixels) for _ in range(args.calls)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
        tower, graphs = model.vision_model, model.vision_model.auto_graphs
        forward = type(tower).forward.__wrapped__  # the undecorated forward, as the graphs call it
        call = graphs._runner.bind((pixels,), {})
        checks = {
            "addresses (steady state)": graphs._unchanged,
            "bind": lambda: graphs._runner.bind((pixels,), {}),
            "graph key": lambda: graphs._runner.key(call.batch, call),
            "plan (all of the above)": lambda: graphs._plan(tower, forward, (pixels,), {}),
            "after the launch (hooks, structure)": lambda: graphs._unsafe(tower),
        }
        for name, check in checks.items():
            print(f"  {name:<36} {timeit.timeit(check, number=args.calls * 10) / (args.calls * 10) * 1e6:7.1f} us")
        floor = _OneOp()
        times = [_median_us(call, pixels, args.calls) for call in (floor, torch.compile(floor, fullgraph=True))]
        print(f"floor (a module of one opaque op)  plain {times[0]:6.1f} us   compiled {times[1]:6.1f} us   "
              f"torch.compile adds {times[1] - times[0]:6.1f} us")  # fmt: skip


def _median_us(call, pixels: torch.Tensor, calls: int) -> float:
    for _ in range(20):
        call(pixels)  # compiled
    total = []
    for _ in range(calls):
        start = time.perf_counter()
        call(pixels)
        total.append(time.perf_counter() - start)
    return statistics.median(total) * 1e6


_FLOOR = torch.library.Library("vitriton_bench", "FRAGMENT")
_FLOOR.define("two(Tensor x) -> Tensor[]")
_FLOOR.impl("two", lambda x: [x.new_zeros(1, 4, 8), x.new_zeros(1, 8)], "CompositeExplicitAutograd")
torch.library.register_fake("vitriton_bench::two", lambda x: [x.new_empty(1, 4, 8), x.new_empty(1, 8)], lib=_FLOOR)


class _OneOp(torch.nn.Module):
    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return torch.ops.vitriton_bench.two(pixels)


if __name__ == "__main__":
    main()
