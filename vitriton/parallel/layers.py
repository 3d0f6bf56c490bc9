"""Tensor-parallel linears and embedding, built already sharded from a :class:`Weights`.

Megatron-LM's split (Shoeybi et al. 2019, arXiv:1909.08053): the first linear of a block is split by output
columns and needs no communication; the second is split by input rows and all-reduces its partial sums once.
The reduce is written out in each ``forward`` so the communication a layer does is visible where it happens.

A sharded layer's tensors are one rank's slices, which no transformers key names: its ``state_dict()`` raises
(``refuse_state_dict``), and ``load_state_dict()`` takes the full tensors and copies this rank's slice of each, cut
and padded as ``load`` cuts them from a checkpoint (``load_rank_slices``), so every rank loads the same state dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vitriton.kernels._dispatch import autograd_records
from vitriton.kernels.linear import linear
from vitriton.kernels.qkv import qkv_projection
from vitriton.parallel import symmetric
from vitriton.parallel.group import ProcessGroup, Shard, ceil_shard, even_shard, get_rank, get_world_size
from vitriton.parallel.weights import Weights, join


def frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    """An inference-only parameter (no grad), or None."""
    return None if tensor is None else nn.Parameter(tensor, requires_grad=False)


def autocast_args(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Under torch.autocast, ``x``, ``weight`` and ``bias`` in the autocast dtype, as autocast runs ``F.linear``
    (the weights keep their dtype and are cast per call); otherwise unchanged."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


# A tensor-parallel shard of the MLP's inner dimension is padded with zeros to a multiple of this many
# elements (16 bytes of bf16): so400m's 4304 over 4 ranks leaves 1076 columns per rank, rows of 2152 bytes that
# neither TMA nor cuBLAS's fast kernels take.
SHARD_MULTIPLE = 8


def pad_shard(tensor: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """``tensor`` with zeros appended along ``dim`` up to a multiple of ``multiple`` (unchanged if it is one)."""
    extra = -tensor.shape[dim] % multiple
    if extra == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def full_shape(local: torch.Tensor, dim: int, total: int) -> tuple[int, ...]:
    """``local``'s shape with ``total`` along ``dim``: the shape of the unsharded tensor it is a slice of."""
    return (*local.shape[:dim], total, *local.shape[dim + 1 :])


def size_mismatch(key: str, given: Sequence[int], expected: Sequence[int]) -> str:
    """An error for ``load_state_dict``, worded as torch words its own."""
    return (
        f"size mismatch for {key}: copying a param with shape {tuple(given)} from checkpoint, the shape in the full "
        f"(unsharded) model is {tuple(expected)}."
    )


def rank_slice(full: torch.Tensor, local: torch.Tensor, dim: int, shard: Shard) -> torch.Tensor:
    """``full``'s slice ``shard`` along ``dim`` in ``local``'s dtype and device, zero-padded to ``local``'s size
    along ``dim`` as ``load(pad=True)`` pads a shard (``SHARD_MULTIPLE``)."""
    part = full.narrow(dim, shard.start, shard.size).to(device=local.device, dtype=local.dtype)
    extra = local.shape[dim] - shard.size
    if extra == 0:
        return part
    return torch.cat([part, part.new_zeros(full_shape(part, dim, extra))], dim=dim)


def refuse_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """``state_dict`` pre-hook of a layer sharded over several ranks."""
    group = module.process_group
    raise RuntimeError(
        f"state_dict() of a tensor-parallel vitriton model: {prefix.rstrip('.') or type(module).__name__} holds "
        f"rank {get_rank(group)}'s shard of {get_world_size(group)}, which no transformers key names. Load the model "
        f"without a process group, or with parallel='data', to save or copy its weights (load_state_dict() takes "
        f"transformers' full tensors on every rank)"
    )


