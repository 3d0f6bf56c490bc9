"""Pre-norm residual add + LayerNorm: ``residual_out = x + residual``, ``out = LayerNorm(residual_out)``.

One pass over each row, as in the fused "dropout + add + LayerNorm" forward of Apex and flash-attention
(github.com/Dao-AILab/flash-attention, ``flash_attn/ops/triton/layer_norm.py``): a program loads a tile of
BLOCK_M whole rows of x (and the residual), adds them in fp32 and rounds the sum to x's dtype (the model
dtype, which is what transformers' ``hidden_states + residual`` produces), stores that as residual_out,
then takes the mean and the variance of the rounded sum in fp32 and writes the normalized, scaled and
shifted row. The row stays in registers between the two reductions, so the variance is the exact
two-pass ``mean((x - mean)^2)`` at no extra memory traffic.

Trade-offs: a row is held whole in registers (BLOCK_N = next power of two of N, masked): one read of
each input and no second pass, at the cost of idle lanes when N is just past a power of two (1152 fills
56% of a 2048 tile; masked lanes move no bytes, they only hold registers). That suits the encoders'
768-1664 columns and stays correct, though it spills, up to MAX_FUSED_N; wider rows run the eager
reference. Narrow rows are grouped several to a program so that each program moves enough bytes to
hide memory latency. Non-contiguous inputs are copied once to a row-major layout; a view whose rows are
strided but whose last dimension is contiguous is read in place. Inference only: no backward is registered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vitriton.kernels._dispatch import use_triton

# Widest row the fused kernel takes: beyond this a whole row no longer fits a program's registers.
MAX_FUSED_N = 32768


@triton.jit
def _add_layer_norm_fwd_kernel(
    x_ptr,  # (M, N) fp32/fp16/bf16, row stride stride_x_row, unit column stride
    residual_ptr,  # (M, N) x's dtype, row stride stride_residual_row; unused unless HAS_RESIDUAL
    weight_ptr,  # (N,) any float dtype
    bias_ptr,  # (N,) any float dtype; unused unless HAS_BIAS
    out_ptr,  # (M, N) x's dtype, row stride stride_out_row
    residual_out_ptr,  # (M, N) x's dtype, row stride stride_residual_out_row; unused unless HAS_RESIDUAL
    stride_x_row,
    stride_residual_row,
    stride_out_row,
    stride_residual_out_row,
    M,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # 64-bit rows: row * stride passes 2^31 once M * N does (93312 rows of 23k columns).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]

    x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + rows[:, None] * stride_residual_row + cols[None, :], mask=mask, other=0.0)
        # One rounding of the exact fp32 sum, the same value torch's ``x + residual`` gives.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + rows[:, None] * stride_residual_out_row + cols[None, :], x, mask=mask)

    h = x.to(tl.float32)
    mean = tl.sum(h, axis=1) / N
    centered = tl.where(mask, h - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / N
    rstd = tl.rsqrt(var + eps)

    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = centered * rstd[:, None] * weight[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        out += bias[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out_row + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def layer_norm_config(n_cols: int, element_size: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` for rows of ``n_cols`` elements of ``element_size`` bytes.

    Each thread gets two 16-byte vectors of every row tile it reads (x and residual), enough loads in
    flight per SM to cover HBM latency while keeping registers for several resident programs; rows
    narrower than 2048 elements are grouped so that a program covers at least 2048 columns' worth.
    """
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, 2048 // block_n)
    vector = max(1, 16 // element_size)
    num_warps = min(max(block_m * block_n // (32 * 2 * vector), 1), 16)
    return block_m, block_n, num_warps


def _flatten_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with a unit column stride; a view when the layout allows it, else one copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[0] == 0 else rows.contiguous()


def check_layer_norm_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
) -> None:
    if x.dim() == 0:
        raise ValueError("x is a 0-d tensor; expected (..., N)")
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({n_cols},) to match x's last dim")
    if bias is not None and bias.shape != (n_cols,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({n_cols},) to match x's last dim")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual is {tuple(residual.shape)} {residual.dtype}; expected x's {tuple(x.shape)} {x.dtype}"
        )


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launches the fused kernel. Returns ``(out, residual_out)``, ``residual_out`` None without a residual.

    ``out`` / ``residual_out``: optional contiguous buffers of x's shape and dtype to write into (tests
    poison them). ``block_m`` / ``num_warps`` override :func:`layer_norm_config` (benchmark sweeps).
    """
    check_layer_norm_inputs(x, weight, bias, residual)
    n_cols = x.shape[-1]
    if n_cols > MAX_FUSED_N:
        raise ValueError(f"layer_norm_triton takes rows of at most {MAX_FUSED_N} elements; got {n_cols}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is not None and residual_out is None:
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for name, buffer in (("out", out), ("residual_out", residual_out)):
        if buffer is not None and (buffer.shape != x.shape or buffer.dtype != x.dtype or not buffer.is_contiguous()):
            raise ValueError(
                f"{name} is {tuple(buffer.shape)} {buffer.dtype}, contiguous={buffer.is_contiguous()}; "
                f"expected a contiguous {tuple(x.shape)} {x.dtype} buffer"
            )
    if residual is None:
        residual_out = None

    x_rows = _flatten_rows(x)
    n_rows = x_rows.shape[0]
    if n_rows == 0 or n_cols == 0:
        return out, residual_out
    residual_rows = _flatten_rows(residual) if residual is not None else x_rows
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out_rows = out.view(n_rows, n_cols)
    residual_out_rows = residual_out.view(n_rows, n_cols) if residual_out is not None else out_rows

    default_block_m, block_n, default_num_warps = layer_norm_config(n_cols, x.element_size())
    block_m = block_m or default_block_m
    num_warps = num_warps or default_num_warps
    _add_layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x_rows,
        residual_rows,
        weight,
        bias if bias is not None else weight,
        out_rows,
        residual_out_rows,
        x_rows.stride(0),
        residual_rows.stride(0),
        out_rows.stride(0),
        residual_out_rows.stride(0),
        n_rows,
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out, residual_out


# Two ops, because a custom op may not return one of its inputs: without a residual, residual_out is x
# itself, which the public function hands back around the op.
@torch.library.custom_op("vitriton::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    out, _ = layer_norm_triton(x, weight, bias, eps)
    return out


@_layer_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("vitriton::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return layer_norm_triton(x, weight, bias, eps, residual)


@_add_layer_norm_op.register_fake
def _(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


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
    check_layer_norm_inputs(x, weight, bias, residual)
    if use_triton(x, weight, bias, residual, eager=eager) and 0 < x.shape[-1] <= MAX_FUSED_N:
        if residual is None:
            return torch.ops.vitriton.layer_norm(x, weight, bias, eps), x
        return torch.ops.vitriton.add_layer_norm(x, residual, weight, bias, eps)
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
