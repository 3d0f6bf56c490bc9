"""Tensor parallelism with and without its all-reduces overlapped over batch slices (``Encoder.chunks``), with the
encoder layers' reduces through NCCL or through symmetric memory (``vitriton.parallel.symmetric``).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python3 -m torch.distributed.run --standalone --nproc-per-node 4 -m benchmarks.bench_overlap \\
        --models clip-vit-l14-336 siglip-so400m-384

For TP2 (ranks 0 and 1; the others wait at a barrier) and TP over every rank: batch 8 under CUDA graphs and
batch 128 plain, with ``chunks=1`` (each all-reduce waited for where it is issued) and ``chunks=2`` (the
default from batch 2: one slice's reduces run on a communication stream while the other slice's GEMMs run), each
with every reduce on NCCL ("nccl", the default) and with the small ones through symmetric memory ("symm", opt-in;
messages over ``symmetric.CAPACITY`` go to NCCL either way; one group per process gets symmetric memory, so run
TP4 alone to measure it there). Rank 0 prints the median ms of each (CUDA events).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import vitriton
from benchmarks.common import median_ms
from benchmarks.models import PRESETS, build_master, cast_inputs, make_inputs
from vitriton.encoders.trunk import Encoder
from vitriton.parallel import symmetric


def time_chunks(model: torch.nn.Module, spec, chunks: int, path: str) -> dict[str, float]:
    for encoder in (m for m in model.modules() if isinstance(m, Encoder)):
        encoder.chunks = chunks
    x8 = cast_inputs(make_inputs(spec, 8), torch.bfloat16, "cuda")
    runner = vitriton.CUDAGraphRunner(model, batch_sizes=(8,))
    with torch.inference_mode():
        graphs = median_ms(lambda: runner(x8), warmup=3, reps=30)
        runner.reset()  # frees the captured graphs before the batch-128 calls
        x128 = cast_inputs(make_inputs(spec, 128), torch.bfloat16, "cuda")
        plain = median_ms(lambda: model(x128), warmup=2, reps=8)
    return {f"b8 graphs c{chunks} {path}": graphs, f"b128 plain c{chunks} {path}": plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["clip-vit-l14-336", "siglip-so400m-384"])
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    configs = {"TP2": ([0, 1], dist.new_group([0, 1])), f"TP{world}": (list(range(world)), dist.group.WORLD)}
    for name in args.models:
        spec = PRESETS[name]
        master = build_master(spec, "cuda")
        for label, (members, group) in configs.items():
            if rank in members:
                model = vitriton.from_transformers(
                    master, dtype=torch.bfloat16, device="cuda", process_group=group, parallel="tensor"
                )
                ms = {}
                for path in ("nccl", "symm"):
                    symmetric.ENABLED = path == "symm"
                    for chunks in (1, 2):
                        ms.update(time_chunks(model, spec, chunks, path))
                symmetric.ENABLED = False
                if rank == 0:
                    print(name, label, " ".join(f"{k}={v:.3f}ms" for k, v in ms.items()), flush=True)
                del model
                torch.cuda.empty_cache()
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
