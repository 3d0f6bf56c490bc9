"""CUDA-graph runner for the encoders: one captured graph per batch-size bucket.

At batch 1 an encoder forward is hundreds of small kernels, and the CPU cannot launch them as fast as an
H100 runs them, so latency is launch-bound. A captured CUDA graph replays the whole forward from one launch.
A graph is fixed in shapes and addresses, so the runner keeps one graph per bucket of batch sizes, each with
static input buffers: a call copies its rows into the smallest bucket that holds them, replays that graph,
and returns the first rows of the static outputs, cloned.

Trade-offs:
- Padded rows cost their compute (up to half a bucket with power-of-two buckets). Rows of a batch must not
  influence each other, which holds for these encoders. Padding rows are copies of real rows, so they stay
  finite (a fully masked padding row could turn into NaN).
- All graphs share one memory pool, so they hold the memory of the largest bucket rather than the sum.
  This is safe because one graph replays at a time and every output is cloned before the next replay can
  reuse its memory; returning views instead would save a copy but let a later call overwrite earlier results.
- Capture cannot compile or autotune, so every bucket first runs eagerly on a side stream, then is captured.
- Batches larger than the largest bucket run eagerly: they are compute-bound, not launch-bound.
- A graph records parameter addresses: weights may be updated in place, but not replaced; call ``reset``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def normalize_batch_sizes(batch_sizes: Iterable[int]) -> tuple[int, ...]:
    """The buckets sorted and deduplicated; each must be a positive int."""
    sizes = list(batch_sizes)
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad:
        raise ValueError(f"batch_sizes holds {bad}; each bucket must be a positive int")
    if not sizes:
        raise ValueError("batch_sizes is empty; give at least one bucket, e.g. (1, 8, 32)")
    return tuple(sorted(set(sizes)))


def bucket_for(batch: int, batch_sizes: Sequence[int]) -> int | None:
    """The smallest bucket holding ``batch`` rows, or None when ``batch`` exceeds the largest."""
    index = bisect.bisect_left(batch_sizes, batch)
    return batch_sizes[index] if index < len(batch_sizes) else None


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """A new (rows, ...) tensor: the first rows of ``x``, then its last row repeated as padding."""
    out = x.new_empty((rows, *x.shape[1:]))
    real = min(rows, x.shape[0])
    out[:real].copy_(x[:real])
    if rows > real:
        out[real:].copy_(x[real - 1 : real].expand(rows - real, *x.shape[1:]))
    return out


def take_rows(output: Any, rows: int, bucket: int) -> Any:
    """A copy of ``output`` (tensor, tuple, list, dict or ModelOutput) with batch-first tensors cut to ``rows``.

    A tensor counts as batch-first when its first dimension equals ``bucket``; others are copied whole.
    """
    if isinstance(output, torch.Tensor):
        if output.dim() > 0 and output.shape[0] == bucket:
            return output[:rows].clone()
        return output.clone()
    if isinstance(output, Mapping):
        return type(output)(**{key: take_rows(value, rows, bucket) for key, value in output.items()})
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(*(take_rows(value, rows, bucket) for value in output))
    if isinstance(output, (tuple, list)):
        return type(output)(take_rows(value, rows, bucket) for value in output)
    return output


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a non-tensor argument, so different options capture different graphs."""
    if isinstance(value, torch.Tensor):
        raise TypeError("tensors must be passed as top-level arguments, not inside a list or dict")
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((key, _freeze(v)) for key, v in value.items()))
    hash(value)
    return value


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    args: list[Any]  # the call's positional arguments, tensors replaced by static buffers
    kwargs: dict[str, Any]  # the same for keyword arguments
    outputs: Any  # static outputs, rewritten by each replay

    def load(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Copy the call's tensors into the first rows of the static buffers."""
        for static, value in zip(self.args, args, strict=True):
            if isinstance(value, torch.Tensor):
                static[: value.shape[0]].copy_(value)
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                self.kwargs[name][: value.shape[0]].copy_(value)


class CUDAGraphRunner:
    """Runs ``model`` from CUDA graphs, one per batch-size bucket, captured on first use.

    ``runner(pixel_values)`` or ``runner(input_ids, attention_mask=mask)`` takes what the model takes.
    Tensor arguments are batch-first; every other argument (``output_hidden_states=True``, ...) is part of
    the graph's identity, so each combination is captured once per bucket. Calls run in inference mode.
    """

    def __init__(self, model: nn.Module, batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES, *, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphRunner needs a CUDA device; torch.cuda.is_available() is False here")
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        if device.type != "cuda":
            raise RuntimeError(f"CUDAGraphRunner needs the model on a CUDA device; its parameters are on {device}")
        if warmup < 1:
            raise ValueError(f"warmup is {warmup}; capture needs at least 1 eager call to compile and autotune")
        self.model = model
        self.device = device
        self.batch_sizes = normalize_batch_sizes(batch_sizes)
        self.warmup = warmup
        self._graphs: dict[tuple, _Captured] = {}
        self._pool: tuple[int, int] | None = None

    @property
    def captured(self) -> list[tuple]:
        """The keys (bucket, input signature) of the graphs captured so far."""
        return list(self._graphs)

    def reset(self) -> None:
        """Drop every graph and its memory; the next calls capture again."""
        self._graphs.clear()
        self._pool = None

    @torch.inference_mode()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = self._batch_size(args, kwargs)
        bucket = bucket_for(batch, self.batch_sizes)
        if bucket is None:
            return self.model(*args, **kwargs)
        captured = self._graph(bucket, args, kwargs)
        captured.load(args, kwargs)
        captured.graph.replay()
        return take_rows(captured.outputs, batch, bucket)

    @torch.inference_mode()
    def capture(self, *args: Any, **kwargs: Any) -> None:
        """Capture every bucket ahead of traffic, from example inputs of any batch size shaped like real ones."""
        self._batch_size(args, kwargs)
        for bucket in self.batch_sizes:
            self._graph(bucket, args, kwargs)

    def _batch_size(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
        tensors = {f"argument {i}": v for i, v in enumerate(args) if isinstance(v, torch.Tensor)}
        tensors.update({name: v for name, v in kwargs.items() if isinstance(v, torch.Tensor)})
        if not tensors:
            raise TypeError("CUDAGraphRunner got no tensor argument; pass the batch (pixel_values or input_ids)")
        for name, tensor in tensors.items():
            if tensor.device != self.device:
                raise ValueError(f"{name} is on {tensor.device}; the model is on {self.device}")
            if tensor.dim() == 0:
                raise ValueError(f"{name} is a scalar tensor; tensor arguments must be batch-first")
        sizes = {name: tensor.shape[0] for name, tensor in tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"tensor arguments disagree on the batch size: {sizes}")
        batch = next(iter(sizes.values()))
        if batch < 1:
            raise ValueError("the batch is empty (0 rows)")
        return batch

    def _key(self, bucket: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple:
        def signature(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return ("tensor", tuple(value.shape[1:]), value.dtype)
            return ("value", _freeze(value))

        return (
            bucket,
            tuple(signature(v) for v in args),
            tuple(sorted((name, signature(v)) for name, v in kwargs.items())),
        )

    def _graph(self, bucket: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> _Captured:
        key = self._key(bucket, args, kwargs)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(bucket, args, kwargs)
        return captured

    def _capture(self, bucket: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> _Captured:
        def static(value: Any) -> Any:
            return pad_rows(value, bucket) if isinstance(value, torch.Tensor) else value

        static_args = [static(v) for v in args]
        static_kwargs = {name: static(v) for name, v in kwargs.items()}
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.model(*static_args, **static_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self.model(*static_args, **static_kwargs)
        return _Captured(graph, static_args, static_kwargs, outputs)
