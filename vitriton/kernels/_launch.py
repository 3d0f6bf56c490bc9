"""Launch plans: the work of a kernel launch done once per call signature, then replayed.

Triton's own launch path (``kernel[grid](...)``) binds every argument, recomputes the specialisation key and,
through ``triton.autotune``, the tuning key on each call: 12 us for an empty kernel on an H100 and 130-260 us for
our ops with their checks and the torch.library dispatch in front (issue 9). A :class:`Plan` keeps what that work
decides for one call signature (shapes, strides, dtypes, 16-byte alignment, flags, device): the config, the grid,
the compiled kernel and the compile-time arguments. The signature holds no data pointer, so the 24 layers of a
model share one plan per op and shape, and weights are validated once per signature, not per call. A
steady-state call builds its signature, finds the plan and
hands the per-call arguments straight to the compiled kernel's launcher (``CompiledKernel.run``).

The first call of a signature goes through triton's path (compiling and autotuning as needed), which also runs
it; :func:`record` reads the compiled kernel and the chosen config off that call. Where there is no compiled
kernel (the interpreter) the plan launches through the jitted function with the recorded config, so the plan
logic is the same on the CPU test suite.

Kernels that build TMA descriptors on the device need global scratch memory per program, which triton's launch
path asks of the allocator set with ``triton.set_allocator`` and fails without. vitriton sets none for the
process: :func:`scratch_allocator` lends torch's caching allocator for a first launch only where the user has set
none, and a plan allocates each launch's scratch with torch on the current stream (safe under CUDA graphs and on
any stream, as any torch temporary is).

Every op's constexpr parameters come last in its kernel's signature, so a launch passes the runtime arguments
followed by the plan's constexpr values, in declaration order, as triton's launcher expects.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
import triton

try:
    from triton import knobs as _knobs
except ImportError:  # triton before 3.4 keeps launch hooks on CompiledKernel
    _knobs = None

from triton.runtime import driver

try:
    from triton.runtime import _allocation
except ImportError:  # a triton without triton.set_allocator
    _allocation = None

# Plans hold no tensors (a TMA descriptor is kept without its base; see ``_matmul.plan_operand``), only ints,
# strings and compiled kernels; the cap bounds a process that runs ever new shapes.
MAX_PLANS = 4096


def _layers(kernel: Any) -> list[Any]:
    """The wrapper chain of a decorated kernel, outermost first: Autotuner -> Heuristics -> jitted function."""
    chain = [kernel]
    while type(chain[-1]).__name__ in ("Autotuner", "Heuristics"):
        chain.append(chain[-1].fn)
    return chain


class Plan:
    """One call signature's launch: ``plan.launch(device_index, *runtime_args)``."""

    __slots__ = (
        "compiled", "config", "const_args", "const_kwargs", "descriptors", "encoded", "function", "grid", "jit",
        "launcher", "options", "scratch_bytes", "stream_of",
    )  # fmt: skip

    def __init__(
        self,
        jit: Any,
        runtime_names: Sequence[str],
        grid: tuple[int, ...],
        values: dict[str, Any],
        config: triton.Config | None,
        options: dict[str, int],
    ):
        names = list(jit.arg_names)
        if names[: len(runtime_names)] != list(runtime_names):
            raise TypeError(f"{jit.__name__}: runtime arguments {list(runtime_names)} must open its signature {names}")
        params = getattr(jit, "params", None)  # the interpreter's functions have none
        if params is not None and not all(p.is_constexpr for p in params[len(runtime_names) :]):
            raise TypeError(f"{jit.__name__}: constexpr parameters must come after the runtime ones")
        const_names = names[len(runtime_names) :]
        self.jit = jit
        self.config = config
        self.options = options
        self.const_kwargs = {name: values[name] for name in const_names if name in values}
        self.const_args = (
            () if params is None else tuple(values.get(p.name, p.default) for p in params[len(runtime_names) :])
        )
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.compiled = None
        self.function = None
        self.launcher = None
        self.scratch_bytes = 0
        self.stream_of = None
        self.descriptors = None
        self.encoded = {}

    def attach(self, compiled: Any) -> None:
        """Launch through ``compiled`` (a CompiledKernel) from now on; anything else keeps the jitted path."""
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return
        launcher = compiled.run  # loads the binary and builds the launcher once, here
        self.compiled = compiled
        self.function = compiled.function
        self.stream_of = driver.active.get_current_stream
        # Global scratch (descriptors built on the device) as triton sizes it: programs x CTAs x bytes a program.
        metadata = compiled.metadata
        programs = self.grid[0] * self.grid[1] * self.grid[2]
        self.scratch_bytes = programs * getattr(metadata, "num_ctas", 1) * getattr(metadata, "global_scratch_size", 0)
        # triton 3.4-3.6's CudaLauncher wraps its C ``launch`` with per-call scratch allocation through triton's
        # allocator; calling ``launch`` itself (the same arguments) skips that wrapper, and ``launch`` takes a
        # torch buffer for the global scratch. triton 3.9's ``launch`` takes another argument list (it has
        # ``arg_annotations``), so it keeps the wrapper.
        if (
            hasattr(launcher, "global_scratch_size")
            and getattr(launcher, "profile_scratch_size", 0) == 0
            and hasattr(launcher, "launch")
            and hasattr(launcher, "launch_cooperative_grid")
            and hasattr(launcher, "launch_pdl")
            and not hasattr(launcher, "arg_annotations")
        ):
            self.launcher = launcher
            self.descriptors = descriptor_slots(launcher.launch)

    def launch(self, device_index: int, *args: Any) -> None:
        compiled = self.compiled
        if compiled is None:
            self.jit[self.grid](*args, **self.const_kwargs, **self.options)
            return
        stream = self.stream_of(device_index)
        enter, exit_hook = _launch_hooks()
        full = (*args, *self.const_args)
        grid = self.grid
        launcher = self.launcher
        metadata = compiled.launch_metadata(grid, stream, *full) if enter is not None else None
        if launcher is not None:
            # From torch's caching allocator on the current stream (the launch's): reused only in stream order,
            # and drawn from the graph's private pool while a CUDA graph captures.
            scratch = None
            if self.scratch_bytes:
                scratch = torch.empty(self.scratch_bytes, dtype=torch.int8, device=device_index)
            launch = launcher.launch
            if self.descriptors is not None:
                launch, full = self.descriptors[0], self.expand(full)
            launch(
                grid[0], grid[1], grid[2], stream, self.function, launcher.launch_cooperative_grid,
                launcher.launch_pdl, scratch, None, compiled.packed_metadata, metadata, enter, exit_hook, *full,
            )  # fmt: skip
            return
        with scratch_allocator() if self.scratch_bytes else contextlib.nullcontext():
            compiled.run(
                grid[0], grid[1], grid[2], stream, self.function, compiled.packed_metadata, metadata, enter, exit_hook,
                *full,
            )  # fmt: skip

    def expand(self, full: tuple) -> list:
        """``full`` with each host TMA descriptor replaced by its encoded form (the CUtensorMap, shape, strides),
        as triton's wrapper would pass it to the C launch. The plan's signature fixes every descriptor's shape,
        strides and block, so the encoding depends on the base address alone and is kept per (argument,
        address): a weight is encoded once, and an activation whose buffer the caching allocator hands out
        again is not encoded again."""
        _, slots, encode = self.descriptors
        encoded = self.encoded
        expanded = []
        start = 0
        for index, meta in slots:
            expanded.extend(full[start:index])
            descriptor = full[index]
            key = (index, descriptor.base.data_ptr())
            value = encoded.get(key)
            if value is None:
                if len(encoded) >= MAX_ENCODED:
                    encoded.clear()
                value = encoded[key] = tuple(encode(descriptor, meta))
            expanded.extend(value)
            start = index + 1
        expanded.extend(full[start:])
        return expanded


