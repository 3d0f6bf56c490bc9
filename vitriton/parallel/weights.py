"""Checkpoint access for module constructors: full tensors, and rank slices read straight from safetensors.

A :class:`Weights` maps tensor names to the files of a Hugging Face checkpoint (``model.safetensors``, or
shards listed in ``model.safetensors.index.json``). Sharded reads go through ``safe_open(...).get_slice`` so a
rank never materialises the parts of a tensor it does not own. :func:`save_checkpoint` writes one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open

from vitriton.parallel.group import ProcessGroup, Shard, get_rank, get_world_size

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# safetensors' names of the floating-point dtypes vitriton can meet in a checkpoint.
SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the config."""


def with_variant(name: str, variant: str | None) -> str:
    """transformers' name of a checkpoint file of ``variant``: ``model.fp16.safetensors``,
    ``model.safetensors.index.fp16.json``."""
    if variant is None:
        return name
    stem, _, extension = name.rpartition(".")
    return f"{stem}.{variant}.{extension}"


def checkpoint_files(directory: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when sharded; ``variant`` picks the files
    transformers' ``from_pretrained(variant=)`` reads (``model.fp16.safetensors`` or its index)."""
    directory = Path(directory)
    index, single = directory / with_variant(SAFE_INDEX, variant), directory / with_variant(SAFE_SINGLE, variant)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    elif single.is_file():
        files = [single]
    else:
        files = sorted(directory.glob("*.safetensors")) if variant is None else []
    if not files:
        raise CheckpointError(f"{directory} holds no safetensors weights ({single.name} or {index.name})")
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in {index} but does not exist")
    return files


def own_storage(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict``'s tensors, each alone in its memory as safetensors requires: a view of a larger tensor (the
    q/k/v parts of a packed projection), a non-contiguous one, or a second name for a tensor already seen (tied
    weights) becomes a copy; dtypes and devices are kept."""
    seen, tensors = set(), {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        whole = tensor.is_contiguous() and storage.nbytes() == tensor.numel() * tensor.element_size()
        if not whole or (tensor.device, storage.data_ptr()) in seen:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add((tensor.device, tensor.untyped_storage().data_ptr()))
        tensors[name] = tensor
    return tensors


def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor], directory: str | os.PathLike, *, max_shard_size: int | str = "50GB"
) -> None:
    """Writes ``state_dict`` into ``directory`` as transformers does: ``model.safetensors``, or above
    ``max_shard_size`` shards listed in ``model.safetensors.index.json`` (huggingface_hub's
    ``save_torch_state_dict``, which also removes an earlier save's weight files, so the directory reads as this
    save). Tensors sharing memory are copied apart first (``own_storage``)."""
    save_torch_state_dict(own_storage(state_dict), directory, max_shard_size=max_shard_size)


def join(prefix: str, name: str) -> str:
    """``join("vision_model", "encoder")`` -> ``"vision_model.encoder"``; an empty prefix adds nothing."""
    return f"{prefix}.{name}" if prefix else name


class Weights:
    """Named tensors of one checkpoint, loaded on demand to ``device`` in ``dtype`` (floating tensors only).

    ``process_group`` decides which slice :meth:`get_sharded` returns; ``None`` means a single rank.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        process_group: ProcessGroup | None = None,
        variant: str | None = None,
    ) -> None:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            files = checkpoint_files(path, variant) if path.is_dir() else [path]
        else:
            files = [Path(f) for f in source]
        self.device = torch.device(device)
        self.dtype = dtype
        self.process_group = process_group
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = {}
        self._state_dict: Mapping[str, torch.Tensor] | None = None
        for file in files:
            for name in self._open(file).keys():
                self._file_of[name] = file

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        process_group: ProcessGroup | None = None,
    ) -> Weights:
        """Wraps tensors already in memory (e.g. a transformers model's ``state_dict()``)."""
        weights = cls.__new__(cls)
        weights.device = torch.device(device)
        weights.dtype = dtype
        weights.process_group = process_group
        weights._handles = {}
        weights._file_of = {}
        weights._state_dict = state_dict
        return weights

    @property
    def rank(self) -> int:
        return get_rank(self.process_group)

    @property
    def world_size(self) -> int:
        return get_world_size(self.process_group)

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"cannot read safetensors file {file}: {err}") from err
            self._handles[file] = handle
        return handle

    def names(self) -> Iterable[str]:
        return self._state_dict.keys() if self._state_dict is not None else self._file_of.keys()

    def __contains__(self, name: str) -> bool:
        return name in (self._state_dict if self._state_dict is not None else self._file_of)

    def has_prefix(self, prefix: str) -> bool:
        return any(name.startswith(prefix + ".") for name in self.names())

    def where(self, name: str) -> str:
        if self._state_dict is not None:
            return "the state dict"
        file = self._file_of.get(name)
        return str(file) if file is not None else ", ".join(sorted({str(f) for f in self._file_of.values()}))

    def _missing(self, name: str) -> CheckpointError:
        return CheckpointError(f"tensor {name!r} not found in {self.where(name)}")

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self:
            raise self._missing(name)
        if self._state_dict is not None:
            return tuple(self._state_dict[name].shape)
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def stored_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point tensor stored, as transformers reads it for ``dtype="auto"``
        when the config names none; None for a checkpoint without one."""
        if self._state_dict is not None:
            floats = (t.dtype for t in self._state_dict.values() if t.is_floating_point())
        else:
            floats = (
                SAFETENSORS_FLOATS.get(self._open(file).get_slice(name).get_dtype())
                for name, file in self._file_of.items()
            )
        return next((dtype for dtype in floats if dtype is not None), None)

    def check_shape(self, name: str, expected: Sequence[int] | None) -> tuple[int, ...]:
        actual = self.shape(name)
        if expected is not None and tuple(actual) != tuple(expected):
            raise CheckpointError(
                f"tensor {name!r} in {self.where(name)} has shape {tuple(actual)}; the config expects {tuple(expected)}"
            )
        return actual

    def _finish(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if self.dtype is not None and tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.device, dtype=dtype).contiguous()

    def get_tensor(self, name: str, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The whole tensor; ``shape``, when given, is checked against the checkpoint first."""
        self.check_shape(name, shape)
        if self._state_dict is not None:
            return self._finish(self._state_dict[name].detach())
        return self._finish(self._open(self._file_of[name]).get_tensor(name))

    def get_slice(self, name: str, dim: int, start: int, stop: int, shape: Sequence[int] | None = None) -> torch.Tensor:
        """``tensor[..., start:stop, ...]`` along ``dim``, read without loading the rest."""
        full = self.check_shape(name, shape)
        if not 0 <= start <= stop <= full[dim]:
            raise CheckpointError(f"slice [{start}:{stop}] of dim {dim} is outside tensor {name!r} of shape {full}")
        if self._state_dict is not None:
            return self._finish(self._state_dict[name].detach().narrow(dim, start, stop - start))
        index = (slice(None),) * dim + (slice(start, stop),)
        return self._finish(self._open(self._file_of[name]).get_slice(name)[index])

    def get_sharded(self, name: str, dim: int, shard: Shard, shape: Sequence[int] | None = None) -> torch.Tensor:
        return self.get_slice(name, dim, shard.start, shard.stop, shape)