def load_rank_slices(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, errors
) -> None:
    """``load_state_dict`` pre-hook of a sharded layer: each full tensor given (``module.sharded``: name -> the
    dimension split over the ranks) becomes this rank's slice ``module.shard``, padded as ``load`` pads it."""
    for name, dim in module.sharded.items():
        key, local = prefix + name, getattr(module, name)
        if key not in state_dict or local is None:
            continue
        full, expected = state_dict[key], full_shape(local, dim, module.shard.total)
        if tuple(full.shape) != expected:
            errors.append(size_mismatch(key, full.shape, expected))
            state_dict[key] = local  # left as it is; the error above is the one reported
        else:
            state_dict[key] = rank_slice(full, local.detach(), dim, module.shard)


def shard_hooks(module: nn.Module) -> None:
    """The state-dict hooks of a layer sharded over ``module.process_group``, when it has several ranks."""
    if get_world_size(module.process_group) > 1:
        module.register_state_dict_pre_hook(refuse_state_dict)
        if getattr(module, "sharded", None):
            module.register_load_state_dict_pre_hook(load_rank_slices)


def all_reduce(tensor: torch.Tensor, group: ProcessGroup | None, pending: list | None = None) -> torch.Tensor:
    """Sums ``tensor`` over ``group`` in place. With a ``pending`` list the reduce is started, not waited for:
    its work handle is appended, and ``tensor`` holds the sum once the caller has waited on it (``wait_all``)."""
    if get_world_size(group) > 1:
        work = dist.all_reduce(tensor, group=group, async_op=pending is not None)
        if pending is not None:
            pending.append(work)
    return tensor


def wait_all(pending: list) -> None:
    """Orders the current stream after every reduce in ``pending`` (no host wait on GPUs) and empties it."""
    for work in pending:
        work.wait()
    pending.clear()


class ReplicatedLinear(nn.Module):
    """A whole nn.Linear on every rank (projections, heads): ``act(x @ W^T + b)`` through the linear kernel.

    The parallel subclasses hold ``shard``, the range of the split dimension this rank holds (``sharded``: which
    tensors are split along which dimension)."""

    sharded: dict[str, int] = {}

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        process_group: ProcessGroup | None = None,
        shard: Shard | None = None,
    ):
        super().__init__()
        self.weight = frozen(weight)
        self.bias = frozen(bias)
        self.process_group = process_group
        self.shard = shard
        if shard is not None:
            shard_hooks(self)

    @classmethod
    def load(
        cls, prefix: str, weights: Weights, *, in_features: int, out_features: int, bias: bool = True
    ) -> ReplicatedLinear:
        weight = weights.get_tensor(join(prefix, "weight"), shape=(out_features, in_features))
        b = weights.get_tensor(join(prefix, "bias"), shape=(out_features,)) if bias else None
        return cls(weight, b)

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        return linear(*autocast_args(x, self.weight, self.bias), activation)


class ColumnParallelLinear(ReplicatedLinear):
    """``y_local = act(x @ W_local^T + b_local)``: this rank's block of output features; no communication."""

    sharded = {"weight": 0, "bias": 0}

    @classmethod
    def load(
        cls,
        prefix: str,
        weights: Weights,
        *,
        in_features: int,
        out_features: int,
        unit: int = 1,
        what: str = "output features",
        bias: bool = True,
        pad: bool = False,
    ) -> ColumnParallelLinear:
        """Reads rows ``shard`` of ``{prefix}.weight`` (out, in); ``unit`` keeps whole heads on a rank. ``pad``:
        under tensor parallelism, zero rows (and bias) up to a multiple of ``SHARD_MULTIPLE``, for an output
        whose padded columns the next row-parallel linear (loaded with ``pad`` too) multiplies by zero columns,
        whatever finite values an activation makes of them."""
        shard = even_shard(out_features, weights.rank, weights.world_size, what=f"{prefix}: {what}", unit=unit)
        weight = weights.get_sharded(join(prefix, "weight"), 0, shard, shape=(out_features, in_features))
        b = weights.get_sharded(join(prefix, "bias"), 0, shard, shape=(out_features,)) if bias else None
        if pad and weights.world_size > 1:
            weight = pad_shard(weight, 0, SHARD_MULTIPLE)
            b = None if b is None else pad_shard(b, 0, SHARD_MULTIPLE)
        return cls(weight, b, weights.process_group, shard)


