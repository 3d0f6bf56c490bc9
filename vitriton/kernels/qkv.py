"""QKV projection: one GEMM over the packed ``[q; k; v]`` weight, written head-split for attention.

The main loop is the shared tiled GEMM (``_matmul.py``). The epilogue adds the bias and stores every output
element straight to its place in one (3, B, H, S, D) buffer: row m = b * S + s and
column n = which * H * D + h * D + d go to ``which * (B*H*S*D) + b * (H*S*D) + h * (S*D) + s * D + d``. The
address splits into a row part and a column part, so N tiles need not align with heads (head_dim 72 or 104
against 128-wide tiles). This replaces eager's ``view/permute/contiguous`` copy, a full extra read and write
of the projection, with nothing.

Epilogue cost: heads and head_dim are compile-time constants, so splitting a column into (which, h, d) is a
multiply-shift rather than a runtime integer division per column (that cuts the epilogue from ~2700 to ~900
instructions a thread at 128x256 tiles); the price is one compile per (heads, head_dim), i.e. per model and
tensor-parallel degree.
Inside a tile the column addresses run contiguously only within a head, so the kernel is told
(``tl.max_contiguous``) that they come in aligned runs of ``VEC``, the largest power of two dividing head_dim
(8 for 72 and 104, 16 for 64 and 80); that keeps the stores 16-byte vectors where a plain scatter would
store 2 bytes at a time.

Launch cost: as ``linear``, a launch plan per signature (``_launch.py``) holds the config, grid, compiled kernel
and the weight's TMA descriptor, so a steady-state call looks the plan up, allocates the output and launches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vitriton.kernels._dispatch import use_triton
from vitriton.kernels._launch import PlanCache, check_out, first_launch, rows_view
from vitriton.kernels._matmul import (
    SMALL_M,
    check_operands,
    dot_is_ieee,
    even_k,
    gemm_tile,
    launch_gemm_plan,
    m_bucket,
    matmul_configs,
    matmul_grid,
    matmul_operands,
    plan_operand,
    prune_matmul_configs,
)


def check_qkv_shapes(x: torch.Tensor, weight: torch.Tensor, num_heads: int) -> int:
    """Validates the packed weight against ``num_heads``; returns head_dim."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"packed qkv weight has shape {tuple(weight.shape)}; expected (3 * heads * head_dim, {x.shape[-1]})"
        )
    if num_heads <= 0 or weight.shape[0] % (3 * num_heads):
        raise ValueError(f"packed qkv weight has {weight.shape[0]} rows, not divisible into 3 x {num_heads} heads")
    return weight.shape[0] // (3 * num_heads)


def store_vector_width(head_dim: int) -> int:
    """Largest power of two dividing head_dim, at most 16: the aligned run length of the q/k/v addresses."""
    return min(head_dim & -head_dim, 16)


