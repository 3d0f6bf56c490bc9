"""The row-parallel linears' all-reduce through torch's symmetric memory, for the small messages of small batches.

NCCL's ring all-reduce pays a fixed cost per call that dominates at the sizes a tensor-parallel encoder sends
at batch 1 to 8 (one to 14 MB per reduce, two reduces per layer). ``torch.ops.symm_mem.two_shot_all_reduce_``
reduces in place in a buffer that every rank of the group has mapped (a reduce-scatter then an all-gather over
NVLink loads and stores, no multicast): on two H200s it took 36 us against NCCL's 52 us for ViT-L/14-336's
9.5 MB at batch 8, and 10.7 against 18.1 us at batch 1 (``benchmarks/bench_allreduce.py``,
``results/h200x4/issue12/allreduce_ranks*.log``; on four ranks it wins up to about 14 MB and loses above).

How it is used: the GEMM writes its partial sums straight into one of ``RING`` symmetric buffers of the group
(``take``), the buffer is reduced in place, and the next add + LayerNorm consumes the result before the ring
comes round to that buffer again. A result is valid only until ``RING - 1`` further reduces of the group are
issued, so ``RowParallelLinear`` uses this only where the encoder layers consume it that way
(``transient=True``, and no forward hook on the module that would keep it). Messages over ``CAPACITY`` bytes,
other devices than CUDA, calls under torch.compile, and groups where symmetric memory cannot be set up use NCCL;
so does everything with ``VITRITON_ALLREDUCE=nccl`` in the environment at import, or ``ENABLED = False``. The
choice depends only on shapes, dtypes and that setting, so every rank makes the same one.
"""

from __future__ import annotations

import os

import torch

from vitriton.parallel.group import ProcessGroup, get_world_size

CAPACITY = 16 << 20  # bytes per buffer: batch 8 of so400m-384 (13.4 MB) fits; batch 128 goes to NCCL
RING = 4  # buffers per group: an overlapped forward keeps up to ``Encoder.chunks`` (at most 2) results live
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# Read once: ``VITRITON_ALLREDUCE=nccl`` in the environment, or this set to False, sends every reduce to NCCL.
ENABLED = os.environ.get("VITRITON_ALLREDUCE", "").strip().lower() != "nccl"


class SymmetricBuffers:
    """``RING`` symmetric buffers of ``CAPACITY`` bytes on one device, rendezvoused over ``group``."""

    def __init__(self, group: ProcessGroup, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.buffers = []
        for _ in range(RING):
            buffer = symm_mem.empty(CAPACITY, dtype=torch.uint8, device=device)
            symm_mem.rendezvous(buffer, self.group_name)
            self.buffers.append(buffer)
        self.next = 0
        self.stream: torch.cuda.Stream | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next buffer of the ring as an uninitialised tensor of ``shape`` and ``dtype``."""
        buffer = self.buffers[self.next]
        self.next = (self.next + 1) % RING
        numel = 1
        for size in shape:
            numel *= size
        return buffer[: numel * dtype.itemsize].view(dtype).view(shape)

    def reduce(self, tensor: torch.Tensor, pending: list | None) -> torch.Tensor:
        """Sums ``tensor`` (from ``take``) over the group in place, on the current stream, or with ``pending`` on
        a side stream whose completion the caller waits for through the handle appended to ``pending``."""
        if pending is None:
            return torch.ops.symm_mem.two_shot_all_reduce_(tensor, "sum", self.group_name)
        current = torch.cuda.current_stream(tensor.device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(tensor.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            torch.ops.symm_mem.two_shot_all_reduce_(tensor, "sum", self.group_name)
            done = torch.cuda.Event()
            done.record(self.stream)
        pending.append(_Done(done))
        return tensor


class _Done:
    """A started reduce, as ``wait_all`` expects its handles: ``wait`` orders the current stream after it."""

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)


_BUFFERS: dict[tuple[str, int], SymmetricBuffers | None] = {}  # (group name, device index) -> buffers, or None


def buffers_for(
    group: ProcessGroup | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> SymmetricBuffers | None:
    """The group's buffers when a reduce of ``shape`` and ``dtype`` on ``device`` should go through symmetric
    memory; None when NCCL should take it."""
    world = get_world_size(group)
    if not ENABLED or world < 2 or device.type != "cuda" or dtype not in _DTYPES or torch.compiler.is_compiling():
        return None
    nbytes = dtype.itemsize
    for size in shape:
        nbytes *= size
    # two-shot splits the message into one 16-byte-aligned part per rank
    if nbytes == 0 or nbytes > CAPACITY or nbytes % (16 * world):
        return None
    key = (group.group_name, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _BUFFERS:
        try:
            _BUFFERS[key] = SymmetricBuffers(group, device)
        except (RuntimeError, ImportError, AttributeError) as error:  # no P2P, no symm_mem in this build
            import warnings

            warnings.warn(f"symmetric-memory all-reduce unavailable, using NCCL: {error}", stacklevel=2)
            _BUFFERS[key] = None
    return _BUFFERS[key]