class RowParallelLinear(ReplicatedLinear):
    """``y = all_reduce(x_local @ W_local^T) + b``: this rank's block of input features, one all-reduce.

    The bias joins the GEMM epilogue on rank 0 only, so the reduced sum holds it exactly once.
    """

    sharded = {"weight": 1}

    @classmethod
    def load(
        cls,
        prefix: str,
        weights: Weights,
        *,
        in_features: int,
        out_features: int,
        unit: int = 1,
        what: str = "input features",
        bias: bool = True,
        pad: bool = False,
    ) -> RowParallelLinear:
        """Reads columns ``shard`` of ``{prefix}.weight``; ``pad`` appends zero columns as
        ``ColumnParallelLinear.load`` pads the rows of the linear that feeds this one."""
        shard = even_shard(in_features, weights.rank, weights.world_size, what=f"{prefix}: {what}", unit=unit)
        weight = weights.get_sharded(join(prefix, "weight"), 1, shard, shape=(out_features, in_features))
        if pad and weights.world_size > 1:
            weight = pad_shard(weight, 1, SHARD_MULTIPLE)
        b = weights.get_tensor(join(prefix, "bias"), shape=(out_features,)) if bias else None
        return cls(weight, b, weights.process_group, shard)

    def forward(
        self, x: torch.Tensor, pending: list | None = None, symmetric_result: str | None = None
    ) -> torch.Tensor:
        """``pending``: start the all-reduce asynchronously (see :func:`all_reduce`). ``symmetric_result``: None
        reduces through NCCL; "borrow" or "copy" let the GEMM write into a symmetric-memory buffer reduced in place
        (``vitriton.parallel.symmetric``, when it applies) and return that buffer ("borrow": valid until
        ``symmetric.RING - 1`` further reduces of the group) or a copy of it ("copy")."""
        if autograd_records(x, self.weight, self.bias) and get_world_size(self.process_group) > 1:
            raise NotImplementedError(
                "gradients through a tensor-parallel vitriton model are not supported (its all-reduces are not "
                "recorded by autograd): run it under torch.no_grad(), or load it without a process group"
            )
        bias = self.bias if get_rank(self.process_group) == 0 else None
        x, weight, bias = autocast_args(x, self.weight, bias)
        if symmetric_result is not None and weight.dtype == x.dtype:
            shape = (*x.shape[:-1], weight.shape[0])
            buffers = symmetric.buffers_for(self.process_group, shape, x.dtype, x.device)
            if buffers is not None:
                out = buffers.take(shape, x.dtype)
                rows, out_rows = x.reshape(-1, x.shape[-1]), out.view(-1, shape[-1])
                if bias is None:
                    torch.mm(rows, weight.t(), out=out_rows)
                else:
                    torch.addmm(bias, rows, weight.t(), out=out_rows)
                return buffers.reduce(out, pending, copy=symmetric_result == "copy")
        return all_reduce(linear(x, weight, bias), self.process_group, pending)

    def accumulate(self, x: torch.Tensor, residual: torch.Tensor, *, in_place: bool) -> torch.Tensor:
        """``residual + x @ weight.T``, without the bias, which the caller carries (the encoder's single-rank
        stream, ``Encoder.forward_accumulated``): cuBLAS reads the residual as its C operand, so the sum costs no
        pass of its own. ``in_place`` writes it into ``residual`` (contiguous); else into a new tensor. One rank
        only: a shard's partial product must be reduced before it joins the residual."""
        if get_world_size(self.process_group) > 1:
            raise ValueError("RowParallelLinear.accumulate runs on one rank; tensor parallelism reduces in forward")
        rows = x.reshape(-1, x.shape[-1])
        if in_place:
            residual.view(-1, residual.shape[-1]).addmm_(rows, self.weight.t())
            return residual
        return torch.addmm(residual.reshape(-1, residual.shape[-1]), rows, self.weight.t()).view(residual.shape)


