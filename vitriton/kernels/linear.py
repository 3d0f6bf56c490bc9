"""Linear layer with bias, activation and residual add fused into one pass: ``act(x @ W^T + b) + residual``.

One tiled GEMM (the main loop in ``_matmul.py``) whose epilogue adds the bias, applies the activation and adds
the residual in fp32 on the accumulator before the single rounding store. Eager runs these as up to four
kernels (quick_gelu alone is three), each a full read and write of the (M, N) output; fused they cost nothing
but the residual's read.

The activations follow transformers' ACT2FN: quick_gelu ``x * sigmoid(1.702 x)``; gelu the exact erf form;
gelu_pytorch_tanh the tanh approximation, computed as ``x * sigmoid(2u)``, which equals
``0.5 x (1 + tanh(u))`` and needs no tanh instruction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from transformers.activations import ACT2FN

from vitriton.kernels._dispatch import use_triton
from vitriton.kernels._matmul import (
    check_operands,
    dot_is_ieee,
    even_k,
    gemm_tile,
    m_bucket,
    matmul_configs,
    matmul_grid,
    matmul_operands,
    prune_matmul_configs,
)

ACTIVATIONS = (None, "quick_gelu", "gelu", "gelu_pytorch_tanh")


def check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; expected one of {ACTIVATIONS}")


@triton.jit
def activate(x, ACTIVATION: tl.constexpr):
    """``ACTIVATION`` of fp32 ``x``; "none" passes x through."""
    if ACTIVATION == "quick_gelu":
        y = x * tl.sigmoid(1.702 * x)
    elif ACTIVATION == "gelu":
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))  # 1 / sqrt(2)
    elif ACTIVATION == "gelu_pytorch_tanh":
        y = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 * sqrt(2 / pi)
    else:
        y = x
    return y


@triton.autotune(
    configs=matmul_configs(),
    key=["M_BUCKET", "N", "K", "ACTIVATION", "USE_TMA"],
    prune_configs_by={"early_config_prune": prune_matmul_configs},
)
@triton.heuristics({"EVEN_K": even_k})
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_kernel(
    x,  # (M, K); a TMA descriptor when USE_TMA, else a pointer
    w,  # (N, K); as x
    bias_ptr,  # (N,) contiguous; None without bias
    residual_ptr,  # (M, N); None without residual
    out_ptr,  # (M, N)
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n, acc = gemm_tile(
        x,
        w,
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        GROUP_M,
        EVEN_K,
        IEEE_DOT,
        USE_TMA,
    )
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    acc = activate(acc, ACTIVATION)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask)
        acc += residual.to(tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """Launches the fused kernel; ``out``, when given, is a (..., N) buffer the result is written into.

    x keeps its strides when its leading dims flatten to a view; otherwise ``reshape`` copies it once.
    ``tma`` picks the main loop: None decides per call, True and False force it (see ``matmul_operands``).
    """
    check_activation(activation)
    check_operands(x, weight)
    n, k = weight.shape
    shape = (*x.shape[:-1], n)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({n},)")
    if residual is not None and residual.shape != shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}; expected {shape}")
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif out.shape != shape or out.dtype != x.dtype:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}; expected {x.dtype} {shape}")
    if out.numel() == 0:
        return out
    out2d = out.view(-1, n)
    m = out2d.shape[0]
    x2d = x.reshape(m, k)
    residual2d = residual.reshape(m, n) if residual is not None else None
    x_operand, w_operand, use_tma = matmul_operands(x2d, weight, tma)
    _linear_kernel[matmul_grid(m, n)](
        x_operand,
        w_operand,
        bias.contiguous() if bias is not None else None,
        residual2d,
        out2d,
        m,
        n,
        k,
        m_bucket(m),
        x2d.stride(0),
        x2d.stride(1),
        weight.stride(0),
        weight.stride(1),
        residual2d.stride(0) if residual2d is not None else 0,
        residual2d.stride(1) if residual2d is not None else 0,
        out2d.stride(0),
        out2d.stride(1),
        ACTIVATION=activation or "none",
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        IEEE_DOT=dot_is_ieee(x.dtype),
        USE_TMA=use_tma,
    )
    return out


@torch.library.custom_op("vitriton::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    return linear_triton(x, weight, bias, activation, residual)


@_linear_op.register_fake
def _linear_fake(x, weight, bias, activation, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    *,
    eager: bool | None = None,
) -> torch.Tensor:
    """``x``: (..., K); ``weight``: (N, K) as nn.Linear stores it; ``residual``: (..., N) added last.

    With nothing to fuse beyond the bias (no activation, no residual) a CUDA call goes to cuBLAS, whose
    epilogue already adds the bias: on the H100 our GEMM reached 0.62-0.82x of it on those shapes
    (benchmarks/results/h100), so the Triton kernel runs where its epilogue saves a pass. ``linear_triton``
    runs the Triton kernel on any call.
    """
    check_activation(activation)
    if use_triton(x, weight, eager=eager):
        if activation is None and residual is None and x.is_cuda:
            return F.linear(x, weight, bias)
        return _linear_op(x, weight, bias, activation, residual)
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