def descriptor_slots(launch: Any) -> tuple[Callable, tuple[tuple[int, Any], ...], Callable] | None:
    """``(C launch, ((argument index, descriptor metadata), ...), encode)`` for a launch that triton 3.4-3.6 wraps
    with ``wrap_handle_tensordesc`` (a kernel taking host TMA descriptors), read off the wrapper's closure; None
    for any other launch, which then runs as it is.

    The wrapper encodes every descriptor into a CUtensorMap on every launch (``make_tensordesc_arg``, 9-20 us
    of host time per GEMM call on an H100 host, ``benchmarks/NOTES.md``); a plan encodes each (argument,
    address) once (``Plan.expand``) and calls the C launch itself, with triton's own encoder."""
    code, closure = getattr(launch, "__code__", None), getattr(launch, "__closure__", None)
    if code is None or not closure:
        return None
    cells = dict(zip(code.co_freevars, (cell.cell_contents for cell in closure), strict=True))
    raw, indices, metas = cells.get("launcher"), cells.get("tensordesc_indices"), cells.get("tensordesc_meta")
    encode = getattr(sys.modules.get(launch.__module__), "make_tensordesc_arg", None)
    if not callable(raw) or not indices or metas is None or len(metas) != len(indices):
        return None
    if getattr(getattr(encode, "__code__", None), "co_argcount", None) != 2:  # (descriptor, metadata) as in 3.4-3.6
        return None
    if any(meta is None for meta in metas):  # descriptors passed as pointers, shapes and strides: keep triton's
        return None
    return raw, tuple(zip(sorted(indices), metas, strict=True)), encode


