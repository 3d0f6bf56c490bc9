"""CUDA graphs for the encoders: automatic by default, ``enable_cuda_graphs(model, cuda_graphs)``, and the runner.

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

Automatic graphs (the default, ``cuda_graphs="auto"``; :class:`AutoGraphs`): every tower replays its small calls
from graphs without being asked, so a plain ``model(pixel_values)`` at batch 1 is not launch-bound. A call is
captured the second time its exact shape and options come (the first runs eagerly, compiling and autotuning),
without padding, so a replay runs the very kernels the eager call runs and returns the same values. It stays
eager where a graph could differ from the eager call or cannot be made safe: on the CPU, above
``AUTO_MAX_TOKENS`` tokens a call (compute-bound; each hidden state a call returns counts its tokens again), past
``AUTO_MAX_GRAPHS`` shapes, under tensor parallelism, while any submodule of the tower or the process has a hook,
while grad is on and parameters require it, and for the reasons of :func:`eager_reason`. Replaced or moved
parameters (``.to()``, ``.half()``, a new Parameter) and changed modules (a parametrization, a forward set on an
instance, a deleted layer) drop the tower's graphs. ``cuda_graphs=False`` or ``VITRITON_CUDA_GRAPHS=0`` turns it off.
"""

from __future__ import annotations

import ast
import bisect
import contextlib
import functools
import inspect
import itertools
import math
import operator
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.overrides import _get_current_function_mode_stack as _function_modes
from torch.utils._device import DeviceContext
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as _dispatch_modes

from vitriton.kernels._dispatch import eager_mode

# Powers of two up to 128: padding wastes at most half a bucket, and graphs are captured lazily, so buckets
# a workload never reaches cost nothing. Past 128 rows an encoder is compute-bound and runs eagerly.
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)

# Automatic graphs: the largest call they capture (batch x tokens, once per hidden state it returns), and how
# many shapes a tower keeps. A plain ViT-L/14-336 forward costs the host about 5-9 ms (about 30 us for each of 177
# launches, issue 9), which its GPU work passes at roughly 10-30 images (5,800-17,000 tokens); 16,384 tokens keep
# a graph's pool activations under half a GiB for every reference model but bigG, and its kept outputs at 32 MB
# for a hidden size of 1,024 in bf16 (8 graphs: 256 MB).
AUTO_MAX_TOKENS = 16384
AUTO_MAX_GRAPHS = 8
AUTO_CAPTURE_AT = 2  # the call of a shape that captures it: the first compiles and autotunes, eagerly


def normalize_batch_sizes(batch_sizes: Iterable[int], name: str = "batch_sizes") -> tuple[int, ...]:
    """The buckets sorted and deduplicated; each must be a positive int. ``name`` is the argument errors name."""
    sizes = list(batch_sizes)
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad:
        raise ValueError(f"{name} holds {bad}; each bucket must be a positive int")
    if not sizes:
        raise ValueError(f"{name} is empty; give at least one bucket, e.g. (1, 8, 32)")
    return tuple(sorted(set(sizes)))


