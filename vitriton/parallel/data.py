"""Wrappers that run a tower over a process group: :class:`DataParallel` (each rank runs its share of the batch,
the outputs are all-gathered) and :class:`SameInputs` (tensor parallelism's opt-in input check).

Under torchrun every rank calls the model. Tensor parallelism needs every rank to pass the same batch, data
parallelism the same full batch; ranks that pass different inputs otherwise get wrong answers silently. With
``check_inputs`` (or ``VITRITON_CHECK_INPUTS=1`` at load time) each call all-gathers a checksum of every input
tensor and option and raises, on every rank, an error naming the ranks whose inputs differ from rank 0's. The check
waits for the device, so it is a debugging aid, off by default.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import ModelOutput

from vitriton.kernels._dispatch import autograd_records
from vitriton.parallel.group import ProcessGroup, get_rank, get_world_size


def check_same_inputs(inputs: dict[str, object], group: ProcessGroup | None) -> None:
    """Raises ValueError when the ranks of ``group`` hold different ``inputs``: tensors (shapes, sums, sums of
    squares) and plain options (``call_inputs``), whose ``repr`` is compared by checksum. An option such as
    ``output_attentions`` or ``feature_layers`` changes the collectives a call makes, so ranks that differ in one
    would otherwise wait on each other until the process group's timeout."""
    world = get_world_size(group)
    if world == 1:
        return
    summary = []
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            values = value.detach().double()
            summary += [value.dim(), *value.shape[:4], values.sum().item(), values.square().sum().item()]
        else:
            summary.append(zlib.crc32(repr(value).encode()))
    mine = torch.tensor([len(summary), *summary], dtype=torch.float64)
    width = torch.tensor([mine.numel()])
    widths = [torch.empty_like(width) for _ in range(world)]
    dist.all_gather(widths, width, group=group)
    longest = max(int(w) for w in widths)
    padded = torch.full((longest,), float("nan"), dtype=torch.float64)
    padded[: mine.numel()] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    differ = [rank for rank in range(1, world) if not torch.equal(parts[rank].nan_to_num(), parts[0].nan_to_num())]
    if differ:
        raise ValueError(
            f"ranks {differ} passed inputs ({', '.join(inputs)}) that differ from rank 0's; every rank must pass "
            f"the same batch (tensor parallelism) or the same full batch (data parallelism), with the same options"
        )


