"""Which implementation an op runs: our Triton kernel or the eager torch reference beside it.

CUDA tensors run Triton. CPU tensors run eager, unless TRITON_INTERPRET=1 is set, in which case the
Triton kernels run through the interpreter (the CPU test suite relies on this). The eager path can be
forced on any device, for A/B runs, three ways: an op's ``eager=True`` argument, the
``VITRITON_EAGER=1`` environment variable, or the :func:`eager_mode` context manager.
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


def interpreting() -> bool:
    return _env_flag("TRITON_INTERPRET")


@contextlib.contextmanager
def eager_mode(enabled: bool = True) -> Iterator[None]:
    """Run every vitriton op inside the block on its eager reference (``enabled=False`` undoes an outer one)."""
    previous = getattr(_state, "eager", None)
    _state.eager = enabled
    try:
        yield
    finally:
        _state.eager = previous


def use_triton(*tensors: torch.Tensor | None, eager: bool | None = None) -> bool:
    """True when the op should run its Triton kernel on these tensors."""
    if eager is None:
        eager = getattr(_state, "eager", None)
    if eager is None:
        eager = _env_flag("VITRITON_EAGER")
    if eager:
        return False
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return True
    if devices == {"cpu"}:
        return interpreting()
    return False
