"""Interleaved A/B of providers at one batch size (GPU only): round after round, every provider times a run of
plain calls, so drifts of the host and the GPU's clocks fall on all of them alike.

    python3 -m benchmarks.bench_ab --models clip-vit-l14-336 clip-text-l14 --providers vitriton vitriton-compile \
        [--batch 1] [--rounds 12] [--calls 25]

Each call is timed from its start to the end of its GPU work (CUDA events, a sync after each call, as the
report times them), so host work before the first launch counts. Per provider: the median over rounds of each
round's median, the spread of those round medians, and the ratio against the first provider.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import median_ms
from benchmarks.models import PRESETS, PROVIDERS, BuildContext, build_master, cast_inputs, make_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["clip-vit-l14-336", "clip-text-l14"])
    parser.add_argument("--providers", nargs="+", default=["vitriton", "vitriton-compile"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=25)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_ab times GPU calls; it needs a CUDA device")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · batch {args.batch} · "
          f"{args.rounds} rounds of {args.calls} calls")  # fmt: skip
    for name in args.models:
        spec = PRESETS[name]
        master = build_master(spec, device)
        ctx = BuildContext(spec, master, torch.bfloat16, device, (args.batch,))
        inputs = cast_inputs(make_inputs(spec, args.batch), torch.bfloat16, device)
        calls = {}
        with torch.inference_mode():
            for provider in args.providers:
                encoder = PROVIDERS[provider].build(ctx)
                calls[provider] = lambda encoder=encoder, inputs=inputs: encoder(inputs)
                median_ms(calls[provider], warmup=5, reps=3)  # compiles, captures its graphs
            rounds = {provider: [] for provider in args.providers}
            for _ in range(args.rounds):
                for provider, call in calls.items():
                    rounds[provider].append(median_ms(call, warmup=2, reps=args.calls))
        first = statistics.median(rounds[args.providers[0]])
        for provider, times in rounds.items():
            ms = statistics.median(times)
            print(f"{name:<20} b{args.batch:<4} {provider:<20} {ms:8.3f} ms  rounds {min(times):.3f}-{max(times):.3f}"
                  f"  x{ms / first:.3f} of {args.providers[0]}")  # fmt: skip
        del calls, master
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
