"""Timing shared by the benchmarks: device-synchronised medians after warm-up, first calls, compute ceilings."""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch


def median_ms(fn: Callable[[], object], *, warmup: int = 5, reps: int = 30) -> float:
    """Median wall time of ``fn`` in milliseconds; CUDA work is timed with events."""
    on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(warmup):
        fn()
    if on_cuda:
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def flushed_ms(fn: Callable[[], object], *, reps: int = 3) -> float:
    """Median milliseconds of ``fn`` with the L2 cache flushed before every call (``triton.testing.do_bench``)
    on CUDA, as a layer meets its weights in a full forward; without CUDA a plain ``median_ms`` of ``reps``."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    return median_ms(fn, warmup=1, reps=reps)


@contextlib.contextmanager
def fast_tanh(dtype: torch.dtype, form: str | None) -> Iterator[None]:
    """Inside, ``linear`` evaluates the activations' tanh for ``dtype`` outputs as ``form`` (``linear.FAST_TANH``,
    part of the plan key); None leaves the default."""
    from vitriton.kernels.linear import FAST_TANH

    saved = FAST_TANH.get(dtype)
    if form is not None:
        FAST_TANH[dtype] = form
    try:
        yield
    finally:
        if saved is None:
            FAST_TANH.pop(dtype, None)
        else:
            FAST_TANH[dtype] = saved


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def versions() -> dict[str, str]:
    import transformers
    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": str(torch.version.cuda),
        "device": gpu_name(),
    }


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


def first_call(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds taken by one device-synchronised call (compilation included when it is the first), and its result."""
    synchronize()
    t0 = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - t0, result


def reps_for(call_ms: float, budget_s: float, *, at_least: int, at_most: int) -> int:
    """How many calls of ``call_ms`` fit in ``budget_s``, clamped to [at_least, at_most]."""
    fitting = int(budget_s * 1e3 / max(call_ms, 1e-3))
    return max(at_least, min(at_most, fitting))


def matmul_tflops(n: int, dtype: torch.dtype, device: torch.device | str, *, seconds: float = 1.0) -> float:
    """TFLOP/s of an (n, n) @ (n, n) matmul, the compute ceiling the encoders are compared with.

    The first ``seconds / 2`` is warm-up, so the clocks have ramped before the timed half.
    """
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    call_ms = median_ms(lambda: a @ b, warmup=1, reps=3)
    reps = reps_for(call_ms, seconds / 2, at_least=3, at_most=500)
    ms = median_ms(lambda: a @ b, warmup=reps, reps=reps)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in fp32; NaN or inf in ``out`` gives inf."""
    diff = out.float() - ref.float()
    if not torch.isfinite(diff).all():
        return float("inf")
    return (torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref.float()).clamp_min(1e-30)).item()


def fresh_compile_caches(root: str | os.PathLike[str]) -> None:
    """Make the next compilation start cold, so a first call counts every compile.

    Points Triton's and Inductor's on-disk caches at new, empty directories under ``root``, drops the frames
    dynamo compiled, and forgets the compiled binaries and autotune picks that vitriton's Triton kernels hold
    in memory (Triton keeps those per kernel object for the life of the process).
    """
    directory = tempfile.mkdtemp(dir=root)
    os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(directory, "inductor")
    torch._dynamo.reset()
    forget_triton_kernels("vitriton.kernels")


def forget_triton_kernels(package: str) -> int:
    """Clear the in-memory compiled kernels and autotune results of every Triton kernel in ``package``.

    Returns how many kernels were cleared; a package that cannot be imported clears none.
    """
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction, KernelInterface

        root = importlib.import_module(package)
    except ImportError:
        return 0
    modules = [root]
    if hasattr(root, "__path__"):
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            modules.append(importlib.import_module(info.name))
    cleared = 0
    for module in modules:
        for obj in list(vars(module).values()):
            # Autotuner and Heuristics wrap the JITFunction in ``.fn``; walk down to it.
            while isinstance(obj, KernelInterface):
                if isinstance(obj, Autotuner):
                    obj.cache.clear()
                if isinstance(obj, JITFunction):
                    obj.device_caches.clear()
                    cleared += 1
                    break
                obj = getattr(obj, "fn", None)
    return cleared


def write_rows(path: str | os.PathLike[str], benchmark: str, rows: list[dict], **extra: object) -> None:
    """The JSON every op benchmark writes: its name, the versions, its rows and anything extra."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, "versions": versions(), "rows": rows, **extra}, indent=2))
    print(f"wrote {path}")


def run_benchmark(benchmark, fn: Callable[[], object], group: str) -> None:
    """pytest-benchmark timing of ``fn`` (device-synchronised), after one call that tunes and compiles."""
    fn()

    def run() -> None:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    benchmark.group = group
    benchmark(run)
