"""Multi-head attention with fp32 softmax, non-causal (vision) or causal with key padding (CLIP text)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitriton.kernels._dispatch import use_triton


def check_attention_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one (batch, heads, seq, head_dim) shape; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(
            f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (batch, seq) = "
            f"{(q.shape[0], q.shape[2])}"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    eager: bool | None = None,
) -> torch.Tensor:
    """q, k, v: (B, H, S, D); key_padding_mask: (B, S) bool, True = attend. Returns (B, S, H * D).

    Rows with no key to attend to give zeros.
    """
    check_attention_shapes(q, k, v, key_padding_mask)
    if use_triton(q, k, v, eager=eager):
        raise NotImplementedError("Triton attention lands with the kernels issue")
    return attention_reference(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager reference: upcasts to fp32, so the softmax is fp32 whatever the input dtype."""
    batch, heads, seq, head_dim = q.shape
    allowed = None
    if causal:
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        keys = key_padding_mask.to(torch.bool)[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, scale=scale)
    if allowed is not None:
        out = out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return out.to(q.dtype).transpose(1, 2).reshape(batch, seq, heads * head_dim)