class QKVParallelLinear(nn.Module):
    """Packed ``[q; k; v]`` projection holding, on each rank, the q, k and v rows of the same heads.

    The output is head-split by the ``qkv_projection`` kernel: three (batch, local_heads, seq, head_dim) tensors.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        num_heads: int,
        head_dim: int,
        process_group: ProcessGroup | None = None,
    ):
        super().__init__()
        self.weight = frozen(weight)
        self.bias = frozen(bias)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.process_group = process_group
        shard_hooks(self)  # state_dict() refuses a shard; its owner (Attention) loads transformers' q/k/v

    @classmethod
    def load(
        cls,
        sources: Sequence[tuple[str, int]],
        weights: Weights,
        *,
        hidden_size: int,
        num_heads: int,
        bias_sources: Sequence[tuple[str, int]] | None = None,
    ) -> QKVParallelLinear:
        """``sources``: three (tensor name, first row) pairs for q, k and v; separate ``q_proj.weight``
        tensors start at row 0, a packed ``in_proj_weight`` at rows 0, hidden and 2 * hidden."""
        head_dim = hidden_size // num_heads
        if head_dim * num_heads != hidden_size:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        where = sources[0][0].rsplit(".", 1)[0]  # the q (or packed in_proj) tensor's module, named in errors
        shard = even_shard(
            hidden_size, weights.rank, weights.world_size, what=f"{where}: attention heads", unit=head_dim
        )
        parts, bias_parts = [], []
        for name, row in sources:
            rows = weights.shape(name)[0]
            weights.check_shape(name, (rows, hidden_size))
            parts.append(weights.get_slice(name, 0, row + shard.start, row + shard.stop))
        for name, row in bias_sources or ():
            bias_parts.append(weights.get_slice(name, 0, row + shard.start, row + shard.stop))
        weight = torch.cat(parts, dim=0)
        bias = torch.cat(bias_parts, dim=0) if bias_sources else None
        return cls(weight, bias, shard.size // head_dim, head_dim, weights.process_group)

    @classmethod
    def load_separate(
        cls, prefix: str, weights: Weights, *, hidden_size: int, num_heads: int, bias: bool = True
    ) -> QKVParallelLinear:
        """From transformers' ``{prefix}.q_proj``, ``k_proj``, ``v_proj`` linears."""
        names = [join(prefix, f"{p}_proj") for p in "qkv"]
        for name in names:
            weights.check_shape(join(name, "weight"), (hidden_size, hidden_size))
        return cls.load(
            [(join(n, "weight"), 0) for n in names],
            weights,
            hidden_size=hidden_size,
            num_heads=num_heads,
            bias_sources=[(join(n, "bias"), 0) for n in names] if bias else None,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv_projection(*autocast_args(x, self.weight, self.bias), self.num_heads)


class VocabParallelEmbedding(nn.Module):
    """Token embedding split by vocabulary rows: each rank looks up the ids it owns, zeros the rest, and the
    ranks all-reduce. Blocks are ``ceil(vocab / world_size)`` rows, so any vocabulary size shards."""

    sharded = {"weight": 0}

    def __init__(self, weight: torch.Tensor, shard: Shard, process_group: ProcessGroup | None = None):
        super().__init__()
        self.weight = frozen(weight)
        self.shard = shard
        self.process_group = process_group
        shard_hooks(self)

    @classmethod
    def load(cls, prefix: str, weights: Weights, *, vocab_size: int, hidden_size: int) -> VocabParallelEmbedding:
        shard = ceil_shard(vocab_size, weights.rank, weights.world_size)
        weight = weights.get_sharded(join(prefix, "weight"), 0, shard, shape=(vocab_size, hidden_size))
        return cls(weight, shard, weights.process_group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_world_size(self.process_group) == 1:
            return F.embedding(input_ids, self.weight)
        owned = (input_ids >= self.shard.start) & (input_ids < self.shard.stop)
        local = torch.where(owned, input_ids - self.shard.start, 0)
        if self.shard.size:
            out = F.embedding(local, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        else:  # more ranks than vocabulary rows: this rank owns no id
            out = self.weight.new_zeros(*input_ids.shape, self.weight.shape[1])
        return all_reduce(out, self.process_group)
