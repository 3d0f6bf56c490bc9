"""QKV projection: one GEMM over the packed ``[q; k; v]`` weight, written head-split for attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitriton.kernels._dispatch import use_triton


def check_qkv_shapes(x: torch.Tensor, weight: torch.Tensor, num_heads: int) -> int:
    """Validates the packed weight against ``num_heads``; returns head_dim."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"packed qkv weight has shape {tuple(weight.shape)}; expected (3 * heads * head_dim, {x.shape[-1]})"
        )
    if num_heads <= 0 or weight.shape[0] % (3 * num_heads):
        raise ValueError(f"packed qkv weight has {weight.shape[0]} rows, not divisible into 3 x {num_heads} heads")
    return weight.shape[0] // (3 * num_heads)


def qkv_projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    *,
    q_scale: float | None = None,
    eager: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x``: (B, S, K) -> q, k, v each (B, heads, S, head_dim); ``q_scale`` multiplies q when given."""
    check_qkv_shapes(x, weight, num_heads)
    if use_triton(x, weight, eager=eager):
        raise NotImplementedError("Triton qkv_projection lands with the kernels issue")
    return qkv_projection_reference(x, weight, bias, num_heads, q_scale=q_scale)


def qkv_projection_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    *,
    q_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head_dim = check_qkv_shapes(x, weight, num_heads)
    batch, seq = x.shape[0], x.shape[1]
    packed = F.linear(x, weight, bias).view(batch, seq, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = packed.unbind(0)
    if q_scale is not None:
        q = q * q_scale
    return q, k, v
