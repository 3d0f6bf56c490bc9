"""CUDA graphs for the encoders: ``enable_cuda_graphs(model, cuda_graphs)``, and the runner under it.

At batch 1 an encoder forward is hundreds of small kernels, and the CPU cannot launch them as fast as an
H100 runs them, so latency is launch-bound. A captured CUDA graph replays the whole forward from one launch.
A graph is fixed in shapes and addresses, so the runner keeps one graph per bucket of batch sizes, each with
static input buffers: a call copies its rows into the smallest bucket that holds them, replays that graph,
and returns the first rows of the static outputs, cloned.

``enable_cuda_graphs`` puts a runner in place of the ``forward`` of every tower (vision and text transformer)
in a model, so ``model(...)``, ``get_image_features`` and ``get_text_features`` replay graphs for the towers
and run the little around them (projections, logits) eagerly. The tower stays where it was: parameter names,
``state_dict`` and attributes such as ``model.vision_model.embeddings`` do not change, which a wrapper module
in its place would break.

Trade-offs:
- Padded rows cost their compute (up to half a bucket with power-of-two buckets). Rows of a batch must not
  influence each other, which holds for these encoders. Padding rows are copies of real rows, so they stay
  finite (a fully masked padding row could turn into NaN).
- All graphs of one ``enable_cuda_graphs`` call share one memory pool, so they hold the activations of the
  largest bucket rather than the sum. This is safe because one graph replays at a time and every output is
  cloned before the next replay can reuse its memory; returning views instead would save a copy but let a
  later call overwrite earlier results. Each graph also keeps its own static inputs and outputs.
- Capture cannot compile or autotune, so every bucket first runs eagerly on a side stream, then is captured.
- What a graph cannot replay runs eagerly: batches larger than the largest bucket (compute-bound, not
  launch-bound), ``output_attentions=True``, calls under torch.autocast, inputs that require grad, tensors
  inside lists or dicts, tensors on another device or disagreeing on the batch size, calls while torch.compile
  traces or another graph is being captured.
- A replay skips the forward's Python: checks of shapes and options ran at capture, and the graph's key
  (shapes, dtypes, options) guarantees they still hold; value checks that run on the device (token ids in
  range, an async assert) are captured and replay with the graph.
- A graph records parameter addresses: weights may be updated in place, but not replaced; call ``reset``.
"""

from __future__ import annotations

import bisect
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitriton.encoders.trunk import TextTransformer, VisionTransformer

# Powers of two up to 128: padding wastes at most half a bucket, and graphs are captured lazily, so buckets
# a workload never reaches cost nothing. Past 128 rows an encoder is compute-bound and runs eagerly.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def normalize_batch_sizes(batch_sizes: Iterable[int], name: str = "batch_sizes") -> tuple[int, ...]:
    """The buckets sorted and deduplicated; each must be a positive int. ``name`` is the argument errors name."""
    sizes = list(batch_sizes)
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad:
        raise ValueError(f"{name} holds {bad}; each bucket must be a positive int")
    if not sizes:
        raise ValueError(f"{name} is empty; give at least one bucket, e.g. (1, 8, 32)")
    return tuple(sorted(set(sizes)))