# Encoded descriptors a plan keeps before it starts again (each is a 128-byte CUtensorMap and a few ints).
MAX_ENCODED = 256


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """A triton allocator: ``size`` bytes from torch's caching allocator on the current device and stream (its
    blocks are 512-byte aligned, past any alignment triton asks)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def scratch_allocator() -> Iterator[None]:
    """Lends triton's launch path torch's allocator for global scratch while the block runs, where the user has
    set no allocator of their own (``triton.set_allocator``); the ContextVar is reset afterwards."""
    if _allocation is None or not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(_torch_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _active(hook: Any) -> Any:
    """``hook``, or None when it would do nothing: triton 3.5+ keeps an always-present HookChain whose empty
    ``calls`` list the C launcher would still call into (with a LazyDict of metadata built per launch)."""
    return hook if hook is not None and getattr(hook, "calls", True) else None


def _launch_hooks() -> tuple[Any, Any]:
    """The (enter, exit) launch hooks a profiler such as proton installed, each None when none is."""
    if _knobs is None:
        return None, None
    return _active(_knobs.runtime.launch_enter_hook), _active(_knobs.runtime.launch_exit_hook)


def rows_view(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    """``t`` as (rows, cols) without a copy, or None when its leading dims do not flatten to one row stride."""
    try:
        return t.view(rows, cols)
    except RuntimeError:
        return None


def check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """An ``out=`` buffer an op writes into: contiguous, of the op's output shape and dtype, 16-byte aligned (the
    kernels are compiled for aligned outputs, and plans do not key on the output's address)."""
    if out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}; expected a contiguous {dtype} {shape}")
    if out.data_ptr() % 16:
        raise ValueError(f"out starts {out.data_ptr() % 16} bytes past a 16-byte boundary; expected an aligned buffer")


class PlanCache:
    """Plans by call signature, with counters the tests read (``builds`` and ``hits``)."""

    def __init__(self, name: str):
        self.name = name
        self.plans: OrderedDict[Hashable, Plan] = OrderedDict()
        self.builds = 0
        self.hits = 0

    def get(self, key: Hashable) -> Plan | None:
        plan = self.plans.get(key)
        if plan is not None:
            self.hits += 1
        return plan

    def add(self, key: Hashable, plan: Plan) -> Plan:
        self.builds += 1
        self.plans[key] = plan
        if len(self.plans) > MAX_PLANS:
            self.plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        self.plans.clear()
        self.builds = self.hits = 0


def first_launch(
    kernel: Any,
    grid: Callable[[dict[str, Any]], tuple[int, ...]] | tuple[int, ...],
    names: Sequence[str],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    config: triton.Config | None = None,
) -> Plan:
    """Runs ``kernel`` through triton's own path (compiling and autotuning as needed) and returns its plan.

    ``names`` are the runtime parameters that ``args`` fill, in order; ``kwargs`` the constexprs and launch
    options (num_warps, num_stages) the op sets itself. ``config`` pins a config instead of autotuning.
    """
    layers = _layers(kernel)
    if config is not None:
        # Skip the autotuner: the next layer (heuristics, or the jitted function) takes the config's values.
        layers = [layer for layer in layers if type(layer).__name__ != "Autotuner"]
        kwargs = {**kwargs, **config.all_kwargs()}
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(names, args, strict=True)), **kwargs})
    with scratch_allocator():
        compiled = layers[0][grid](*args, **kwargs)
    tuner = next((layer for layer in layers if type(layer).__name__ == "Autotuner"), None)
    chosen = config if config is not None else (tuner.best_config if tuner is not None else None)
    values = {**dict(zip(names, args, strict=True)), **kwargs}
    if chosen is not None:
        values.update(chosen.all_kwargs())
    for layer in layers:
        for name, heuristic in getattr(layer, "values", {}).items():
            values[name] = heuristic(values)
    options = {key: values[key] for key in ("num_warps", "num_stages") if key in values}
    plan = Plan(layers[-1], names, grid(values) if callable(grid) else grid, values, chosen, options)
    plan.attach(compiled)
    return plan


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): the size of a persistent grid."""
    return cuda_properties(device).multi_processor_count if device.type == "cuda" else 1


def cuda_properties(device: torch.device) -> Any:
    """``torch.cuda.get_device_properties`` of a CUDA device (the current one for a bare "cuda"), read once per
    device: the kernels' launch decisions (SM count, compute capability, shared memory) ask for it per plan."""
    return _cuda_properties(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_properties(device_index: int) -> Any:
    return torch.cuda.get_device_properties(device_index)
