"""Process groups, rank-sliced checkpoint loading, and the tensor-parallel layers the encoders are built from."""

from vitriton.parallel.data import DataParallel, SameInputs, check_same_inputs, parallel_mode
from vitriton.parallel.group import (
    Shard,
    ceil_shard,
    check_member,
    default_group,
    even_shard,
    get_rank,
    get_world_size,
    init_distributed,
)
from vitriton.parallel.layers import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_reduce,
    autocast_args,
    frozen,
    wait_all,
)
from vitriton.parallel.weights import CheckpointError, Weights, checkpoint_files, join

__all__ = [
    "CheckpointError",
    "ColumnParallelLinear",
    "DataParallel",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "SameInputs",
    "Shard",
    "VocabParallelEmbedding",
    "Weights",
    "all_reduce",
    "wait_all",
    "autocast_args",
    "check_member",
    "check_same_inputs",
    "frozen",
    "ceil_shard",
    "checkpoint_files",
    "default_group",
    "even_shard",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "join",
    "parallel_mode",
]