def cuda_graph_buckets(cuda_graphs: str | bool | Sequence[int]) -> tuple[int, ...] | None:
    """The buckets ``cuda_graphs`` asks for: None for "auto" and False, the defaults for True, else the sizes."""
    if isinstance(cuda_graphs, bool):
        return DEFAULT_BATCH_SIZES if cuda_graphs else None
    if cuda_graphs == "auto":
        return None
    if isinstance(cuda_graphs, (str, bytes)) or not isinstance(cuda_graphs, Iterable):
        raise TypeError(
            f"cuda_graphs={cuda_graphs!r}; expected 'auto', True, False or a sequence of batch sizes such as (1, 8, 32)"
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
    return type(value), value  # 1, 1.0, True and numpy's 1 hash alike, but the forward tells them apart


def eager_reason(arguments: Mapping[str, Any], device: torch.device) -> str | None:
    """Why a call with these named arguments must run eagerly instead of from a graph, or None if it can replay."""
    return _state_reason() or _arguments_reason(arguments, device)


def _state_reason() -> str | None:
    """Why no call can replay now, whatever its arguments: the process state a replay would bypass."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return "torch.compile, torch.export or torch.jit is tracing the call"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "another CUDA graph is being captured"
    if _dispatch_modes() or any(not isinstance(mode, DeviceContext) for mode in _function_modes()):
        return "a TorchDispatchMode or TorchFunctionMode is active (make_fx, a logging mode); a replay would bypass it"
    if torch.is_autocast_enabled("cuda"):
        # Replays under autocast gave the fp32 graph's dtypes on the H200 (issue 9's GPU run); until that is
        # understood, autocast calls keep transformers' eager semantics.
        return "torch.autocast is on; autocast calls run eagerly"
    return None


def _arguments_reason(arguments: Mapping[str, Any], device: torch.device) -> str | None:
    """Why these arguments cannot replay: a function of their values, tensors' metadata and the grad mode."""
    if arguments.get("output_attentions"):
        return "output_attentions=True computes attention weights on the reference path"
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
        if type(tensor) not in (torch.Tensor, nn.Parameter):
            return f"{name} is a {type(tensor).__name__}, a tensor subclass; graphs copy plain tensors"
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


def _describe(value: Any) -> Hashable:
    """What a call's binding, eager reason and graph key read of one argument: a tensor's type and metadata, any
    other value frozen (TypeError for values that cannot be)."""
    if isinstance(value, torch.Tensor):
        return "tensor", type(value), value.shape, value.dtype, value.device, value.requires_grad
    return "value", _freeze(value)


def _signature_key(value: Any) -> Hashable:
    """A graph key's part for one argument: a tensor's shape past the batch and its dtype, or the value."""
    if isinstance(value, torch.Tensor):
        return "tensor", tuple(value.shape[1:]), value.dtype
    return "value", _freeze(value)


_ARG, _KWARG, _DEFAULT = range(3)  # where a _Layout entry takes its value from


class _Layout:
    """How the calls of one layout (how many positional arguments, which keywords) land on a forward's
    parameters, worked out once from its signature so that a steady call skips ``inspect``'s binding: each
    canonical positional and keyword argument (keyword-only parameters, then ``**kwargs`` spread out) is taken
    from the call's positional arguments, its keywords or the parameter's default. Build it only for a layout
    ``inspect`` has bound without error; a forward with ``*args`` raises TypeError."""

    def __init__(self, signature: inspect.Signature, nargs: int, keywords: tuple[str, ...]):
        kind = inspect.Parameter
        params = list(signature.parameters.values())
        if any(p.kind is kind.VAR_POSITIONAL for p in params):
            raise TypeError("a forward with *args is bound by inspect on every call")
        positional = [p for p in params if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)]
        keyword_only = [p for p in params if p.kind is kind.KEYWORD_ONLY]
        by_keyword = {p.name for p in positional[nargs:] + keyword_only}

        def source(index: int, param: inspect.Parameter) -> tuple[int, Any]:
            if index < nargs:
                return _ARG, index
            if param.name in keywords:
                return _KWARG, param.name
            return _DEFAULT, param.default

        extra = tuple(name for name in keywords if name not in by_keyword)  # into **kwargs
        self.arg_names = tuple(p.name for p in positional)
        self.args = tuple(source(i, p) for i, p in enumerate(positional))
        self.kwarg_names = (*(p.name for p in keyword_only), *extra)
        self.kwargs = (*(source(nargs, p) for p in keyword_only), *((_KWARG, name) for name in extra))

    def canonical(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[tuple, dict[str, Any], dict[str, Any]]:
        """The call's canonical positional and keyword arguments, and every argument by name."""

        def take(entries: tuple) -> list[Any]:
            sources = (args, kwargs)
            return [what if where == _DEFAULT else sources[where][what] for where, what in entries]

        positional, keywords = take(self.args), dict(zip(self.kwarg_names, take(self.kwargs), strict=True))
        return tuple(positional), keywords, {**dict(zip(self.arg_names, positional, strict=True)), **keywords}


class _Guard:
    """Serialises the replays of the runners that share a memory pool, and orders them across streams: each
    replay's stream waits for the stream of the previous one, whose copies out of the static outputs (and whose
    intermediates in the shared pool) must be done first."""

    def __init__(self):
        self.lock = threading.Lock()
        self.stream: torch.cuda.Stream | None = None


# One capture at a time in the process: captures use torch's class-wide capture stream and the caching
# allocator's capture state, and two towers of a model may meet new shapes in two threads.
_CAPTURES = threading.RLock()


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


STALE = object()  # CUDAGraphRunner.replay's answer when its check rejects the replay


@dataclass
class _Call:
    """A call a graph can serve, in canonical form (defaults filled in)."""

    args: tuple
    kwargs: dict[str, Any]
    batch: int
    named: dict[str, Any]  # every argument by name (``**kwargs`` spread out)
    signature: tuple  # the graph key's part for the arguments (shapes past the batch, dtypes, values)


class CUDAGraphRunner:
    """Runs ``model`` from CUDA graphs, one per batch-size bucket, captured on first use.

    ``runner(pixel_values)`` or ``runner(input_ids, attention_mask=mask)`` takes what the model takes.
    Arguments are bound to ``forward``'s signature, so a call spelled positionally or by keyword, or leaving a
    default out, finds the same graph. Tensor arguments are batch-first; every other argument
    (``output_hidden_states=True``, ...) is part of the graph's identity, so each combination is captured
    once per bucket. Graphs replay in inference mode; the returned tensors are ordinary copies. Calls a graph
    cannot serve (see :func:`eager_reason`) run ``forward`` eagerly. ``batch_sizes=None`` gives every batch size
    a graph of its own (no padding).

    ``forward`` is what is captured, by default ``model`` itself; ``enable_cuda_graphs`` passes the tower's
    own class forward, since the runner takes the instance's ``forward``. ``pool`` shares one graph memory
    pool between runners, which then also share one ``guard``, so that they never replay at the same time (the
    towers of one model). ``context``, when given, returns a hashable of the state outside the arguments that the
    forward reads (the config's output options), which is part of each graph's identity too. Calls from several
    threads or streams are served one at a time, each stream waiting for the previous call's copies.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_sizes: Iterable[int] | None = DEFAULT_BATCH_SIZES,
        *,
        warmup: int = 2,
        forward: Callable[..., Any] | None = None,
        pool: tuple[int, int] | None = None,
        context: Callable[[], Hashable] | None = None,
        guard: _Guard | None = None,
    ):
        device = self.device_of(model)
        if warmup < 1:
            raise ValueError(f"warmup is {warmup}; capture needs at least 1 eager call to compile and autotune")
        # The model itself is not kept: a runner inside its own tower (automatic graphs) must not keep it alive.
        self.model = weakref.ref(model)
        self.forward = model if forward is None else forward
        # A module's own signature is its __call__'s (*args, **kwargs); binding needs forward's parameters.
        self.signature = inspect.signature(model.forward if forward is None else forward)
        self.device = device
        self.batch_sizes = None if batch_sizes is None else normalize_batch_sizes(batch_sizes)
        self.warmup = warmup
        self.context = context
        self._graphs: dict[tuple, _Captured] = {}
        # Per call description (layout, each argument's metadata or value, grad mode): its _Layout and graph key
        # part, or why it runs eagerly. Pure functions of that description, so kept across reset().
        self._bindings: dict[tuple, tuple[_Layout, tuple] | str] = {}
        self._shared_pool = pool
        self._pool = pool
        self._guard = _Guard() if guard is None else guard

    @classmethod
    def for_tower(
        cls,
        tower: nn.Module,
        batch_sizes: Iterable[int] | None,
        forward: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> CUDAGraphRunner:
        """A runner of a vitriton tower's eager ``forward`` (by default its class's, undecorated), with the tower's
        graph context in every key; both hold the tower weakly (``_TowerMethod``)."""
        forward = type(tower).forward.__wrapped__ if forward is None else forward
        context = _TowerMethod(tower, type(tower).graph_context)
        return cls(tower, batch_sizes, forward=_TowerMethod(tower, forward), context=context, **kwargs)

    @staticmethod
    def device_of(model: nn.Module) -> torch.device:
        """The CUDA device of ``model``'s parameters, or a clear error."""
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphRunner needs a CUDA device; torch.cuda.is_available() is False here")
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        if device.type != "cuda":
            raise RuntimeError(f"CUDAGraphRunner needs the model on a CUDA device; its parameters are on {device}")
        return device

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
        call = self.bind(args, kwargs)
        if call is None:
            return self.forward(*args, **kwargs)
        bucket = self.bucket(call.batch)
        if bucket is None:
            return self.forward(*args, **kwargs)
        with torch.inference_mode():
            captured = self.graph(bucket, call)
        return self.replay(captured, call, bucket)

    def bucket(self, batch: int) -> int | None:
        """The graph size that serves ``batch`` rows (``batch`` itself without buckets), or None for none."""
        return batch if self.batch_sizes is None else bucket_for(batch, self.batch_sizes)

    def capture(self, *args: Any, **kwargs: Any) -> None:
        """Capture every bucket ahead of traffic, from example inputs of any batch size shaped like real ones."""
        call = self.bind(args, kwargs)
        if call is None:
            raise ValueError(f"cannot capture this call: {self.why_eager(*args, **kwargs)}")
        with torch.inference_mode():
            for bucket in self.batch_sizes or (call.batch,):
                self.graph(bucket, call)

    def why_eager(self, *args: Any, **kwargs: Any) -> str | None:
        """Why this call would run eagerly rather than from a graph (None when it replays, or would, if its
        batch fits a bucket)."""
        binding = self._binding(args, kwargs)
        return _state_reason() or self._training() or (binding if isinstance(binding, str) else None)

    def _training(self) -> str | None:
        """A model in training mode whose dropout would draw new masks each call (a replay would repeat one). The
        walk runs only in training mode; one without dropout (CLIP's and SigLIP's configs default to 0) replays."""
        model = self.model()
        if model is not None and model.training and any(map(drops, model.modules())):
            return "the model is in training mode with dropout (new masks each call); graphs replay it without"
        return None

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> _Call | None:
        """The call in canonical form with its batch size, or None if it must run eagerly."""
        if _state_reason() is not None or self._training() is not None:
            return None
        binding = self._binding(args, kwargs)
        if isinstance(binding, str):
            return None
        layout, signature = binding
        positional, keywords, named = layout.canonical(args, kwargs)
        batch = next(v.shape[0] for v in named.values() if isinstance(v, torch.Tensor))
        return _Call(positional, keywords, batch, named, signature)

    def _binding(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[_Layout, tuple] | str:
        """The call's layout and graph key part, or why its arguments cannot replay; worked out once per
        description of the call (``_describe``) and looked up after that."""
        try:
            description = (
                len(args),
                tuple(kwargs),
                torch.is_grad_enabled(),
                *map(_describe, args),
                *map(_describe, kwargs.values()),
            )
        except TypeError:
            description = None  # an unhashable argument: bound afresh on every call
        binding = self._bindings.get(description) if description is not None else None
        if binding is not None:
            return binding
        try:
            self.signature.bind(*args, **kwargs)
            layout = _Layout(self.signature, len(args), tuple(kwargs))
        except TypeError as err:
            return f"the arguments do not match the forward's signature ({err})"
        positional, keywords, named = layout.canonical(args, kwargs)
        keyed = tuple(sorted((name, _signature_key(value)) for name, value in keywords.items()))
        binding = _arguments_reason(named, self.device) or (layout, (tuple(map(_signature_key, positional)), keyed))
        if description is not None:
            if len(self._bindings) >= 1024:
                self._bindings.clear()  # many one-off shapes
            self._bindings[description] = binding
        return binding

    def key(self, bucket: int, call: _Call) -> tuple:
        """The identity of the graph that serves ``call`` at ``bucket`` rows."""
        return bucket, *call.signature, None if self.context is None else self.context()

    def graph(self, bucket: int, call: _Call, key: tuple | None = None) -> _Captured:
        """The graph for ``call`` at ``bucket`` rows, captured now if it is new (call in inference mode)."""
        key = self.key(bucket, call) if key is None else key
        captured = self._graphs.get(key)
        if captured is None:
            with _CAPTURES:  # two threads meeting a new shape capture it once, one after the other
                captured = self._graphs.get(key)
                if captured is None:
                    captured = self._graphs[key] = self._capture(bucket, call.args, call.kwargs)
        return captured

    def replay(
        self, captured: _Captured, call: _Call, bucket: int, check: Callable[[], str | None] | None = None
    ) -> Any:
        """Load ``call``'s tensors, replay, and return copies of its rows of the outputs; or ``STALE`` when
        ``check``, run on the host while the GPU replays, gives a reason the result must not be used."""
        guard = self._guard
        with guard.lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream()
            if guard.stream is not None and guard.stream != stream:
                stream.wait_stream(guard.stream)  # the last replay's copies out of its static outputs
            guard.stream = stream
            with torch.inference_mode():
                captured.load(call.args, call.kwargs)
                captured.graph.replay()
            if check is not None and check() is not None:
                return STALE
            # Copied after leaving inference mode: ordinary tensors unless the caller is in inference mode.
            return take_rows(captured.outputs, call.batch, bucket)

    def _capture(self, bucket: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> _Captured:
        def static(value: Any) -> Any:
            return pad_rows(value, bucket) if isinstance(value, torch.Tensor) else value

        static_args = [static(v) for v in args]
        static_kwargs = {name: static(v) for name, v in kwargs.items()}
        with torch.cuda.device(self.device), _capturing():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.forward(*static_args, **static_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA calls during the capture neither fail nor break it.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                outputs = self.forward(*static_args, **static_kwargs)
        return _Captured(graph, static_args, static_kwargs, outputs)


_local = threading.local()  # depth of CUDAGraphRunner captures (warm-up included) on this thread


@contextlib.contextmanager
def _capturing():
    """Marks a runner's warm-up and capture, so automatic graphs inside the captured model stay out of it."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def auto_default() -> bool:
    """Whether towers start with automatic graphs on: yes unless ``VITRITON_CUDA_GRAPHS`` is 0, false, off or no."""
    value = os.environ.get("VITRITON_CUDA_GRAPHS", "auto").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("", "1", "true", "on", "yes", "auto"):
        return True
    raise ValueError(f"VITRITON_CUDA_GRAPHS={value!r}; expected auto (the default), 1 or 0")


# Bumped whenever any module registers a submodule, parameter or buffer (torch's global registration hooks), so
# a tower's cached lists of its modules and tensors are rebuilt only then; installed on the first automatic call.
_structure = {"version": 0, "hooked": False}


def _registered(module: nn.Module, name: str, value: Any) -> None:
    _structure["version"] += 1


def _watch_registrations() -> None:
    if not _structure["hooked"]:
        _module.register_module_module_registration_hook(_registered)
        _module.register_module_parameter_registration_hook(_registered)
        _module.register_module_buffer_registration_hook(_registered)
        _structure["hooked"] = True


_parameters_of = operator.attrgetter("_parameters")
_buffers_of = operator.attrgetter("_buffers")
_not_none = functools.partial(operator.is_not, None)
_requires_grad = operator.attrgetter("requires_grad")
_data_ptr = torch.Tensor.data_ptr
# The dicts of an nn.Module that hold its forward and backward hooks.
HOOK_NAMES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOKS = tuple(map(operator.attrgetter, HOOK_NAMES))
_hooks_in = operator.itemgetter(*HOOK_NAMES)  # a module's hook dicts, from its instance dict
_dict_of = operator.attrgetter("__dict__")
_children_in = operator.itemgetter("_modules")
_has_forward = operator.methodcaller("__contains__", "forward")


def _structure_of(modules: list[nn.Module], namespaces: list[dict]) -> tuple:
    """What a forward's Python depends on that no registration hook reports: each module's class, whether the
    instance has a ``forward`` of its own, and how many children it holds. ``namespaces`` are the modules'
    instance dicts, read by C-level maps (it runs per call: about half the time of attribute reads)."""
    return (
        *map(type, modules),
        *map(_has_forward, namespaces),
        *map(len, map(_children_in, namespaces)),
    )


def called_as_module(module: nn.Module) -> bool:
    """Whether ``module(...)`` does more than its class's ``forward``: hooks of its own (the kinds ``_HOOKS``
    reads), or a ``forward`` set on the instance. Plain attribute reads, which dynamo traces (not ``_HOOKS``'
    attrgetters)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
    )


def drops(module: nn.Module) -> bool:
    """Whether ``module`` applies dropout now: in training mode, an ``nn.Dropout`` (any kind) or a module with a
    float ``dropout`` probability (vitriton's attention, transformers' attention modules) above 0."""
    if not module.training:
        return False
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    probability = getattr(module, "dropout", None)
    return isinstance(probability, float) and probability > 0


def called_inside(module: nn.Module) -> bool:
    """Whether any module below ``module`` (not ``module`` itself) is :func:`called_as_module`. A walk of the
    children's dicts, at less than half the host time of ``module.modules()``, which builds every name and a memo
    set (it runs per forward, over every layer)."""
    for child in module._modules.values():
        if child is not None and (called_as_module(child) or called_inside(child)):
            return True
    return False


def global_hooks() -> bool:
    """Whether the process has global module hooks (forward, backward, or their pre-hooks)."""
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


class _TowerMethod:
    """A method of the tower (its eager forward, its graph context) holding the tower weakly: the runners live in
    the tower, and a reference back would be a cycle that keeps a deleted model's memory until the garbage
    collector runs."""

    def __init__(self, tower: nn.Module, function: Callable[..., Any]):
        self.tower = weakref.ref(tower)
        self.function = function
        # The runner binds calls to this: the method's own parameters, not (*args, **kwargs).
        self.__signature__ = inspect.signature(function.__get__(tower))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.tower(), *args, **kwargs)


