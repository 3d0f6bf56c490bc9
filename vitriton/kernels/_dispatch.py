"""Which implementation an op runs: our Triton kernel or the eager torch reference beside it.

CUDA tensors run Triton. CPU tensors run eager, unless TRITON_INTERPRET=1 is set, in which case the
Triton kernels run through the interpreter (the CPU test suite relies on this). The eager path can be
forced on any device, for A/B runs, three ways: an op's ``eager=True`` argument, the
``VITRITON_EAGER=1`` environment variable, or the :func:`eager_mode` context manager.

Both variables are read once: TRITON_INTERPRET when vitriton is imported (triton reads it at its own import,
so a later change would not take effect anyway), VITRITON_EAGER at the first op call, so that a process may
set it after importing vitriton but before running a model. Switch at run time with :func:`eager_mode`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


# Read once: triton reads it when it is first imported, so a later change would not take effect anyway.
_INTERPRETING = _env_flag("TRITON_INTERPRET")


def interpreting() -> bool:
    return _INTERPRETING


@contextlib.contextmanager
def eager_mode(enabled: bool = True) -> Iterator[None]:
    """Run every vitriton op inside the block on its eager reference (``enabled=False`` undoes an outer one)."""
    previous = getattr(_state, "eager", None)
    _state.eager = enabled
    try:
        yield
    finally:
        _state.eager = previous


def eager_override() -> bool | None:
    """The innermost ``eager_mode`` of this thread (None outside any)."""
    return getattr(_state, "eager", None)


_eager_env: bool | None = None


def autograd_records(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on ``tensors``: grad mode on and one of them requires grad. A plain
    loop: it runs on every op call, where a generator costs host time."""
    if torch.is_grad_enabled():
        for tensor in tensors:
            if tensor is not None and tensor.requires_grad:
                return True
    return False


def use_triton(x: torch.Tensor, eager: bool | None = None, *operands: torch.Tensor | None) -> bool:
    """True when an op whose first operand is ``x`` should run its Triton kernel.

    The op's other operands are checked against ``x`` when its launch plan is built; a mismatch (another
    device, another dtype) raises there rather than silently running eager. The kernels have no backward: when
    autograd records (grad mode on and ``x`` or one of ``operands`` requires grad), the op runs its eager
    reference, so gradients reach the inputs (and any parameter a caller unfroze) as in transformers. Under
    ``torch.jit.trace`` the op runs its eager reference too: a trace records torch ops, which a Triton launch is
    not, so the traced module (and an ONNX export made from it) holds transformers' formulas.
    """
    if autograd_records(x, *operands) or torch.jit.is_tracing():
        return False
    global _eager_env
    if eager is None:
        eager = getattr(_state, "eager", None)
        if eager is None:
            if _eager_env is None:
                _eager_env = _env_flag("VITRITON_EAGER")
            eager = _eager_env
    if eager:
        return False
    return x.is_cuda or (_INTERPRETING and x.device.type == "cpu")
