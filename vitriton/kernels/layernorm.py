"""Pre-norm residual add + LayerNorm: ``residual_out = x + residual``, ``out = LayerNorm(residual_out)``; or, with a
per-column ``shift`` instead of a residual, ``out = LayerNorm(x + shift)`` with the sum not stored.

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

The shift form serves a residual stream that the GEMMs before it update in place without their biases (cuBLAS
adds a residual through its C operand, not a residual and a bias together): the biases travel as one vector to
the next LayerNorm, which then reads one (M, N) tensor and writes one, where the residual form reads two and
writes two.

Launch cost: a launch plan per signature (``_launch.py``) holds the tile, the grid and the compiled kernel, so a
steady-state call looks it up, allocates its outputs and launches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vitriton.kernels._dispatch import use_triton
from vitriton.kernels._launch import PlanCache, first_launch, rows_view

# Widest row the fused kernel takes: beyond this a whole row no longer fits a program's registers.
MAX_FUSED_N = 32768


@triton.jit
def _add_layer_norm_fwd_kernel(
    x_ptr,  # (M, N) fp32/fp16/bf16, row stride stride_x_row, unit column stride
    residual_ptr,  # (M, N) x's dtype, row stride stride_residual_row, or a (N,) shift of any float dtype with
    # stride_residual_row 0; unused unless HAS_RESIDUAL
    weight_ptr,  # (N,) any float dtype
    bias_ptr,  # (N,) any float dtype; unused unless HAS_BIAS
    out_ptr,  # (M, N) x's dtype, row stride stride_out_row
    residual_out_ptr,  # (M, N) x's dtype, row stride stride_residual_out_row; unused unless STORE_RESIDUAL
    stride_x_row,
    stride_residual_row,
    stride_out_row,
    stride_residual_out_row,
    M,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RESIDUAL: tl.constexpr,
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
        if STORE_RESIDUAL:
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


def check_layer_norm_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    shift: torch.Tensor | None = None,
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
    if shift is not None:
        if residual is not None:
            raise ValueError("layer_norm takes a residual or a shift, not both")
        if shift.shape != (n_cols,) or not shift.is_floating_point():
            raise ValueError(
                f"shift is {tuple(shift.shape)} {shift.dtype}; expected a floating-point ({n_cols},), x's last dim"
            )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x has dtype {x.dtype}; expected float32, float16 or bfloat16")
    devices = {t.device for t in (x, weight, bias, residual, shift) if t is not None}
    if len(devices) != 1:
        raise ValueError(
            f"x, weight, bias and residual or shift are on {sorted(map(str, devices))}; expected one device"
        )


def check_buffer(name: str, buffer: torch.Tensor, x: torch.Tensor) -> None:
    if buffer.shape != x.shape or buffer.dtype != x.dtype or not buffer.is_contiguous():
        raise ValueError(
            f"{name} is {tuple(buffer.shape)} {buffer.dtype}, contiguous={buffer.is_contiguous()}; "
            f"expected a contiguous {tuple(x.shape)} {x.dtype} buffer"
        )


_RUNTIME_ARGS = (
    "x_ptr", "residual_ptr", "weight_ptr", "bias_ptr", "out_ptr", "residual_out_ptr",
    "stride_x_row", "stride_residual_row", "stride_out_row", "stride_residual_out_row", "M", "N", "eps",
)  # fmt: skip
PLANS = PlanCache("layer_norm")


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    shift: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launches the fused kernel. Returns ``(out, residual_out)``, ``residual_out`` None without a residual.

    ``shift``: a (N,) vector added to every row of x before the statistics, the sum rounded to x's dtype and not
    stored (exclusive with ``residual``). ``out`` / ``residual_out``: optional contiguous buffers of x's shape and
    dtype to write into (tests poison them). ``block_m`` / ``num_warps`` override :func:`layer_norm_config`
    (benchmark sweeps).
    """
    key = (
        x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16,
        None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.data_ptr() % 16),
        None if shift is None else (shift.shape, shift.stride(), shift.dtype, shift.device, shift.data_ptr() % 16),
        weight.shape, weight.stride(), weight.dtype, weight.device, weight.data_ptr() % 16,
        None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device, bias.data_ptr() % 16),
        eps, block_m, num_warps,
    )  # fmt: skip
    entry = PLANS.get(key)
    if entry is None:
        return _plan_layer_norm(key, x, weight, bias, eps, residual, shift, out, residual_out, block_m, num_warps)
    # The kernel takes base pointers and row strides (the plan's), so x and residual go in as they are.
    plan, like_x, static = entry
    if out is None:
        out = torch.empty_like(x) if like_x else x.new_empty(x.shape)
    else:
        check_buffer("out", out, x)
    if residual is None:
        plan.launch(
            x.device.index,
            x,
            x if shift is None else shift,
            weight,
            weight if bias is None else bias,
            out,
            out,
            *static,
        )
        return out, None
    if residual_out is None:
        residual_out = torch.empty_like(x) if like_x else x.new_empty(x.shape)
    else:
        check_buffer("residual_out", residual_out, x)
    plan.launch(x.device.index, x, residual, weight, weight if bias is None else bias, out, residual_out, *static)
    return out, residual_out


