"""Four ranks, two groups, one process each (run by tests/parallel/test_nccl.py under torchrun, NCCL).

Ranks 0 and 1 first reduce over the subgroup [0, 1] through symmetric memory; then all four reduce over the world
group, then both groups again. A rendezvous over the world group hung here when ranks 0 and 1 already held
buffers of the subgroup, so ``vitriton.parallel.symmetric`` gives symmetric memory to one group per process: the
world group must agree on NCCL and every sum must be right. Rank r contributes r + 1. Exit status 1 on a wrong
sum or path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for vitriton

from vitriton.parallel import symmetric  # noqa: E402

SHAPE = (8, 577, 1024)  # ViT-L/14-336 at batch 8: 9.5 MB in bf16, within symmetric.CAPACITY


def reduce(group, device: torch.device) -> tuple[bool, bool]:
    """(sum right, went through symmetric memory) for one all-reduce over ``group``."""
    buffers = symmetric.buffers_for(group, SHAPE, torch.bfloat16, device)
    if buffers is None:
        out = torch.empty(SHAPE, dtype=torch.bfloat16, device=device)
    else:
        out = buffers.take(SHAPE, torch.bfloat16)
    out.fill_(dist.get_rank() + 1)
    if buffers is None:
        dist.all_reduce(out, group=group)
    else:
        buffers.reduce(out, None, copy=False)
    expected = sum(r + 1 for r in dist.get_process_group_ranks(group))
    return bool((out == expected).all()), buffers is not None


def main() -> int:
    symmetric.ENABLED = True  # opt-in (VITRITON_ALLREDUCE=symmetric)
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device())
    pair = dist.new_group([0, 1])
    failures = []
    for step, (group, members, wants_symmetric) in enumerate(
        [(pair, (0, 1), True), (dist.group.WORLD, (0, 1, 2, 3), False)] * 2
    ):
        if rank in members:
            right, used = reduce(group, device)
            if not right or used != wants_symmetric:
                failures.append(f"step {step}: sum right {right}, symmetric {used} (wanted {wants_symmetric})")
        dist.barrier()
    torch.cuda.synchronize()
    print(f"rank {rank}: {'; '.join(failures) if failures else 'all sums right, paths as wanted'}", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
