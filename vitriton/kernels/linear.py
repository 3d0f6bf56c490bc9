"""Linear layer with bias, activation and residual add fused into one pass: ``act(x @ W^T + b) + residual``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from vitriton.kernels._dispatch import use_triton

ACTIVATIONS = (None, "quick_gelu", "gelu", "gelu_pytorch_tanh")


def check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; expected one of {ACTIVATIONS}")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    *,
    eager: bool | None = None,
) -> torch.Tensor:
    """``x``: (..., K); ``weight``: (N, K) as nn.Linear stores it; ``residual``: (..., N) added last."""
    check_activation(activation)
    if use_triton(x, weight, eager=eager):
        raise NotImplementedError("Triton linear lands with the kernels issue")
    return linear_reference(x, weight, bias, activation, residual)


def linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    out = F.linear(x, weight, bias)
    if activation is not None:
        out = ACT2FN[activation](out)
    if residual is not None:
        out = out + residual
    return out