def cuda_graph_buckets(cuda_graphs: bool | Sequence[int]) -> tuple[int, ...] | None:
    """The buckets ``cuda_graphs`` asks for: None for False, the defaults for True, else the given sizes."""
    if isinstance(cuda_graphs, bool):
        return DEFAULT_BATCH_SIZES if cuda_graphs else None
    if isinstance(cuda_graphs, (str, bytes)) or not isinstance(cuda_graphs, Iterable):
        raise TypeError(
            f"cuda_graphs={cuda_graphs!r}; expected True, False or a sequence of batch sizes such as (1, 8, 32)"
        )
    return normalize_batch_sizes(cuda_graphs, name="cuda_graphs")


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

    A tensor counts as batch-first when its first dimension equals ``bucket``; others (a scale, a table) are
    copied whole, and None or other values are returned as they are. Copies made outside inference mode are
    ordinary tensors, so callers may use them with autograd-tracking modules (a LLaVA projector).
    """
    if isinstance(output, torch.Tensor):
        if output.dim() > 0 and output.shape[0] == bucket:
            return output[:rows].clone()
        return output.clone()
    if isinstance(output, Mapping):
        items = {key: take_rows(value, rows, bucket) for key, value in output.items()}
        # ModelOutput takes its fields as keywords (and leaves out those that are None); a dict takes pairs.
        return type(output)(**items) if all(isinstance(key, str) for key in items) else type(output)(items)
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


def eager_reason(arguments: Mapping[str, Any], device: torch.device) -> str | None:
    """Why a call with these named arguments must run eagerly instead of from a graph, or None if it can replay."""
    if torch.compiler.is_compiling():
        return "torch.compile is tracing the call"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "another CUDA graph is being captured"
    if arguments.get("output_attentions"):
        return "output_attentions=True computes attention weights on the reference path"
    if torch.is_autocast_enabled("cuda"):
        # Replays under autocast gave the fp32 graph's dtypes on the H200 (issue 9's GPU run); until that is
        # understood, autocast calls keep transformers' eager semantics.
        return "torch.autocast is on; autocast calls run eagerly"
    tensors = {}
    for name, value in arguments.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
            continue
        try:
            _freeze(value)
        except TypeError:
            return f"{name} holds tensors inside a container or an unhashable value"
    if not tensors:
        return "no tensor argument"
    for name, tensor in tensors.items():
        if tensor.device != device:
            return f"{name} is on {tensor.device}; the model is on {device}"
        if tensor.dim() == 0:
            return f"{name} is a scalar tensor; tensor arguments must be batch-first"
        if tensor.requires_grad and torch.is_grad_enabled():
            return f"{name} requires grad; graphs replay inference only"
    sizes = {name: tensor.shape[0] for name, tensor in tensors.items()}
    if len(set(sizes.values())) > 1:
        return f"tensor arguments disagree on the batch size: {sizes}"
    if next(iter(sizes.values())) == 0:
        return "the batch is empty (0 rows)"
    return None


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
    Arguments are bound to ``forward``'s signature, so a call spelled positionally or by keyword, or leaving a
    default out, finds the same graph. Tensor arguments are batch-first; every other argument
    (``output_hidden_states=True``, ...) is part of the graph's identity, so each combination is captured
    once per bucket. Graphs replay in inference mode; the returned tensors are ordinary copies. Calls a graph
    cannot serve (see :func:`eager_reason`) run ``forward`` eagerly.

    ``forward`` is what is captured, by default ``model`` itself; ``enable_cuda_graphs`` passes the tower's
    own class forward, since the runner takes the instance's ``forward``. ``pool`` shares one graph memory
    pool between runners that never replay at the same time (the towers of one model).
    """

    def __init__(
        self,
        model: nn.Module,
        batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
        *,
        warmup: int = 2,
        forward: Callable[..., Any] | None = None,
        pool: tuple[int, int] | None = None,
    ):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphRunner needs a CUDA device; torch.cuda.is_available() is False here")
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        if device.type != "cuda":
            raise RuntimeError(f"CUDAGraphRunner needs the model on a CUDA device; its parameters are on {device}")
        if warmup < 1:
            raise ValueError(f"warmup is {warmup}; capture needs at least 1 eager call to compile and autotune")
        self.model = model
        self.forward = model if forward is None else forward
        # A module's own signature is its __call__'s (*args, **kwargs); binding needs forward's parameters.
        self.signature = inspect.signature(model.forward if forward is None else forward)
        self.device = device
        self.batch_sizes = normalize_batch_sizes(batch_sizes)
        self.warmup = warmup
        self._graphs: dict[tuple, _Captured] = {}
        self._shared_pool = pool
        self._pool = pool

    @property
    def captured(self) -> list[tuple]:
        """The keys (bucket, input signature) of the graphs captured so far."""
        return list(self._graphs)

    def reset(self) -> None:
        """Drop every graph and its static buffers; the next calls capture again. A pool shared with other
        runners is released once all of them are reset."""
        self._graphs.clear()
        self._pool = self._shared_pool

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self._bind(args, kwargs)
        if call is None:
            return self.forward(*args, **kwargs)
        args, kwargs, batch = call
        bucket = bucket_for(batch, self.batch_sizes)
        if bucket is None:
            return self.forward(*args, **kwargs)
        with torch.inference_mode(), torch.cuda.device(self.device):
            captured = self._graph(bucket, args, kwargs)
            captured.load(args, kwargs)
            captured.graph.replay()
        # Copied after leaving the runner's inference mode: ordinary tensors unless the caller is in inference mode.
        return take_rows(captured.outputs, batch, bucket)

    def capture(self, *args: Any, **kwargs: Any) -> None:
        """Capture every bucket ahead of traffic, from example inputs of any batch size shaped like real ones."""
        call = self._bind(args, kwargs)
        if call is None:
            raise ValueError(f"cannot capture this call: {self.why_eager(*args, **kwargs)}")
        args, kwargs, _ = call
        with torch.inference_mode():
            for bucket in self.batch_sizes:
                self._graph(bucket, args, kwargs)

    def why_eager(self, *args: Any, **kwargs: Any) -> str | None:
        """Why this call would run eagerly rather than from a graph (None when it replays, or would, if its
        batch fits a bucket)."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as err:
            return f"the arguments do not match the forward's signature ({err})"
        return eager_reason(_named(bound), self.device)

    def _bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[tuple, dict[str, Any], int] | None:
        """The call in canonical form (defaults filled in) with its batch size, or None if it must run eagerly."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return None  # the eager call raises the forward's own error
        bound.apply_defaults()
        named = _named(bound)
        if eager_reason(named, self.device) is not None:
            return None
        batch = next(v.shape[0] for v in named.values() if isinstance(v, torch.Tensor))
        return bound.args, bound.kwargs, batch

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
                    self.forward(*static_args, **static_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self.forward(*static_args, **static_kwargs)
        return _Captured(graph, static_args, static_kwargs, outputs)


def _named(bound: inspect.BoundArguments) -> dict[str, Any]:
    """Every argument by name, with the forward's ``**kwargs`` spread out; ``*args`` stays one tuple."""
    named = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def check_cuda_graphs(model: nn.Module, cuda_graphs: bool | Sequence[int]) -> tuple[int, ...] | None:
    """The buckets ``cuda_graphs`` asks for (None for False), once the model is known to be on a CUDA device."""
    batch_sizes = cuda_graph_buckets(cuda_graphs)
    if batch_sizes is None:
        return None
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError(f"cuda_graphs={cuda_graphs!r}: {type(model).__name__} has no parameters to place on a GPU")
    if parameter.device.type != "cuda":
        raise RuntimeError(f"cuda_graphs={cuda_graphs!r} needs the model on a CUDA device; it is on {parameter.device}")
    return batch_sizes


def enable_cuda_graphs(model: nn.Module, cuda_graphs: bool | Sequence[int]) -> nn.Module:
    """Replays the forward of every vision and text tower in ``model`` from CUDA graphs; returns ``model``.

    ``cuda_graphs``: True for the buckets ``DEFAULT_BATCH_SIZES`` (1, 2, 4, ..., 128), a sequence of batch
    sizes for those buckets, False to return the model unchanged. Towers are vitriton's vision and text
    transformers, in vitriton's models or in transformers models after :func:`vitriton.patch`. Callers keep
    calling ``model(...)``, ``get_image_features`` and ``get_text_features``; graphs are captured on first
    use, one per bucket and per combination of non-tensor arguments, and what a graph cannot serve runs
    eagerly. Calling it again replaces the graphs. Memory: one pool shared by every graph of the model,
    about the peak activations of one forward at the largest bucket used, plus each graph's static inputs
    and outputs; ``for runner in cuda_graph_runners(model): runner.reset()`` frees it.
    """
    batch_sizes = check_cuda_graphs(model, cuda_graphs)
    if batch_sizes is None:
        return model
    towers = [module for module in model.modules() if isinstance(module, (VisionTransformer, TextTransformer))]
    if not towers:
        raise ValueError(
            f"cuda_graphs={cuda_graphs!r}: {type(model).__name__} holds no vitriton VisionTransformer or "
            f"TextTransformer; graphs run vitriton's towers (call vitriton.patch on a transformers model first)"
        )
    for runner in cuda_graph_runners(model):
        runner.reset()
    pool = torch.cuda.graph_pool_handle()
    for tower in towers:
        eager = type(tower).forward.__get__(tower)
        tower.forward = CUDAGraphRunner(tower, batch_sizes, forward=eager, pool=pool)
    return model


def cuda_graph_runners(model: nn.Module) -> list[CUDAGraphRunner]:
    """The runners ``enable_cuda_graphs`` put on ``model``'s towers (to ``capture`` ahead of time or ``reset``)."""
    return [m.forward for m in model.modules() if isinstance(m.__dict__.get("forward"), CUDAGraphRunner)]