def input_tensors(args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    named = {f"argument {i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    named.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    return named


def is_option(value) -> bool:
    """A plain value whose ``repr`` is the same on every rank that passes it (no object addresses)."""
    if isinstance(value, list | tuple):
        return all(is_option(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def call_inputs(args: tuple, kwargs: dict) -> dict[str, object]:
    """What ``check_same_inputs`` compares: the input tensors and the plain options of one call."""
    named = {f"argument {i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor) or is_option(a)}
    named.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) or is_option(v)})
    return named


def unnest_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook of a module whose keys read as those of its child ``module.nested`` alone: the
    child's name is dropped from them."""
    inner = f"{prefix}{module.nested}."
    for key in [key for key in state_dict if key.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def nest_state(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, errors
) -> None:
    """``load_state_dict`` pre-hook, the reverse of :func:`unnest_state`: keys under ``prefix`` go to the child
    (keys that name it already load as they are). The load post-hook :func:`unnest_keys` names the missing and
    unexpected keys as they were given."""
    inner = f"{prefix}{module.nested}."
    for key in [key for key in state_dict if key.startswith(prefix) and not key.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)
    module._loading_prefix = prefix


def unnest_keys(module: nn.Module, incompatible_keys) -> None:
    prefix = module.__dict__.pop("_loading_prefix", None)
    if prefix is None:
        return
    inner = f"{prefix}{module.nested}."
    for keys in incompatible_keys:
        keys[:] = [prefix + key[len(inner) :] if key.startswith(inner) else key for key in keys]


def nest_hooks(module: nn.Module) -> None:
    """``module``'s state dict reads as that of its child ``module.nested``, without the child's name."""
    module.register_state_dict_post_hook(unnest_state)
    module.register_load_state_dict_pre_hook(nest_state)
    module.register_load_state_dict_post_hook(unnest_keys)


class TowerWrapper(nn.Module):
    """Holds a tower as ``.module``; attributes it does not have are read from the tower (``.config``,
    ``.encoder``), so code that inspects the tower keeps working, and so does its state dict: its keys are the
    tower's, as if the tower were in the wrapper's place."""

    nested = "module"

    def __init__(self, module: nn.Module, process_group: ProcessGroup | None):
        super().__init__()
        self.module = module
        self.process_group = process_group
        nest_hooks(self)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


class SameInputs(TowerWrapper):
    """Checks that every rank passed the same inputs, then runs the tower."""

    def forward(self, *args, **kwargs):
        check_same_inputs(call_inputs(args, kwargs), self.process_group)
        return self.module(*args, **kwargs)


class DataParallel(TowerWrapper):
    """Runs the tower on this rank's rows of every input whose first dimension is the batch (the first tensor
    argument's) and all-gathers every output, so each rank returns the whole batch. Every rank holds the full
    weights and must pass the same full batch. A batch smaller than the world size runs whole on every rank,
    with nothing to gather: its latency is one rank's, and no rank launches kernels on zero rows."""

    def __init__(self, module: nn.Module, process_group: ProcessGroup | None, *, check_inputs: bool = False):
        super().__init__(module, process_group)
        self.check_inputs = check_inputs

    def forward(self, *args, return_dict: bool | None = None, **kwargs):
        group = self.process_group
        world = get_world_size(group)
        if self.check_inputs:
            check_same_inputs(call_inputs(args, kwargs), group)
        tensors = list(input_tensors(args, kwargs).values())
        if world > 1 and autograd_records(*tensors):
            raise NotImplementedError(
                "gradients through a data-parallel vitriton model are not supported (its output all-gather is not "
                "recorded by autograd): run it under torch.no_grad(), or load it without a process group"
            )
        check_batch = getattr(self.module, "check_batch", None)
        if world > 1 and check_batch is not None:
            check_batch(*args, **kwargs)  # value checks on the whole batch: the same error on every rank
        if world == 1 or not tensors or tensors[0].shape[0] < world:
            return self.module(*args, return_dict=return_dict, **kwargs)
        batch = tensors[0].shape[0]
        sizes = [batch // world + (1 if r < batch % world else 0) for r in range(world)]
        start = sum(sizes[: get_rank(group)])
        stop = start + sizes[get_rank(group)]

        def local(value):
            is_batched = isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch
            return value[start:stop] if is_batched else value

        out = self.module(*(local(a) for a in args), return_dict=True, **{k: local(v) for k, v in kwargs.items()})
        gathered = type(out)(**{key: gather_rows(value, sizes, group) for key, value in out.items()})
        if return_dict is None:
            return_dict = getattr(self.module.config, "return_dict", True)
        return gathered if return_dict else gathered.to_tuple()


def parallel_mode(model: nn.Module) -> str:
    """How ``model`` runs over its process group, read from its modules: "data" (a :class:`DataParallel` over
    several ranks), "tensor" (layers sharded over several ranks) or "none" (one rank's whole model)."""
    for module in model.modules():
        world = get_world_size(getattr(module, "process_group", None))
        if world > 1 and isinstance(module, DataParallel):
            return "data"
        if world > 1 and not isinstance(module, TowerWrapper):
            return "tensor"
    return "none"


def gather_rows(value, sizes: list[int], group: ProcessGroup | None):
    """All-gathers the rows of a tensor, or of each tensor of a tuple or ModelOutput, from uneven per-rank
    batches (padded to the largest share on the wire)."""
    if isinstance(value, ModelOutput):
        return type(value)(**{key: gather_rows(v, sizes, group) for key, v in value.items()})
    if isinstance(value, tuple):
        return tuple(gather_rows(v, sizes, group) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    largest = max(sizes)
    padded = value.new_zeros(largest, *value.shape[1:])
    padded[: value.shape[0]] = value
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)
