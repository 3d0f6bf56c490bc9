"""Multi-head attention with fp32 softmax, non-causal (vision) or causal with key padding (CLIP text).

Forward-only FlashAttention-2 (Dao 2023, arXiv:2307.08691): a program owns one (batch, head) and a tile of
BLOCK_M query rows, keeps its q tile on chip, and walks the keys in blocks of BLOCK_N with an online
softmax whose running max and sum are fp32 whatever the input dtype. The softmax runs in base 2: log2(e)
is folded into the score scale, so each score costs one FMA and one exp2. Fully masked rows (causal plus
left padding) keep a running max of -inf; they subtract 0 instead, so every probability is exp2(-inf) = 0,
the running sum stays 0, and the row is written as zeros rather than 0/0.

Trade-offs:
- Head dims that are not powers of two (72, 80, 104) are split into up to three power-of-two chunks, each
  with its own tl.dot: 72 = 64 + 16 (the 16 masked to 8), 80 = 64 + 16, 104 = 64 + 32 + 16 (masked to 8).
  For q @ k^T the chunks split the reduction dimension, which the tensor cores walk 16 at a time anyway;
  for p @ v they split the output columns, which costs one more MMA issue per chunk but no extra FLOPs.
  Padding 72 to 128 would spend 78% more MMA work; the split spends 11% (72) and 8% (104).
- Key blocks are walked in two phases: the full blocks without any bounds or causal mask, then one masked
  phase (the ragged last block, or the blocks on the causal diagonal). The ragged last key block is
  walked at its own power-of-two width (577 keys = 9 x 64 + a 16-wide block for the last key) instead of a
  whole BLOCK_N.
- The ragged last query tile: when S % BLOCK_M is at most BLOCK_M / 2 (257 = 2 x 128 + 1), its rows run
  as a narrower tile (16 rows for the 257th) inside the same launch, through a second specialisation of
  the same tile code picked at run time per program; otherwise the last tile is a row-masked full tile.
- Tiles are 128 x 64 (4 warps up to head dim 64, 8 above, as register counts on sm_90 allow without
  spills), or 64 x 64 when that pads fewer rows (197) or a small batch would leave SMs idle; ``pick_config``
  holds the choice and ``benchmarks/bench_attention.py --sweep`` times the alternatives.
- The grid is one-dimensional (batch * heads * query tiles, query tiles fastest so that neighbouring
  programs share K and V in L2), so batch * heads is not bounded by the 65535 limit of grid axes 1 and 2.
  Offsets to a (batch, head) slice are 64-bit; offsets inside one slice are 32-bit (a view whose slice
  spans 2^31 elements is made contiguous first).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vitriton.kernels._dispatch import interpreting, use_triton
from vitriton.kernels._launch import PlanCache, first_launch, sm_count

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
_INT32_LIMIT = 2**31


@triton.jit
def _load_tile(
    ptrs,  # (ROWS, COLS) pointers
    rows,  # (ROWS,) row indices, compared with n_rows when MASK_ROWS
    cols,  # (COLS,) column indices, compared with n_cols when MASK_COLS
    n_rows,
    n_cols,
    MASK_ROWS: tl.constexpr,
    MASK_COLS: tl.constexpr,
):
    if MASK_ROWS:
        mask = rows[:, None] < n_rows
        if MASK_COLS:
            mask = mask & (cols[None, :] < n_cols)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _attend_key_blocks(
    acc0,  # (BLOCK_M, D0) fp32 running output, columns [0, D0)
    acc1,  # (BLOCK_M, D1) fp32, columns [D0, D0 + D1); a placeholder when D1 == 0
    acc2,  # (BLOCK_M, D2) fp32, columns [D0 + D1, D0 + D1 + D2); a placeholder when D2 == 0
    m_i,  # (BLOCK_M,) fp32 running max of the base-2 scores
    l_i,  # (BLOCK_M,) fp32 running sum of exp2(score - m_i)
    q0,  # (BLOCK_M, D0) q chunks, same column split as the accumulators
    q1,
    q2,
    k_head,  # (S, D) K slice of this (batch, head)
    v_head,  # (S, D) V slice of this (batch, head)
    keep_row,  # (S,) bool key-padding row of this batch, True = attend; unused unless HAS_MASK
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    stride_mk,
    offs_m,  # (BLOCK_M,) query rows of this tile
    seq,
    key_start,
    key_end,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr,
    MASK_BOUNDS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    arange_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + arange_n
        k_rows = offs_n * stride_ks
        v_rows = offs_n * stride_vs
        if ALIGN > 1:
            k_rows = tl.multiple_of(k_rows, ALIGN)
            v_rows = tl.multiple_of(v_rows, ALIGN)

        k0 = _load_tile(
            k_head + k_rows[:, None] + offs_d0[None, :] * stride_kd,
            offs_n, offs_d0, seq, HEAD_DIM, MASK_BOUNDS, D0 > HEAD_DIM,
        )  # fmt: skip
        qk = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        if D1 > 0:
            offs_d1 = D0 + tl.arange(0, D1)
            k1 = _load_tile(
                k_head + k_rows[:, None] + offs_d1[None, :] * stride_kd,
                offs_n, offs_d1, seq, HEAD_DIM, MASK_BOUNDS, D0 + D1 > HEAD_DIM,
            )  # fmt: skip
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=PRECISION)
        if D2 > 0:
            offs_d2 = D0 + D1 + tl.arange(0, D2)
            k2 = _load_tile(
                k_head + k_rows[:, None] + offs_d2[None, :] * stride_kd,
                offs_n, offs_d2, seq, HEAD_DIM, MASK_BOUNDS, D0 + D1 + D2 > HEAD_DIM,
            )  # fmt: skip
            qk = tl.dot(q2, tl.trans(k2), qk, input_precision=PRECISION)

        if MASK_BOUNDS:
            qk = tl.where((offs_n < seq)[None, :], qk, float("-inf"))
        if CAUSAL:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        if HAS_MASK:
            if MASK_BOUNDS:
                keep = tl.load(keep_row + offs_n * stride_mk, mask=offs_n < seq, other=0)
            else:
                keep = tl.load(keep_row + offs_n * stride_mk)
            qk = tl.where((keep != 0)[None, :], qk, float("-inf"))

        # The scale is positive (the launcher checks), so max(qk) * scale is the max of the scaled scores.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if HAS_MASK:
            # A row with no key so far has m_new = -inf; subtracting 0 keeps exp2 at 0 instead of NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

        v0 = _load_tile(
            v_head + v_rows[:, None] + offs_d0[None, :] * stride_vd,
            offs_n, offs_d0, seq, HEAD_DIM, MASK_BOUNDS, D0 > HEAD_DIM,
        )  # fmt: skip
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if D1 > 0:
            v1 = _load_tile(
                v_head + v_rows[:, None] + offs_d1[None, :] * stride_vd,
                offs_n, offs_d1, seq, HEAD_DIM, MASK_BOUNDS, D0 + D1 > HEAD_DIM,
            )  # fmt: skip
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
        if D2 > 0:
            v2 = _load_tile(
                v_head + v_rows[:, None] + offs_d2[None, :] * stride_vd,
                offs_n, offs_d2, seq, HEAD_DIM, MASK_BOUNDS, D0 + D1 + D2 > HEAD_DIM,
            )  # fmt: skip
            acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=PRECISION)
    return acc0, acc1, acc2, m_i, l_i


@triton.jit
def _store_chunk(
    o_head,  # (S, D) output slice of this (batch, head), row stride stride_os
    o_rows,  # (BLOCK_M,) row offsets
    acc,  # (BLOCK_M, WIDTH) fp32 normalised output chunk
    offs_m,
    seq,
    stride_oc,
    COL_START: tl.constexpr,
    WIDTH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    offs_d = COL_START + tl.arange(0, WIDTH)
    mask = offs_m[:, None] < seq
    if COL_START + WIDTH > HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    ptrs = o_head + o_rows[:, None] + offs_d[None, :] * stride_oc
    tl.store(ptrs, acc.to(o_head.dtype.element_ty), mask=mask)


@triton.jit
def _attention_tile(
    q_head,  # (S, D) slices of this (batch, head)
    k_head,
    v_head,
    o_head,
    keep_row,  # (S,) bool, True = attend; unused unless HAS_MASK
    stride_qs,
    stride_qd,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    stride_os,
    stride_oc,
    stride_mk,
    row_start,
    seq,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr,
    ALIGN: tl.constexpr,
    O_ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = row_start + tl.arange(0, BLOCK_M)
    q_rows = offs_m * stride_qs
    if ALIGN > 1:
        q_rows = tl.multiple_of(q_rows, ALIGN)
    offs_d0 = tl.arange(0, D0)
    q0 = _load_tile(
        q_head + q_rows[:, None] + offs_d0[None, :] * stride_qd, offs_m, offs_d0, seq, HEAD_DIM, True, D0 > HEAD_DIM
    )
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    # Absent chunks get placeholders that the key loop never touches (it checks D1 / D2 > 0).
    q1, acc1, q2, acc2 = q0, acc0, q0, acc0
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        q1 = _load_tile(
            q_head + q_rows[:, None] + offs_d1[None, :] * stride_qd,
            offs_m, offs_d1, seq, HEAD_DIM, True, D0 + D1 > HEAD_DIM,
        )  # fmt: skip
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    if D2 > 0:
        offs_d2 = D0 + D1 + tl.arange(0, D2)
        q2 = _load_tile(
            q_head + q_rows[:, None] + offs_d2[None, :] * stride_qd,
            offs_m, offs_d2, seq, HEAD_DIM, True, D0 + D1 + D2 > HEAD_DIM,
        )  # fmt: skip
        acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Phase 1: key blocks every row of the tile sees whole (all keys before the tile's first row when causal).
    if CAUSAL:
        full_end = (row_start // BLOCK_N) * BLOCK_N
    else:
        full_end = (seq // BLOCK_N) * BLOCK_N
    acc0, acc1, acc2, m_i, l_i = _attend_key_blocks(
        acc0, acc1, acc2, m_i, l_i, q0, q1, q2, k_head, v_head, keep_row,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_mk, offs_m, seq, 0, full_end, qk_scale,
        HEAD_DIM, D0, D1, D2, BLOCK_N, ALIGN, False, False, HAS_MASK, PRECISION,
    )  # fmt: skip
    # Phase 2: the masked rest, the causal diagonal in BLOCK_N steps or the ragged tail in one TAIL_N step.
    if CAUSAL:
        acc0, acc1, acc2, m_i, l_i = _attend_key_blocks(
            acc0, acc1, acc2, m_i, l_i, q0, q1, q2, k_head, v_head, keep_row,
            stride_ks, stride_kd, stride_vs, stride_vd, stride_mk, offs_m, seq,
            full_end, tl.minimum(seq, row_start + BLOCK_M), qk_scale,
            HEAD_DIM, D0, D1, D2, BLOCK_N, ALIGN, True, True, HAS_MASK, PRECISION,
        )  # fmt: skip
    elif TAIL_N > 0:
        acc0, acc1, acc2, m_i, l_i = _attend_key_blocks(
            acc0, acc1, acc2, m_i, l_i, q0, q1, q2, k_head, v_head, keep_row,
            stride_ks, stride_kd, stride_vs, stride_vd, stride_mk, offs_m, seq, full_end, seq, qk_scale,
            HEAD_DIM, D0, D1, D2, TAIL_N, ALIGN, True, False, HAS_MASK, PRECISION,
        )  # fmt: skip

    # Rows that attended to nothing have l_i == 0 and acc == 0: dividing by 1 writes their zeros.
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    o_rows = offs_m * stride_os
    if O_ALIGN > 1:
        o_rows = tl.multiple_of(o_rows, O_ALIGN)
    _store_chunk(o_head, o_rows, acc0 * inv_l[:, None], offs_m, seq, stride_oc, 0, D0, HEAD_DIM)
    if D1 > 0:
        _store_chunk(o_head, o_rows, acc1 * inv_l[:, None], offs_m, seq, stride_oc, D0, D1, HEAD_DIM)
    if D2 > 0:
        _store_chunk(o_head, o_rows, acc2 * inv_l[:, None], offs_m, seq, stride_oc, D0 + D1, D2, HEAD_DIM)


@triton.jit
def _attention_fwd_kernel(
    q_ptr,  # (B, H, S, D) fp32/fp16/bf16, any strides
    k_ptr,  # (B, H, S, D) same dtype as q
    v_ptr,  # (B, H, S, D) same dtype as q
    o_ptr,  # (B, S, H * D) same dtype as q
    keep_ptr,  # (B, S) bool, True = attend; unused unless HAS_MASK
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_ob,
    stride_os,
    stride_oc,
    stride_mb,
    stride_mk,
    heads,
    seq,
    full_tiles,  # query tiles of BLOCK_M rows per (batch, head); one more of TAIL_M rows when TAIL_M > 0
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    D2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TAIL_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr,
    ALIGN: tl.constexpr,
    O_ALIGN: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    if TAIL_M > 0:
        tiles = full_tiles + 1
    else:
        tiles = full_tiles
    head_index = pid // tiles
    tile = pid % tiles
    batch = (head_index // heads).to(tl.int64)
    head = (head_index % heads).to(tl.int64)

    q_offset = batch * stride_qb + head * stride_qh
    k_offset = batch * stride_kb + head * stride_kh
    v_offset = batch * stride_vb + head * stride_vh
    o_offset = batch * stride_ob + head * (HEAD_DIM * stride_oc)
    if ALIGN > 1:
        q_offset = tl.multiple_of(q_offset, ALIGN)
        k_offset = tl.multiple_of(k_offset, ALIGN)
        v_offset = tl.multiple_of(v_offset, ALIGN)
    if O_ALIGN > 1:
        o_offset = tl.multiple_of(o_offset, O_ALIGN)
    q_head = q_ptr + q_offset
    k_head = k_ptr + k_offset
    v_head = v_ptr + v_offset
    o_head = o_ptr + o_offset
    keep_row = keep_ptr + batch * stride_mb

    if TAIL_M > 0:
        if tile < full_tiles:
            _attention_tile(
                q_head, k_head, v_head, o_head, keep_row,
                stride_qs, stride_qd, stride_ks, stride_kd, stride_vs, stride_vd, stride_os, stride_oc, stride_mk,
                tile * BLOCK_M, seq, qk_scale,
                HEAD_DIM, D0, D1, D2, BLOCK_M, BLOCK_N, TAIL_N, ALIGN, O_ALIGN, CAUSAL, HAS_MASK, PRECISION,
            )  # fmt: skip
        else:
            _attention_tile(
                q_head, k_head, v_head, o_head, keep_row,
                stride_qs, stride_qd, stride_ks, stride_kd, stride_vs, stride_vd, stride_os, stride_oc, stride_mk,
                full_tiles * BLOCK_M, seq, qk_scale,
                HEAD_DIM, D0, D1, D2, TAIL_M, BLOCK_N, TAIL_N, ALIGN, O_ALIGN, CAUSAL, HAS_MASK, PRECISION,
            )  # fmt: skip
    else:
        _attention_tile(
            q_head, k_head, v_head, o_head, keep_row,
            stride_qs, stride_qd, stride_ks, stride_kd, stride_vs, stride_vd, stride_os, stride_oc, stride_mk,
            tile * BLOCK_M, seq, qk_scale,
            HEAD_DIM, D0, D1, D2, BLOCK_M, BLOCK_N, TAIL_N, ALIGN, O_ALIGN, CAUSAL, HAS_MASK, PRECISION,
        )  # fmt: skip


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


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and launch parameters; ``split_tail`` runs a ragged last query tile at a narrower width."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_tail: bool = True

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} is {value}; expected a power of two >= 16")


def head_dim_chunks(head_dim: int) -> tuple[int, int, int]:
    """Power-of-two column chunks (each >= 16, 0 = absent) that cover head_dim, only the last one padded.

    72 -> (64, 16, 0), 80 -> (64, 16, 0), 104 -> (64, 32, 16), 64 -> (64, 0, 0), 40 -> (32, 16, 0).
    """
    chunks = []
    rest = head_dim
    while rest > 0 and len(chunks) < 2:
        width = 1 << (rest.bit_length() - 1) if rest >= 16 else 16
        chunks.append(width)
        rest -= width
    if rest > 0:
        chunks.append(max(16, triton.next_power_of_2(rest)))
    return tuple(chunks + [0] * (3 - len(chunks)))


def tile_constants(head_dim: int, seq: int, config: AttentionConfig) -> tuple[int, dict[str, int]]:
    """(full query tiles, the kernel's head-chunk and tile constexprs) for ``config`` at ``head_dim`` and ``seq``."""
    d0, d1, d2 = head_dim_chunks(head_dim)
    full_tiles, tail_m = query_tiles(seq, config.block_m, config.split_tail)
    rest_n = seq % config.block_n
    tail_n = max(16, triton.next_power_of_2(rest_n)) if rest_n else 0
    tiles = dict(HEAD_DIM=head_dim, D0=d0, D1=d1, D2=d2, BLOCK_M=config.block_m, TAIL_M=tail_m)
    return full_tiles, dict(**tiles, BLOCK_N=config.block_n, TAIL_N=tail_n)


def query_tiles(seq: int, block_m: int, split_tail: bool = True) -> tuple[int, int]:
    """(tiles of block_m query rows, rows of the narrower tail tile or 0) that cover seq rows."""
    rest = seq % block_m
    if split_tail and 0 < rest <= block_m // 2:
        return seq // block_m, max(16, triton.next_power_of_2(rest))
    return triton.cdiv(seq, block_m), 0


def pick_config(head_dim: int, seq: int, batch_heads: int, dtype: torch.dtype, sm_count: int) -> AttentionConfig:
    """The one place tile sizes are chosen (``benchmarks/bench_attention.py --sweep`` times the candidates)."""
    if interpreting():
        # The interpreter runs each program as numpy; small tiles still exercise every loop and tail path.
        return AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # Exact fp32 dots run on the FMA units; 8 warps keep their operands in registers without spilling.
        return AttentionConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    padded = sum(head_dim_chunks(head_dim))
    if padded > 128:
        return AttentionConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    # The choices below are the fastest of `bench_attention.py --sweep --cases b128` on an H100 (bf16, triton
    # 3.6; benchmarks/results/h100/attention_sweep.log). The narrow tail tile lost wherever it applied except
    # at head_dim 104, so it is off elsewhere.
    if seq <= 128:
        # CLIP text (77 tokens): one 128-row tile per (batch, head).
        return AttentionConfig(block_m=128, block_n=64, num_warps=4, num_stages=4, split_tail=False)
    few_programs = batch_heads * triton.cdiv(seq, 128) < 2 * sm_count
    if seq < 384:
        # S 197 and 257, every head dim up to 128: 64 x 32 tiles waste the fewest padded rows and give the most
        # programs. Measured at head dims 64, 80 and 104 (bigG, 64 + 32 + 16 columns: 166.8 TF/s against 161.4 for
        # 128 x 32 with the tail split and cuDNN's 164; results/h100/session18/attention_sweep_bigG.log, where
        # padding the head to one 128-wide chunk lost); other head dims of 88-128 came here untimed.
        return AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=3, split_tail=False)
    if padded > 80:
        # Head dims of 88-128 from S 384 (104: 64 + 32 + 16 columns): narrow key blocks keep three accumulators in
        # registers (not yet timed at these lengths).
        return AttentionConfig(block_m=128, block_n=32, num_warps=4, num_stages=3, split_tail=True)
    if padded <= 64 or few_programs:
        # S 577 at head_dim 64 (288 TF/s, cuDNN 294), and batch-1 latency: twice the programs of 128-row tiles.
        return AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, split_tail=False)
    # S 729 at head_dim 72 (64 + 16 columns): 128-row tiles, one warpgroup (273 TF/s, cuDNN 281).
    return AttentionConfig(block_m=128, block_n=64, num_warps=4, num_stages=3, split_tail=False)


