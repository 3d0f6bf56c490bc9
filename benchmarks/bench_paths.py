"""Whole-model A/B of the per-shape path choices, all variants in one process (GPU only).

    python3 -m benchmarks.bench_paths [--models clip-vit-l14-336 ...] [--batch-sizes 1 8 128]

The kernels pick a path per call from thresholds measured kernel by kernel (``bench_gemm``,
``bench_attention``); this times what the choice does to a whole vitriton forward, where the layouts meet
(the packed q/k/v views make the attention read strided rows):
  qkv      triton: the head-split Triton projection at every M; packed: cuBLAS into the packed layout at every M
           (packed-qkv alone: at every M, the other choices as they are)
  linear   persistent: the persistent TMA kernel at every M (the default); tiled: one program per tile
  tma      default: TMA descriptors from TMA_MIN_ROWS rows (plain loads below: cheaper to launch); all: at every M
Each cell is the median ms of plain calls (CUDA events); ratios are against triton-qkv/tiled. Small calls replay
from automatic CUDA graphs captured afresh for each variant, so batch 1 and 8 compare the GPU's time.
"""

from __future__ import annotations

import argparse

import torch

import vitriton
import vitriton.kernels._matmul as matmul_module
import vitriton.kernels.linear as linear_module
import vitriton.kernels.qkv as qkv_module
from benchmarks.common import median_ms
from benchmarks.models import PRESETS, build_master, cast_inputs, make_inputs

NEVER = 1 << 62
DEFAULTS = qkv_module.PACKED_MIN_ROWS, linear_module.PERSISTENT_MIN_ROWS, matmul_module.TMA_MIN_ROWS
# variant -> (qkv.PACKED_MIN_ROWS, linear.PERSISTENT_MIN_ROWS, _matmul.TMA_MIN_ROWS)
VARIANTS = {
    "packed-qkv": (1, DEFAULTS[1], DEFAULTS[2]),
    "triton-qkv/persistent": (NEVER, 1, DEFAULTS[2]),
    "packed-qkv/persistent": (1, 1, DEFAULTS[2]),
    "packed-qkv/tiled": (1, NEVER, DEFAULTS[2]),
    "triton-qkv/tiled": (NEVER, NEVER, DEFAULTS[2]),
    "default/tma-all": (DEFAULTS[0], DEFAULTS[1], 1),
    "default": DEFAULTS,
}


def use(variant: tuple[int, int, int]) -> None:
    qkv_module.PACKED_MIN_ROWS, linear_module.PERSISTENT_MIN_ROWS, matmul_module.TMA_MIN_ROWS = variant
    linear_module.PLANS.clear()  # a plan records its kernel and descriptors: re-plan under this variant's rule
    qkv_module.PLANS.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["clip-vit-l14-336", "siglip-so400m-384", "clip-vit-b16-224"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 128])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_paths times GPU paths; it needs a CUDA device")
    print(f"{'model':<22} {'b':>4} " + " ".join(f"{v:>22}" for v in VARIANTS))
    try:
        for name in args.models:
            spec = PRESETS[name]
            model = vitriton.from_transformers(build_master(spec, "cuda"), dtype=torch.bfloat16, device="cuda")
            for batch in args.batch_sizes:
                x = cast_inputs(make_inputs(spec, batch), torch.bfloat16, "cuda")
                ms = {}
                for variant, values in VARIANTS.items():
                    use(values)
                    vitriton.enable_cuda_graphs(model, "auto")  # small calls capture this variant's kernels afresh
                    with torch.inference_mode():
                        ms[variant] = median_ms(
                            lambda model=model, x=x: model(x), warmup=3, reps=10 if batch >= 32 else 30
                        )
                base = ms["triton-qkv/tiled"]
                cells = " ".join(f"{ms[v]:>10.3f} ({base / ms[v]:.2f}x)" for v in VARIANTS)
                print(f"{name:<22} {batch:>4} {cells}", flush=True)
            del model
            torch.cuda.empty_cache()
    finally:
        use(DEFAULTS)


if __name__ == "__main__":
    main()