@triton.autotune(
    configs=matmul_configs(),
    key=["M_BUCKET", "N", "K", "USE_TMA"],
    prune_configs_by={"early_config_prune": prune_matmul_configs},
)
@triton.heuristics({"EVEN_K": even_k})
@triton.jit(do_not_specialize=["M", "M_BUCKET", "SEQ"])
def _qkv_kernel(
    x,  # (M, K), M = B * S; a TMA descriptor when USE_TMA, else a pointer
    w,  # (N, K), N = 3 * H * D, rows [q heads; k heads; v heads]; as x
    bias_ptr,  # (N,) contiguous; None without bias
    out_ptr,  # (3, B, H, S, D) contiguous
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    SEQ,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    VEC: tl.constexpr,
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
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    width = HEADS * HEAD_DIM
    which = cols // width
    head = (cols - which * width) // HEAD_DIM
    d = cols - which * width - head * HEAD_DIM

    batch = rows // SEQ
    row_offsets = batch.to(tl.int64) * SEQ * width + (rows - batch * SEQ).to(tl.int64) * HEAD_DIM
    col_offsets = which.to(tl.int64) * M * width + (head * SEQ).to(tl.int64) * HEAD_DIM + d
    # Every offset is a multiple of VEC where a run starts: VEC divides head_dim and BLOCK_N, so no head (or
    # q/k/v) boundary falls inside an aligned run of VEC columns.
    row_offsets = tl.multiple_of(row_offsets, VEC)
    col_offsets = tl.max_contiguous(tl.multiple_of(col_offsets, VEC), VEC)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    out_ptrs = out_ptr + row_offsets[:, None] + col_offsets[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_RUNTIME_ARGS = (
    "x",
    "w",
    "bias_ptr",
    "out_ptr",
    "M",
    "N",
    "K",
    "M_BUCKET",
    "SEQ",
    "stride_xm",
    "stride_xk",
    "stride_wn",
    "stride_wk",
)
PLANS = PlanCache("qkv_projection")


def qkv_projection_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    *,
    out: torch.Tensor | None = None,
    tma: bool | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Launches the kernel; returns the packed (3, B, H, S, D) buffer (``out`` when given) that q, k, v view.

    ``tma`` and ``config`` as in ``linear_triton``.
    """
    key = (
        x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16,
        weight.shape, weight.stride(), weight.dtype, weight.device, weight.data_ptr() % 16,
        None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device, bias.data_ptr() % 16),
        num_heads, tma, config,
    )  # fmt: skip
    entry = PLANS.get(key)
    if entry is None:
        return _plan_qkv(key, x, weight, bias, num_heads, out, tma, config)
    return launch_gemm_plan(entry, x, weight, bias, out)


def _plan_qkv(key, x, weight, bias, num_heads, out, tma, config) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (batch, seq, hidden)")
    check_operands(x, weight)
    head_dim = check_qkv_shapes(x, weight, num_heads)
    n, k = weight.shape
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1 or bias.device != x.device):
        raise ValueError(f"bias is {tuple(bias.shape)} on {bias.device}; expected a contiguous ({n},) on {x.device}")
    batch, seq = x.shape[0], x.shape[1]
    shape = (3, batch, num_heads, seq, head_dim)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        check_out(out, shape, x.dtype)
    if out.numel() == 0:
        return out
    m = batch * seq
    x2d = rows_view(x, m, k)
    if x2d is None:
        # (batch, seq) does not flatten to one row stride: copy once, and plan the copy's layout.
        return qkv_projection_triton(x.contiguous(), weight, bias, num_heads, out=out, tma=tma, config=config)
    x_operand, w_operand, use_tma = matmul_operands(x2d, weight, tma)
    static = (m, n, k, m_bucket(m), seq, x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1))
    plan = first_launch(
        _qkv_kernel,
        matmul_grid(m, n),
        _RUNTIME_ARGS,
        (x_operand, w_operand, bias, out, *static),
        dict(
            HEADS=num_heads,
            HEAD_DIM=head_dim,
            HAS_BIAS=bias is not None,
            IEEE_DOT=dot_is_ieee(x.dtype),
            VEC=store_vector_width(head_dim),
            USE_TMA=use_tma,
        ),
        config,
    )
    PLANS.add(key, (plan, plan_operand(x_operand), plan_operand(w_operand), None, shape, static))
    return out


# Returns the packed buffer, not three views of it: a custom op's outputs may not alias one another.
@torch.library.custom_op("vitriton::qkv_projection", mutates_args=())
def _qkv_projection_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int
) -> torch.Tensor:
    return qkv_projection_triton(x, weight, bias, num_heads)


@_qkv_projection_op.register_fake
def _qkv_projection_fake(x, weight, bias, num_heads):
    head_dim = check_qkv_shapes(x, weight, num_heads)
    return x.new_empty((3, x.shape[0], num_heads, x.shape[1], head_dim))


# From this many rows (batch * seq) up, a CUDA call runs cuBLAS into the packed (B, S, 3 * H * D) layout and
# returns q, k and v as strided views of it, which the attention kernel reads as they are: the head split then
# costs no pass at all, and cuBLAS's GEMM beat our head-split epilogue there (benchmarks/results/h100).
PACKED_MIN_ROWS = SMALL_M + 1


def qkv_projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    *,
    eager: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x``: (B, S, K) -> q, k, v each (B, heads, S, head_dim), views of one packed buffer: head-split
    (contiguous per head) from the Triton kernel, or strided views of cuBLAS's output at ``PACKED_MIN_ROWS``."""
    if not use_triton(x, eager, weight, bias) or (x.is_cuda and x.shape[0] * x.shape[1] >= PACKED_MIN_ROWS):
        return qkv_projection_reference(x, weight, bias, num_heads)
    if torch.compiler.is_compiling():
        return _qkv_projection_op(x, weight, bias, num_heads).unbind(0)
    return qkv_projection_triton(x, weight, bias, num_heads).unbind(0)


def qkv_projection_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head_dim = check_qkv_shapes(x, weight, num_heads)
    batch, seq = x.shape[0], x.shape[1]
    packed = F.linear(x, weight, bias).view(batch, seq, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    return packed.unbind(0)