def _row_alignment(tensor: torch.Tensor, extra: int = 0) -> int:
    """Largest power of two <= 16 dividing every non-unit stride (and ``extra``); 1 unless the last dim is dense."""
    if tensor.stride(-1) != 1:
        return 1
    align = math.gcd(16, extra)
    for stride in tensor.stride()[:-1]:
        align = math.gcd(align, stride)
    return align


def _fits_int32(tensor: torch.Tensor, block: int) -> bool:
    """Whether every offset inside one (batch, head) slice, tile overhang included, fits 32 bits."""
    seq, head_dim = tensor.shape[-2], tensor.shape[-1]
    return (seq + block) * tensor.stride(-2) + head_dim * tensor.stride(-1) < _INT32_LIMIT


_RUNTIME_ARGS = (
    "q_ptr", "k_ptr", "v_ptr", "o_ptr", "keep_ptr",
    "stride_qb", "stride_qh", "stride_qs", "stride_qd", "stride_kb", "stride_kh", "stride_ks", "stride_kd",
    "stride_vb", "stride_vh", "stride_vs", "stride_vd", "stride_ob", "stride_os", "stride_oc", "stride_mb",
    "stride_mk", "heads", "seq", "full_tiles", "qk_scale",
)  # fmt: skip
PLANS = PlanCache("attention")


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Launches the Triton kernel; same contract as :func:`attention`, writing into ``out`` when given."""
    mask = key_padding_mask
    key = (
        q.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
        q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16,
        None if mask is None else (mask.shape, mask.stride(), mask.dtype, mask.device, mask.data_ptr() % 16),
        None if out is None else (out.shape, out.stride(), out.dtype, out.device, out.data_ptr() % 16),
        scale, causal, config,
    )  # fmt: skip
    entry = PLANS.get(key)
    if entry is None:
        return _plan_attention(key, q, k, v, scale, causal, mask, out, config)
    plan, out_shape, static = entry
    if out is None:
        out = q.new_empty(out_shape)
    keep = q if mask is None else (mask if mask.dtype == torch.bool else mask != 0)
    plan.launch(q.device.index, q, k, v, out, keep, *static)
    return out


def _plan_attention(key, q, k, v, scale, causal, key_padding_mask, out, config) -> torch.Tensor:
    check_attention_shapes(q, k, v, key_padding_mask)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q has dtype {q.dtype}; expected float32, float16 or bfloat16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; expected one dtype")
    devices = {q.device, k.device, v.device} | ({key_padding_mask.device} if key_padding_mask is not None else set())
    if len(devices) != 1:
        raise ValueError(f"q, k, v and key_padding_mask are on {sorted(map(str, devices))}; expected one device")
    batch, heads, seq, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim is {head_dim}; the Triton kernel supports up to {MAX_HEAD_DIM} (pass eager=True)")
    softmax_scale = head_dim**-0.5 if scale is None else float(scale)
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"scale is {softmax_scale}; expected a positive finite number")
    out_shape = (batch, seq, heads * head_dim)
    if out is None:
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    elif out.shape != out_shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}; expected {out_shape} {q.dtype} on {q.device}"
        )
    if out.numel() == 0:
        return out
    if (seq + 256) * out.stride(1) + heads * head_dim * out.stride(2) >= _INT32_LIMIT:
        raise ValueError(f"out has row stride {out.stride(1)}; one batch's rows must span fewer than 2^31 elements")

    config = config or pick_config(head_dim, seq, batch * heads, q.dtype, sm_count(q.device))
    block = max(config.block_m, config.block_n)
    if not all(_fits_int32(t, block) for t in (q, k, v)):
        # A (batch, head) slice whose offsets pass 32 bits: copy once, and plan the copies' layout.
        q, k, v = (t if _fits_int32(t, block) else t.contiguous() for t in (q, k, v))
        return attention_triton(
            q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask, out=out, config=config
        )

    full_tiles, tiles = tile_constants(head_dim, seq, config)
    programs = batch * heads * (full_tiles + (1 if tiles["TAIL_M"] else 0))
    if programs >= _INT32_LIMIT:
        raise ValueError(f"batch * heads * query tiles is {programs}; expected fewer than 2^31 programs")

    if key_padding_mask is not None:
        keep = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
        stride_mb, stride_mk = keep.stride()
    else:
        keep, stride_mb, stride_mk = q, 0, 0

    static = (
        *q.stride(), *k.stride(), *v.stride(), out.stride(0), out.stride(1), out.stride(2),
        stride_mb, stride_mk, heads, seq, full_tiles, softmax_scale * LOG2E,
    )  # fmt: skip
    align = min(_row_alignment(t) for t in (q, k, v))
    device_guard = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    with device_guard:
        plan = first_launch(
            _attention_fwd_kernel,
            (programs,),
            _RUNTIME_ARGS,
            (q, k, v, out, keep, *static),
            dict(
                **tiles, ALIGN=align, O_ALIGN=_row_alignment(out, extra=head_dim), CAUSAL=causal,
                HAS_MASK=key_padding_mask is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                num_warps=config.num_warps, num_stages=config.num_stages,
            ),
        )  # fmt: skip
    PLANS.add(key, (plan, out_shape, static))
    return out


@torch.library.custom_op("vitriton::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    causal: bool,
) -> torch.Tensor:
    return attention_triton(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask)


@_attention_op.register_fake
def _attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    causal: bool,
) -> torch.Tensor:
    batch, heads, seq, head_dim = q.shape
    return q.new_empty((batch, seq, heads * head_dim))


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

    Rows with no key to attend to give zeros. Head dims above ``MAX_HEAD_DIM`` (no encoder we know has one) run
    the eager reference, as transformers would; ``attention_triton`` raises for them.
    """
    if not use_triton(q, eager, k, v) or q.shape[-1] > MAX_HEAD_DIM:
        return attention_reference(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask)
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, key_padding_mask, scale, causal)
    return attention_triton(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask)


def allowed_keys(
    seq: int, causal: bool, key_padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """The boolean mask of keys each query may attend to, broadcastable to (B, H, S, S); None when all may."""
    allowed = None
    if causal:
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        keys = key_padding_mask.to(torch.bool)[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


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
    allowed = allowed_keys(seq, causal, key_padding_mask, q.device)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, scale=scale)
    if allowed is not None:
        out = out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return out.to(q.dtype).transpose(1, 2).reshape(batch, seq, heads * head_dim)