def _plan_layer_norm(key, x, weight, bias, eps, residual, shift, out, residual_out, block_m, num_warps):
    check_layer_norm_inputs(x, weight, bias, residual, shift)
    n_cols = x.shape[-1]
    if n_cols > MAX_FUSED_N:
        raise ValueError(f"layer_norm_triton takes rows of at most {MAX_FUSED_N} elements; got {n_cols}")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    check_buffer("out", out, x)
    if residual is not None:
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        check_buffer("residual_out", residual_out, x)
    else:
        residual_out = None
    n_rows = x.numel() // n_cols if n_cols else 0
    if n_rows == 0 or n_cols == 0:
        return out, residual_out
    rows = (n_rows, n_cols)
    views = [rows_view(t, n_rows, n_cols) for t in (x, residual) if t is not None]
    if (
        any(v is None or v.stride(1) != 1 for v in views)
        or weight.stride(0) != 1
        or (bias is not None and bias.stride(0) != 1)
        or (shift is not None and shift.stride(0) != 1)
    ):
        # Rows that do not flatten to one unit-column-stride layout: copy once, and plan the copy's layout.
        layer_norm_triton(
            x.contiguous(),
            weight.contiguous(),
            None if bias is None else bias.contiguous(),
            eps,
            None if residual is None else residual.contiguous(),
            shift=None if shift is None else shift.contiguous(),
            out=out,
            residual_out=residual_out,
            block_m=block_m,
            num_warps=num_warps,
        )
        return out, residual_out
    x_rows = views[0]
    if residual is not None:
        residual_rows, residual_stride = views[1], views[1].stride(0)
    else:  # a shift is a row read again for every row (stride 0)
        residual_rows, residual_stride = (x_rows, x_rows.stride(0)) if shift is None else (shift, 0)
    out_rows = out.view(rows)
    residual_out_rows = residual_out.view(rows) if residual_out is not None else out_rows
    default_block_m, block_n, default_num_warps = layer_norm_config(n_cols, x.element_size())
    block_m = block_m or default_block_m
    static = (x_rows.stride(0), residual_stride, n_cols, n_cols, n_rows, n_cols, eps)
    plan = first_launch(
        _add_layer_norm_fwd_kernel,
        (triton.cdiv(n_rows, block_m),),
        _RUNTIME_ARGS,
        (x_rows, residual_rows, weight, weight if bias is None else bias, out_rows, residual_out_rows, *static),
        dict(
            HAS_RESIDUAL=residual is not None or shift is not None,
            STORE_RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=num_warps or default_num_warps,
        ),
    )
    PLANS.add(key, (plan, x.is_contiguous(), static))
    return out, residual_out


# Two ops, because a custom op may not return one of its inputs: without a residual, residual_out is x
# itself, which the public function hands back around the op.
@torch.library.custom_op("vitriton::layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, shift: torch.Tensor | None
) -> torch.Tensor:
    out, _ = layer_norm_triton(x, weight, bias, eps, shift=shift)
    return out


@_layer_norm_op.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, shift: torch.Tensor | None
) -> torch.Tensor:
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
    shift: torch.Tensor | None = None,
    eager: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, residual_out)``; with ``residual=None``, ``residual_out`` is ``x`` itself. ``shift`` (N,),
    exclusive with ``residual``: ``out = LayerNorm(x + shift)``, the sum rounded to x's dtype and not returned."""
    if residual is not None and shift is not None:
        raise ValueError("layer_norm takes a residual or a shift, not both")
    if not use_triton(x, eager, weight, bias, residual, shift) or not 0 < x.shape[-1] <= MAX_FUSED_N:
        return layer_norm_reference(x, weight, bias, eps, residual, shift=shift)
    if torch.compiler.is_compiling():
        if residual is None:
            return _layer_norm_op(x, weight, bias, eps, shift), x
        return _add_layer_norm_op(x, residual, weight, bias, eps)
    out, residual_out = layer_norm_triton(x, weight, bias, eps, residual, shift=shift)
    return out, x if residual_out is None else residual_out


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference: the residual add rounds to x's dtype (as transformers does); statistics in fp32. With a
    ``shift`` the rounded ``x + shift`` is normalised and ``x`` returned beside the result."""
    residual_out = x if residual is None else x + residual
    normed = residual_out if shift is None else (x + shift).to(x.dtype)
    out = F.layer_norm(
        normed.float(),
        (normed.shape[-1],),
        weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    return out.to(x.dtype), residual_out