class AutoGraphs:
    """A tower's automatic CUDA graphs (module docstring): ``tower.auto_graphs``, consulted by its forward.

    ``enabled`` turns them on or off for this tower; ``reset()`` frees the graphs and their memory pool;
    ``captured`` lists the shapes captured; ``why_eager(tower, *args, **kwargs)`` says why a call would run
    eagerly (None when it replays or will). Copies and pickles of a tower start with no graphs.
    """

    # What replays on: the CPU tests of these rules set "cpu" and a runner class whose graphs are fakes.
    device_type = "cuda"
    runner_cls: type[CUDAGraphRunner] = CUDAGraphRunner

    def __init__(self, enabled: bool | None = None):
        self.enabled = auto_default() if enabled is None else bool(enabled)
        # How a compiled graph names this tower to the op it calls (``tower_op``): set by ``attach``. A string,
        # which dynamo always keeps constant (an int attribute of a module may become symbolic under its
        # ``allow_unspec_int_on_nn_module``).
        self.handle: str | None = None
        # The tower's structure, cached until a registration anywhere bumps _structure["version"].
        self._version = -1
        # Its submodules (not the tower itself: a reference to it here would be a cycle that keeps a deleted
        # model's memory until the garbage collector runs), and their classes, forwards and children.
        self._modules: list[nn.Module] = []
        self._namespaces: list[dict] = []  # their instance dicts
        self._structure: tuple = ()
        self._dicts: list[dict] = []  # the parameter and buffer dicts of the tower and its submodules
        self._parallel = False  # sharded over more than one rank
        self.reset()

    def __reduce__(self):
        return AutoGraphs, (self.enabled,)

    def attach(self, tower: nn.Module) -> None:
        """Makes this the graphs of ``tower`` for compiled calls: a handle that ``tower_op`` finds it by."""
        self.handle = str(next(_handles))
        _ATTACHED[self.handle] = tower

    def reset(self) -> None:
        self._runner: CUDAGraphRunner | None = None
        self._calls: dict[tuple, int] = {}  # eager calls seen per graph key
        self._failed: set[tuple] = set()  # keys whose capture raised: they stay eager
        self._fingerprint: tuple | None = None  # device, structure and tensor addresses the graphs were captured with

    @property
    def captured(self) -> list[tuple]:
        return [] if self._runner is None else self._runner.captured

    def __call__(self, tower: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Runs ``forward(tower, *args, **kwargs)``, from a graph when it can."""
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return forward(tower, *args, **kwargs)
        plan = self._plan(tower, forward, args, kwargs)
        if isinstance(plan, str):
            return forward(tower, *args, **kwargs)
        runner, call, key, returned = plan
        if key not in runner._graphs:
            if returned + 1 < AUTO_CAPTURE_AT or len(runner._graphs) >= AUTO_MAX_GRAPHS or self._unsafe(tower):
                out = forward(tower, *args, **kwargs)
                # Counted once it returned: a call that raises (a user's error) is never captured.
                self._calls[key] = self._calls.get(key, 0) + 1
                return out
            try:
                with torch.inference_mode():
                    runner.graph(call.batch, call, key)
            except Exception as err:  # noqa: BLE001 - an uncapturable call keeps its eager result
                self._failed.add(key)
                warnings.warn(
                    f"vitriton: automatic CUDA graph capture of {type(tower).__name__} failed ({err}); this call "
                    f"shape runs eagerly from now on (cuda_graphs=False turns the automatic graphs off)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return forward(tower, *args, **kwargs)
        out = runner.replay(runner._graphs[key], call, call.batch, check=functools.partial(self._unsafe, tower))
        return forward(tower, *args, **kwargs) if out is STALE else out

    def why_eager(self, tower: nn.Module, *args: Any, **kwargs: Any) -> str | None:
        self._refresh(tower)
        unsafe = self._unsafe(tower)
        if unsafe is not None:
            return unsafe
        plan = self._plan(tower, type(tower).forward.__wrapped__, args, kwargs)
        return plan if isinstance(plan, str) else None

    def _plan(self, tower, forward, args, kwargs) -> str | tuple:
        """The reason to run eagerly, or ``(runner, call, key, eager calls of that key that returned)`` for a
        call a graph may serve (hooks are checked later, by ``_unsafe``)."""
        if not self.enabled:
            return "automatic CUDA graphs are off for this tower"
        if getattr(_local, "depth", 0):
            return "a CUDAGraphRunner around the model is warming up or capturing it"
        self._refresh(tower)
        if self._parallel:
            return "tensor parallelism: graphs are opt-in there (cuda_graphs=True on every rank)"
        if not self._unchanged():
            fingerprint = self._addresses(tower)
            if isinstance(fingerprint, str):
                return fingerprint
            if fingerprint != self._fingerprint:
                # First call, or parameters replaced or moved since: graphs would read the old addresses.
                self.reset()
            self._fingerprint = fingerprint  # also when equal: the fast check compares the structure by identity
        if self._runner is None:
            self._runner = self.runner_cls.for_tower(tower, None, forward, warmup=1)
        runner = self._runner
        call = runner.bind(args, kwargs)
        if call is None:
            return runner.why_eager(*args, **kwargs) or "the arguments do not bind to the forward"
        key = runner.key(call.batch, call)
        if key in self._failed:
            return "capturing this call shape failed before"
        if key not in runner._graphs:  # a captured key passed this check: the key fixes the tokens
            tokens = tower.graph_tokens(call.named)
            if tokens is None or tokens > AUTO_MAX_TOKENS:
                return (
                    f"the call holds more than AUTO_MAX_TOKENS={AUTO_MAX_TOKENS} tokens, or its input is not "
                    f"batch-first"
                )
        if len(self._calls) > 64 * AUTO_MAX_GRAPHS:
            self._calls.clear()  # many one-off shapes: forget their counts
        return runner, call, key, self._calls.get(key, 0)

    def _refresh(self, tower: nn.Module) -> None:
        _watch_registrations()
        if self._version != _structure["version"]:
            self._modules = [module for module in tower.modules() if module is not tower]
            self._namespaces = list(map(_dict_of, self._modules))
            self._structure = _structure_of(self._modules, self._namespaces)
            owners = [tower, *self._modules]
            # Dicts empty now are left out: a forward reads no tensor that was not there when it was walked.
            self._dicts = list(filter(None, [*map(_parameters_of, owners), *map(_buffers_of, owners)]))
            self._parallel = tower.tensor_parallel
            self._version = _structure["version"]

    def _unchanged(self) -> bool:
        """The steady state of :meth:`_addresses`, before every replay: with grad off, the tensors in the modules'
        dicts are those of the last fingerprint, at its addresses, in one C-level pass (the full walk also builds a
        list, reads the device and builds the fingerprint: 25 -> 22 us on a 24-layer tower). False sends the call
        to the full walk: a first call, grad on, a None or another value put in a dict, or anything moved."""
        fingerprint = self._fingerprint
        if fingerprint is None or torch.is_grad_enabled():
            return False
        try:
            pointers = tuple(map(_data_ptr, itertools.chain.from_iterable(map(dict.values, self._dicts))))
        except TypeError:
            return False
        # The device index of the full walk is left out: CUDA's unified addressing gives each device addresses of
        # its own, so the same addresses mean the same device.
        return fingerprint[1] is self._structure and pointers == fingerprint[2]

    def _addresses(self, tower: nn.Module) -> tuple | str:
        """Before a replay: the device, the modules' structure and the addresses of the parameters and buffers
        the tower holds now (what a graph reads), or why a graph would be wrong. The tensors are read from the
        modules' dicts on every call, so a tensor put there directly, which no registration hook reports, is
        seen before a graph could read freed memory (a module's dict replaced as a whole would not be)."""
        tensors = list(filter(_not_none, itertools.chain.from_iterable(map(dict.values, self._dicts))))
        if torch.is_grad_enabled() and any(map(_requires_grad, tensors)):
            return "grad is on and parameters require grad; graphs replay inference only"
        if not tensors or tensors[0].device.type != self.device_type:
            if self._runner is not None:
                self.reset()  # moved off the GPU: free the graphs, their pool and their buffers now
            return "the tower is not on a CUDA device"
        # The structure is one element: compared by identity while no registration rebuilt it, else by value (a
        # parametrization keeps the tensor at its address but swaps the module's class).
        return tensors[0].get_device(), self._structure, tuple(map(_data_ptr, tensors))

    def _unsafe(self, tower: nn.Module) -> str | None:
        """Why a replay's result must not be used: a hook, which the replay skipped, or a change to the modules
        that no registration hook reports (a class swapped, a forward set on an instance, a submodule deleted).
        Runs after the replay is launched, while the GPU runs it; the call then runs eagerly."""
        if global_hooks():
            return "a global module hook is registered; replays would skip it"
        # The hook dicts are read from the instance dicts on every call (torch's own code replaces a module's hook
        # dicts at times, so the dicts themselves are not kept).
        if any(map(any, map(_hooks_in, self._namespaces))):
            pairs = zip(self._modules, map(_hooks_in, self._namespaces), strict=True)
            hooked = next(module for module, hooks in pairs if any(hooks))
            return f"a {type(hooked).__name__} in the tower has hooks; replays would skip them"
        if _structure_of(self._modules, self._namespaces) == self._structure:
            return None
        self._version = -1  # walk the tower again, and capture again: the graphs ran the old Python
        self._fingerprint = None
        return "a submodule changed its class, its forward or its children; the graphs start again"


def replayable(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates a tower's ``forward`` so that calls go through the tower's :class:`AutoGraphs`, also from a
    compiled graph (:func:`compiled_call`)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = tuple(name for name, p in inspect.signature(forward).parameters.items() if p.kind in kinds)[1:]
    forward_id = len(_FORWARDS)
    _FORWARDS.append(forward)

    @functools.wraps(forward)
    def call(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            out = compiled_call(self, forward_id, positional, args, kwargs)
            return forward(self, *args, **kwargs) if out is None else out
        graphs = self.__dict__.get("auto_graphs")
        if graphs is None or not graphs.enabled:
            return forward(self, *args, **kwargs)
        return graphs(self, forward, args, kwargs)

    return call


# Towers under torch.compile (issue 9): a compiled graph that traced a tower's kernels one by one launches each of
# them from the host on every call, so at batch 1 it was slower than the plain call that replays the tower's
# automatic graph (ViT-L/14-336 on an H100: 6.2 against 1.9 ms). Where the plain call could replay, torch.compile
# sees the tower as one opaque op instead (``vitriton::tower``): at run time the op makes the plain call (its
# automatic graph, or eagerly what a graph cannot serve), and the compiled graph fuses what lies around it.
_FORWARDS: list[Callable[..., Any]] = []  # the forwards ``replayable`` decorated, by the id the op passes
_ATTACHED: weakref.WeakValueDictionary[str, nn.Module] = weakref.WeakValueDictionary()  # towers by handle
_handles = itertools.count(1)
_CONSTANTS = (bool, int, float, str, type(None))


def compiled_call(tower: nn.Module, forward_id: int, positional: tuple[str, ...], args: tuple, kwargs: dict) -> Any:
    """A tower's output from the opaque op, traced by dynamo; None where the call must be traced through instead:
    outside dynamo (torch.export's default, non-strict tracing), with grad on (the op has no backward), under
    autocast, under tensor parallelism, with the automatic graphs off, on another device than theirs, with
    ``output_attentions`` or ``output_hidden_states`` as a list of layers, with arguments other than tensors and
    constants, or while a submodule or the process has module hooks (the op's fake implementation runs the
    forward, which would hand them fake tensors; hooks added after compiling run in the op's plain call). Int
    arguments (``feature_layers``) go to the op as ints, which dynamo may make symbolic once they vary. (Strict
    torch.export, which runs dynamo, is refused by the op's fake implementation: dynamo in torch 2.11 folds
    ``is_exporting()`` to True while it compiles, so traced code cannot tell the two apart.)"""
    if not torch.compiler.is_dynamo_compiling():
        return None
    graphs = getattr(tower, "auto_graphs", None)
    if not isinstance(graphs, AutoGraphs) or not graphs.enabled or graphs.handle is None:
        return None
    if torch.is_grad_enabled() or torch.is_autocast_enabled(graphs.device_type):
        return None
    if len(args) > len(positional) or _traced_through(graphs.handle):
        return None
    named = dict(zip(positional[: len(args)], args, strict=True))
    named.update(kwargs)
    names, tensors, options, int_options, ints = [], [], [], [], []
    for name, value in named.items():
        if isinstance(value, torch.Tensor):
            if value.device.type != graphs.device_type:
                return None
            names.append(name)
            tensors.append(value)
        elif _is_int(value):
            int_options.append((name, None))
            ints.append(value)
        elif isinstance(value, (list, tuple)) and value and all(map(_is_int, value)):
            int_options.append((name, (type(value) is tuple, len(value))))
            ints.extend(value)
        elif _literal(value) or (isinstance(value, (list, tuple)) and all(map(_literal, value))):
            options.append((name, value))
        else:
            return None
    if not tensors:
        return None
    record, _, attentions, return_dict = tower.options(
        named.get("output_hidden_states"), named.get("output_attentions"), named.get("return_dict"),
        named.get("feature_layers"),
    )  # fmt: skip
    if attentions or (record is not None and None in record):
        return None  # the weights, or hidden states with places left None (layers asked for by index)
    flat = tower_op(graphs.handle, forward_id, tensors, ints, repr((tuple(names), tuple(options), tuple(int_options))))
    states = 0 if record is None else len(record)
    pooled = flat[1] if len(flat) == states + 2 else None
    hidden_states = None if record is None else tuple(flat[len(flat) - states :])
    return tower.assemble(flat[0], pooled, hidden_states, return_dict)


def _literal(value: Any) -> bool:
    """Whether ``value`` survives ``repr`` and ``ast.literal_eval`` (the op's arguments): no inf or nan."""
    return isinstance(value, _CONSTANTS) and not (isinstance(value, float) and not math.isfinite(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@torch._dynamo.assume_constant_result
def _traced_through(handle: str) -> bool:
    """Whether compiled code must trace through the kernels of the tower ``handle`` names because it is sharded
    (tensor parallelism) or hooked (:func:`_hooked`). Read once per compilation, as a constant: walked by dynamo,
    the modules' attributes it reads would be guards checked on every compiled call (about 35 us on the CPU).
    Like dynamo, which does not guard module hooks either, this does not see hooks registered after compiling;
    the op's plain call still runs them, since a replay refuses a hooked tower (not under torch.compile's
    reduce-overhead mode, whose CUDA graph replays the op's kernels without its Python). It takes the handle:
    dynamo in torch 2.11 passes only constants to such a function, not modules."""
    tower = _ATTACHED[handle]
    return tower.tensor_parallel or _hooked(tower)


def _hooked(tower: nn.Module) -> bool:
    """Whether a submodule of ``tower``, or the process, has module hooks (the kinds ``_HOOKS`` reads)."""
    submodules = [module for module in tower.modules() if module is not tower]
    return global_hooks() or any(any(map(hooks, submodules)) for hooks in _HOOKS)


@functools.lru_cache(maxsize=256)
def _arguments(text: str) -> tuple:
    return ast.literal_eval(text)


def _opaque_call(handle: str, forward_id: int, tensors: list[torch.Tensor], ints: list[int], arguments: str) -> tuple:
    """(tower, forward, keyword arguments) of a call ``vitriton::tower`` makes: ``arguments`` is the repr of
    (the tensors' names, (name, value) of the other constant arguments, (name, layout) of the int arguments,
    whose values are ``ints``: None for an int, (is a tuple, length) for a list or tuple of them). ``return_dict``
    is on, since the op returns the output's tensors and the traced caller puts them together as asked."""
    tower = _ATTACHED.get(handle)
    if tower is None:
        raise RuntimeError(
            "vitriton::tower: the tower this compiled graph was traced with no longer exists; compile the model again"
        )
    names, options, int_options = _arguments(arguments)
    kwargs = dict(options)
    kwargs.update(zip(names, tensors, strict=True))
    values = iter(map(int, ints))  # int() specialises a symbolic int in the fake implementation
    for name, layout in int_options:
        if layout is None:
            kwargs[name] = next(values)
        else:
            is_tuple, length = layout
            items = [next(values) for _ in range(length)]
            kwargs[name] = tuple(items) if is_tuple else items
    kwargs["return_dict"] = True
    return tower, _FORWARDS[forward_id], kwargs


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """last_hidden_state, pooler_output where there is one, then the hidden states."""
    tensors = [output.last_hidden_state]
    if output.pooler_output is not None:
        tensors.append(output.pooler_output)
    tensors.extend(output.hidden_states or ())
    return tensors


def _unaliased(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors``, each contiguous and none sharing memory with another (an op's outputs may not alias)."""
    result, seen = [], set()
    for tensor in tensors:
        tensor = tensor.contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()  # a fresh storage, which no later output can share
        seen.add(storage)
        result.append(tensor)
    return result


# Defined on a torch.library fragment rather than with ``torch.library.custom_op``: the op runs only with grad off
# (:func:`compiled_call`), so it needs no autograd layer, and custom_op's Python one cost about 19 us per call on
# the CPU. The fragment replaces an earlier definition, as custom_op does, so importing this module again works.
_LIBRARY = torch._library.custom_ops.get_library_allowing_overwrite("vitriton", "tower")
_LIBRARY.define(
    "tower(str handle, int forward_id, Tensor[] tensors, SymInt[] ints, str arguments) -> Tensor[]",
    tags=(torch.Tag.pt2_compliant_tag,),
)

# What the op's fake implementation traced, by (handle, forward, arguments, int arguments, input dtypes): each
# output's dtype and rank. A hook registered after compiling (it runs in the op's plain call) or a cast of the model
# could change them, which the compiled code after the op would misread; the real implementation compares and
# raises instead.
_TRACED: dict[tuple, list[tuple[torch.dtype, int]]] = {}


def _traced_key(handle: str, forward_id: int, tensors: list[torch.Tensor], ints: list[int], arguments: str) -> tuple:
    # int() specialises a symbolic int, as the fake implementation's call does already (_opaque_call)
    return handle, forward_id, arguments, tuple(map(int, ints)), *(t.dtype for t in tensors)


def _layout(tensors: list[torch.Tensor]) -> list[tuple[torch.dtype, int]]:
    return [(t.dtype, t.dim()) for t in tensors]


def _tower_impl(
    handle: str, forward_id: int, tensors: list[torch.Tensor], ints: list[int], arguments: str
) -> list[torch.Tensor]:
    """A tower's plain call (its automatic graph where one serves it) from a compiled graph: :func:`compiled_call`."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("vitriton::tower has no backward: call it with grad off (torch.no_grad)")
    tower, forward, kwargs = _opaque_call(handle, forward_id, tensors, ints, arguments)
    outputs = _unaliased(_output_tensors(tower.auto_graphs(tower, forward, (), kwargs)))
    traced = _TRACED.get(_traced_key(handle, forward_id, tensors, ints, arguments))
    if traced is not None and traced != _layout(outputs):
        raise RuntimeError(
            f"vitriton::tower: {type(tower).__name__} returned {_layout(outputs)} (dtype, rank) where torch.compile "
            f"traced {traced}: its outputs changed since compiling (a hook registered since, or the model cast to "
            f"another dtype). Compile again (torch._dynamo.reset()), or register hooks before compiling"
        )
    return outputs


_LIBRARY.impl("tower", _tower_impl, "CompositeExplicitAutograd")
tower_op = torch.ops.vitriton.tower.default


@torch.library.register_fake("vitriton::tower", lib=_LIBRARY)
def _tower_fake(handle, forward_id, tensors, ints, arguments):
    """The outputs' shapes and dtypes: the forward run on the fake inputs with the reference ops, the tower's real
    parameters taken into the fake mode as they are read."""
    if torch.compiler.is_exporting():
        raise RuntimeError(
            "torch.export(strict=True) of a vitriton tower with automatic CUDA graphs: the exported program would "
            "call this process's tower; export with strict=False, or call vitriton.enable_cuda_graphs(model, False) "
            "first"
        )
    tower, forward, kwargs = _opaque_call(handle, forward_id, tensors, ints, arguments)
    mode = torch._guards.detect_fake_mode(tensors)
    allowed = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        with eager_mode(), torch.no_grad():
            output = forward(tower, **kwargs)
    finally:
        mode.allow_non_fake_inputs = allowed
    outputs = _output_tensors(output)
    if len(_TRACED) >= 4096:
        _TRACED.clear()  # many compiled variants: forget the oldest checks rather than grow
    _TRACED[_traced_key(handle, forward_id, tensors, ints, arguments)] = _layout(outputs)
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in outputs]


def check_cuda_graphs(model: nn.Module, cuda_graphs: str | bool | Sequence[int]) -> tuple[int, ...] | None:
    """The buckets ``cuda_graphs`` asks for (None for "auto" and False), once the model is known to be on a
    CUDA device when it asks for any."""
    batch_sizes = cuda_graph_buckets(cuda_graphs)
    if batch_sizes is None:
        return None
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError(f"cuda_graphs={cuda_graphs!r}: {type(model).__name__} has no parameters to place on a GPU")
    if parameter.device.type != "cuda":
        raise RuntimeError(f"cuda_graphs={cuda_graphs!r} needs the model on a CUDA device; it is on {parameter.device}")
    return batch_sizes


def enable_cuda_graphs(model: nn.Module, cuda_graphs: str | bool | Sequence[int] = "auto") -> nn.Module:
    """Sets how every vision and text tower in ``model`` uses CUDA graphs; returns ``model``.

    ``cuda_graphs``: "auto" (the default of every tower): small calls replay from graphs captured on their
    second call, exact shapes only (module docstring); False: every call runs eagerly; True for the buckets
    ``DEFAULT_BATCH_SIZES`` (1, 2, 4, ..., 128) or a sequence of batch sizes: every call up to the largest
    bucket replays, padded to its bucket, captured on first use, including under tensor parallelism. Towers
    are vitriton's vision and text transformers, in vitriton's models or in transformers models after
    :func:`vitriton.patch`. Callers keep calling ``model(...)``, ``get_image_features`` and
    ``get_text_features``; what a graph cannot serve runs eagerly. Calling it again replaces the graphs.
    Memory with buckets: one pool shared by every graph of the model, about the peak activations of one forward
    at the largest bucket used, plus each graph's static inputs and outputs; "auto" keeps a pool per tower,
    bounded by ``AUTO_MAX_TOKENS``. ``enable_cuda_graphs(model, False)`` frees them all.
    """
    from vitriton.encoders.trunk import Tower  # here: the encoders package builds on this module

    batch_sizes = check_cuda_graphs(model, cuda_graphs)
    towers = [module for module in model.modules() if isinstance(module, Tower)]
    if batch_sizes is not None and not towers:
        raise ValueError(
            f"cuda_graphs={cuda_graphs!r}: {type(model).__name__} holds no vitriton VisionTransformer or "
            f"TextTransformer; graphs run vitriton's towers (call vitriton.patch on a transformers model first)"
        )
    for runner in cuda_graph_runners(model):
        runner.reset()
    pool = None if batch_sizes is None else torch.cuda.graph_pool_handle()
    guard = _Guard()
    for tower in towers:
        tower.auto_graphs = AutoGraphs(enabled=cuda_graphs == "auto" and auto_default())  # frees the old graphs
        tower.auto_graphs.attach(tower)
        if isinstance(tower.__dict__.get("forward"), CUDAGraphRunner):
            del tower.forward
        if batch_sizes is not None:
            tower.forward = CUDAGraphRunner.for_tower(tower, batch_sizes, pool=pool, guard=guard)
    return model


def cuda_graph_runners(model: nn.Module) -> list[CUDAGraphRunner]:
    """The runners ``enable_cuda_graphs`` put on ``model``'s towers (to ``capture`` ahead of time or ``reset``);
    the automatic graphs are each tower's ``auto_graphs``."""
    return [m.forward for m in model.modules() if isinstance(m.__dict__.get("forward"), CUDAGraphRunner)]
