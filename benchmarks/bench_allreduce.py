"""The all-reduce of a tensor-parallel layer: NCCL against torch's symmetric-memory kernels, per message size.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.bench_allreduce

Every row is one all-reduce of a (batch, tokens, hidden) bf16 activation as the encoders issue it after
out_proj and fc2, summed over all ranks. Candidates (multicast stays off, so no ``multimem_*`` op):
  nccl          ``dist.all_reduce`` in place
  one-shot      ``symm_mem.one_shot_all_reduce``: each rank reads every peer's buffer over NVLink and sums
  one-shot+copy the same, the input first copied into the symmetric buffer (what a layer would pay)
  two-shot      ``symm_mem.two_shot_all_reduce_``: reduce-scatter then all-gather through peer memory
Each cell is the mean microseconds of 20 back-to-back calls replayed from one CUDA graph (no host cost),
median of 5 replays; a wrong sum (against NCCL's) marks the cell "wrong". Rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

from benchmarks.models import PRESETS, tokens_per_sample

CALLS = 20


def shapes(models: list[str], batches: list[int]) -> list[tuple[str, tuple[int, int, int]]]:
    rows = []
    for name in models:
        spec = PRESETS[name]
        config = spec.make_config()
        config = getattr(config, "vision_config", config)
        shape = tokens_per_sample(config, spec), config.hidden_size
        rows += [(f"{name} b{b}", (b, *shape)) for b in batches]
    return rows


def candidates(local: torch.Tensor, symm: torch.Tensor, nccl: torch.Tensor, group: str) -> dict:
    """name -> (the all-reduce, a function returning its result given the op's return value)."""
    ops = torch.ops.symm_mem
    return {
        "nccl": (lambda: dist.all_reduce(nccl), lambda _: nccl),
        "one-shot": (lambda: ops.one_shot_all_reduce(symm, "sum", group), lambda out: out),
        "one-shot+copy": (lambda: ops.one_shot_all_reduce(symm.copy_(local), "sum", group), lambda out: out),
        "two-shot": (lambda: ops.two_shot_all_reduce_(symm, "sum", group), lambda _: symm),
    }


def graph_us(op, out: torch.Tensor) -> float:
    """Mean microseconds per call of ``op`` from a graph of CALLS calls, median over 5 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op()  # warm-up outside the capture (NCCL and symm_mem set up lazily)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            op()
    times = []
    for _ in range(5):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    del graph
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["clip-vit-l14-336", "siglip-so400m-384"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 128])
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    group = dist.group.WORLD.group_name
    rows = shapes(args.models, args.batch_sizes)
    largest = max(b * s * h for _, (b, s, h) in rows)
    buffer = symm_mem.empty(largest, dtype=torch.bfloat16, device="cuda")
    symm_mem.rendezvous(buffer, group)
    names = ("nccl", "one-shot", "one-shot+copy", "two-shot")
    header = f"{'message':<28} {'MB':>6} " + " ".join(f"{name:>14}" for name in names)
    if rank == 0:
        print(f"{world} ranks, {torch.cuda.get_device_name()}, torch {torch.__version__}\n{header}", flush=True)
    for label, shape in rows:
        numel = shape[0] * shape[1] * shape[2]
        gen = torch.Generator(device="cuda").manual_seed(rank)
        local = torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16)
        expected = local.clone()
        dist.all_reduce(expected)
        symm = buffer[:numel].view(shape)
        nccl_in = local.clone()
        cells = []
        for name, (op, result) in candidates(local, symm, nccl_in, group).items():
            try:
                symm.copy_(local)
                nccl_in.copy_(local)
                out = op()
                got = result(out)
                ok = torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * world)
                us = graph_us(op, got)
                cells.append(f"{us:>14.1f}" if ok else f"{'wrong':>14}")
            except Exception as error:  # noqa: BLE001 - an op this build lacks is a cell, not a crash
                cells.append(f"{type(error).__name__[:14]:>14}")
                if rank == 0:
                    print(f"  {name}: {str(error).splitlines()[0][:150]}", flush=True)
        if rank == 0:
            print(f"{label:<28} {numel * 2 / 1e6:>6.1f} " + " ".join(cells), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
