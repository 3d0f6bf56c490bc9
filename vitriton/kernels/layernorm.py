"""Pre-norm residual add + LayerNorm: ``residual_out = x + residual``, ``out = LayerNorm(residual_out)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitriton.kernels._dispatch import use_triton


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    eager: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, residual_out)``; with ``residual=None``, ``residual_out`` is ``x`` itself."""
    if use_triton(x, weight, eager=eager):
        raise NotImplementedError("Triton layer_norm lands with the kernels issue")
    return layer_norm_reference(x, weight, bias, eps, residual)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference: the residual add rounds to x's dtype (as transformers does); statistics in fp32."""
    residual_out = x if residual is None else x + residual
    out = F.layer_norm(
        residual_out.float(),
        (residual_out.shape[-1],),
        weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    return out.to(x.dtype), residual_out
