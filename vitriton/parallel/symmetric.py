"""The encoder layers' all-reduce through torch's symmetric memory, for the small messages of small batches (opt-in).

NCCL's ring all-reduce pays a fixed cost per call that dominates at the sizes a tensor-parallel encoder sends
at batch 1 to 8 (one to 14 MB per reduce, two reduces per layer). ``torch.ops.symm_mem.two_shot_all_reduce_``
reduces in place in a buffer that every rank of the group has mapped (a reduce-scatter then an all-gather over
NVLink loads and stores, no multicast): on two H200s it took 36 us against NCCL's 52 us for ViT-L/14-336's
9.5 MB at batch 8, and 10.7 against 18.1 us at batch 1 (``benchmarks/bench_allreduce.py``,
``results/h200x4/issue12/allreduce_ranks*.log``; on four ranks it wins up to about 14 MB and loses above).

Off unless ``VITRITON_ALLREDUCE=symmetric`` is in the environment at import (or ``ENABLED`` is set to True): the
hardened form below passes the NCCL suite on 2 and 4 H200s (two groups in one process included), and in the model
(ViT-L/14-336 TP2 with graphs on 2 H200s, ``results/h200x2/session19``) it took batch 1 from 2.14 to 1.87 ms and
batch 8 from 5.96 to 5.26 ms against NCCL. It stays opt-in for the stream assumption under "Limits".

How it is used: the row-parallel GEMM writes its partial sums straight into one of ``RING`` symmetric buffers of
the group (``take``) and the buffer is reduced in place. The encoder layers then read the result from the buffer
("borrow") when nothing can keep it: the next add + LayerNorm consumes it before the ring comes round to that
buffer again. Where a forward hook, the last layer's output or anything else could keep it, the result is
copied out after the reduce ("copy"). Whether a reduce goes through symmetric memory depends only on facts that
are the same on every rank (shapes, dtype, ``ENABLED``, ``Encoder.chunks``, tracing, grad mode), never on
hooks, so ranks cannot disagree on the collective. Messages over ``CAPACITY`` bytes, fp16 (the op has bf16 and
fp32 kernels), devices other than CUDA, calls under torch.compile, overlapped forwards of more than 2 slices,
and groups where symmetric memory cannot be set up use NCCL.

Limits: the ring assumes a group's forwards run in order on one CUDA stream per device; each process gives
symmetric memory to one group (``_set_up``).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from vitriton.parallel.group import ProcessGroup, get_world_size

CAPACITY = 16 << 20  # bytes per buffer: batch 8 of so400m-384 (13.4 MB) fits; batch 128 goes to NCCL
RING = 4  # buffers per group; a borrowed result must be consumed within RING - 1 further reduces
MAX_CHUNKS = 2  # overlapped forwards of up to this many slices keep at most 2 borrowed results live
_DTYPES = (torch.bfloat16, torch.float32)  # what two_shot_all_reduce_ implements

# Read once; setting this at run time switches every later call.
ENABLED = os.environ.get("VITRITON_ALLREDUCE", "").strip().lower() == "symmetric"


class SymmetricBuffers:
    """``RING`` symmetric buffers of ``CAPACITY`` bytes on one device for ``group`` (``rendezvous`` maps them)."""

    def __init__(self, group: ProcessGroup, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.device = device
        self.buffers = [symm_mem.empty(CAPACITY, dtype=torch.uint8, device=device) for _ in range(RING)]
        self.next = 0
        self.stream: torch.cuda.Stream | None = None

    def rendezvous(self) -> None:
        """Maps every rank's buffers on every rank: collective over the group."""
        import torch.distributed._symmetric_memory as symm_mem

        for buffer in self.buffers:
            symm_mem.rendezvous(buffer, self.group_name)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next buffer of the ring as an uninitialised tensor of ``shape`` and ``dtype``."""
        buffer = self.buffers[self.next]
        self.next = (self.next + 1) % RING
        numel = 1
        for size in shape:
            numel *= size
        return buffer[: numel * dtype.itemsize].view(dtype).view(shape)

    def reduce(self, tensor: torch.Tensor, pending: list | None, copy: bool) -> torch.Tensor:
        """Sums ``tensor`` (from ``take``) over the group in place and returns it, or with ``copy`` a fresh tensor
        holding the sum. Without ``pending`` on the current stream; with it on a side stream, whose completion the
        caller waits for through the handle appended to ``pending`` (``layers.wait_all``)."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            result = torch.empty_like(tensor) if copy else tensor  # allocated on the current stream
            if pending is None:
                torch.ops.symm_mem.two_shot_all_reduce_(tensor, "sum", self.group_name)
                return result.copy_(tensor) if copy else tensor
            if self.stream is None:
                self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                torch.ops.symm_mem.two_shot_all_reduce_(tensor, "sum", self.group_name)
                if copy:
                    result.copy_(tensor)
                done = torch.cuda.Event()
                done.record(self.stream)
            pending.append(_Done(done, self.device))
            return result


class _Done:
    """A started reduce, as ``wait_all`` expects its handles: ``wait`` orders its device's current stream after
    it."""

    def __init__(self, event: torch.cuda.Event, device: torch.device):
        self.event, self.device = event, device

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.event)


_BUFFERS: dict[tuple[str, int], SymmetricBuffers | None] = {}  # (group name, device index) -> buffers, or None


def buffers_for(
    group: ProcessGroup | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> SymmetricBuffers | None:
    """The group's buffers when a reduce of ``shape`` and ``dtype`` on ``device`` should go through symmetric
    memory; None when NCCL should take it."""
    if not ENABLED or device.type != "cuda" or dtype not in _DTYPES or torch.compiler.is_compiling():
        return None
    world = get_world_size(group)
    nbytes = dtype.itemsize
    for size in shape:
        nbytes *= size
    # two-shot splits the message into one 16-byte-aligned part per rank
    if world < 2 or nbytes == 0 or nbytes > CAPACITY or nbytes % (16 * world):
        return None
    key = (group.group_name, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _BUFFERS:
        if torch.cuda.is_current_stream_capturing():
            return None  # no allocation or rendezvous inside a user's capture; set up on an eager call
        _BUFFERS[key] = _set_up(group, torch.device("cuda", key[1]))
    return _BUFFERS[key]


def _set_up(group: ProcessGroup, device: torch.device) -> SymmetricBuffers | None:
    """The group's buffers, or None (NCCL) when any rank of the group failed to allocate them or already holds
    symmetric buffers of another group.

    On 4 H200s with torch 2.11, a rendezvous over all 4 ranks hung after ranks 0 and 1 had rendezvoused buffers
    over a 2-rank subgroup (``make bench-parallel`` runs TP2, then TP4, in one process). So each process gives
    symmetric memory to one group. The ranks agree by one all-reduce (a host sync, once per group, on its first
    eligible call) before the collective rendezvous, so that they all take the same path."""
    taken = any(b is not None for b in _BUFFERS.values())
    buffers, error = None, None
    if not taken:
        try:
            buffers = SymmetricBuffers(group, device)
        except (RuntimeError, ImportError, AttributeError) as caught:  # out of memory, no symm_mem in this build
            error = caught
    flags = torch.tensor([int(taken), int(buffers is None)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    if flags.any().item():
        if error is not None:
            warnings.warn(f"symmetric-memory all-reduce unavailable, using NCCL: {error}", stacklevel=3)
        return None
    buffers.rendezvous()
    return buffers
