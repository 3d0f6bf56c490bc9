"""Encode random images with a checkpoint's vision tower across the ranks torchrun starts.

    torchrun --nproc_per_node 2 examples/tp_encode.py path/to/checkpoint [--parallel data] [--batch 8]

NCCL on GPUs, gloo on CPU. Every rank gets the full output; rank 0 prints its shape and norm, which
matches a run with one process (``--nproc_per_node 1``) to rounding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vitriton  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--parallel", choices=["tensor", "data"], default="tensor")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    args = parser.parse_args()

    group = vitriton.init_distributed()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = vitriton.from_pretrained(args.checkpoint, tower="vision", dtype=dtype, parallel=args.parallel)
    config = model.config
    device = model.vision_model.post_layernorm.weight.device
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, config.num_channels, config.image_size, config.image_size, generator=generator)
    pixels = pixels.to(device)
    with torch.inference_mode():
        out = model(pixels)
    rank = dist.get_rank() if group is not None else 0
    world = dist.get_world_size() if group is not None else 1
    if rank == 0:
        pooled = out.pooler_output.float()
        print(
            f"world size {world}, parallel={args.parallel}: pooler_output {tuple(pooled.shape)}, "
            f"norm {pooled.norm().item():.6f}"
        )
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
