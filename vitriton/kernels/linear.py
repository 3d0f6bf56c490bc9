"""Linear layer with bias and activation fused into one pass: ``act(x @ W^T + b)``.

One tiled GEMM (the main loop in ``_matmul.py``) whose epilogue adds the bias and applies the activation in fp32
on the accumulator before the single rounding store. Eager runs these as up to four kernels (quick_gelu alone is
three), each a full read and write of the (M, N) output; fused they cost nothing.

The activations are transformers' (ACT2FN): quick_gelu ``x * sigmoid(1.702 x)``; gelu the exact erf form;
gelu_pytorch_tanh the tanh approximation ``0.5 x (1 + tanh(u))``. Both are ``x (1 + tanh(.)) / 2``, which for
16-bit outputs on CUDA takes the GPU's tanh instruction (``FAST_TANH``) and otherwise the sigmoid form.

Three kernels: one program per tile (``_linear_kernel``, plain or TMA loads), which runs where TMA cannot (fp32,
misaligned operands, GPUs before Hopper); on Hopper, for 16-bit operands at any M, a persistent TMA kernel
(``_linear_persistent_kernel``) of one or two programs an SM, where two programs on an SM overlap one's epilogue
with the other's main loop; and its warp-specialised variant (``_linear_ws_kernel``, ``warp_specialize=True``),
where a producer warp feeds two consumer warpgroups. The last is not a default: it measured no faster.

Launch cost: the first call of a signature (shapes, strides, dtypes, alignment, weight, activation) validates
the operands, autotunes and records a launch plan (``_launch.py``) holding the config, the grid, the compiled
kernel and the TMA descriptor templates; later calls look the plan up and launch, and the plan encodes each
descriptor once per address (``_launch.Plan.expand``), so the weight's is encoded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vitriton.kernels._dispatch import interpreting, use_triton
from vitriton.kernels._launch import PlanCache, check_out, cuda_properties, first_launch, rows_view
from vitriton.kernels._matmul import (
    accumulate_tile_tma,
    check_operands,
    dot_is_ieee,
    even_k,
    gemm_tile,
    launch_gemm_plan,
    m_bucket,
    matmul_configs,
    matmul_grid,
    matmul_operands,
    output_descriptor,
    persistent_configs,
    persistent_grid,
    persistent_programs,
    plan_operand,
    prune_matmul_configs,
    prune_persistent_configs,
    require_tma,
    tile_coordinates,
    tma_device,
    tma_supported,
    warp_specialized_configs,
)

ACTIVATIONS = (None, "quick_gelu", "gelu", "gelu_pytorch_tanh")


def check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; expected one of {ACTIVATIONS}")


# How the sigmoid-shaped activations (quick_gelu, gelu_pytorch_tanh) evaluate their tanh on CUDA for 16-bit outputs:
# "f32" one tanh.approx.f32 (PTX ISA: relative error about 2^-11, under half an fp16 rounding step) in place of the
# sigmoid's ex2 and reciprocal; "bf16x2" tanh.approx.bf16x2, two elements an instruction, for bf16 outputs;
# "sigmoid" tl.sigmoid (ex2 and a reciprocal), which fp32 outputs and the interpreter always take. The epilogue's
# special-function work is what the main loop of this non-warp-specialised kernel waits for. fc1 at b128 against
# cuBLAS F.linear + bias (H100, benchmarks/bench_gemm.py, results/h100/session17): L/14 quick_gelu sigmoid 0.84x,
# f32 0.89x, bf16x2 0.92x; so400m gelu_pytorch_tanh 0.88x, 0.93x, 0.98x (cuBLASLt's GELU epilogue 0.93x); relative
# error of the bf16 output against the fp32 activation 2.5e-3 (f32) and 3.0e-3 (bf16x2), where rounding to bf16
# alone gives 2.4e-3. "bf16x2_math", the bf16 default on sm_90, runs the whole activation on bf16 pairs after the
# output's rounding (``BF16X2_MATH``). One H100, the persistent kernel's 128x256 tile against cuBLAS F.linear + bias
# (benchmarks/sweep_matmul.py --tanh, results/h100/session21/sweep_forms/sweep.log), "bf16x2" -> "bf16x2_math":
# L/14-336 fc1 b128 0.89x -> 0.91x, so400m b128 0.88x -> 0.90x, so400m b8 0.94x -> 0.97x, H/14 and bigG b128 level
# (0.91x, 0.89x). Its extra roundings move the result toward transformers' bf16 eager one (relative distance to it
# 3.6e-3 -> 2.5-2.8e-3, the sweep's err) and away from the exact activation: emulated on N(0, 1) fp32
# pre-activations, quick_gelu's error against fp32 goes 1.9e-3 -> 3.3e-3, where transformers' bf16 run's own is
# 2.8e-3 and rounding alone 1.7e-3, inside the bound of the parity tests (2x transformers' bf16 error). What is
# left is the epilogue's place after the main loop: a 128x256 tile's 16,384 bf16x2 tanh take 1,024 cycles of the
# SM's 16 special-function lanes, against 16,384 cycles of its MMAs, and this kernel runs them in series (the same
# shape with the bias alone: 0.854 ms against 0.917).
TANH_FORMS = ("f32", "bf16x2", "bf16x2_math", "sigmoid")
# GELU_AS_TANH: where TANH is "bf16x2" or "bf16x2_math", the exact (erf) gelu is evaluated as gelu_pytorch_tanh. The two
# differ by at most 4.7e-4 (at x = -2.70), under the error of the bf16x2 tanh itself, while libdevice's erf is a
# polynomial evaluated per element in the epilogue. One H200: fc1 of H/14 and bigG (hidden_act "gelu") at b128 ran at
# 0.76x and 0.83x of cuBLAS with the erf at their best config (results/h200/session20/sweeps/sweep_persistent.log), and
# at 0.84x and 0.95x in the tanh form (fc1_b8_b128/gemm_fc1.log, autotuned; bench_gemm's timing, L2 flushed per call).
# The relative error of the bf16 output against the fp32 erf gelu was 3.1e-3 there. fp16 outputs (whose steps are 8x
# finer) and fp32 keep the erf.
FAST_TANH = {torch.float16: "f32", torch.bfloat16: "bf16x2_math"}
GELU_AS_TANH = ("bf16x2", "bf16x2_math")  # the TANH forms under which "gelu" is evaluated in its tanh form
# Up to this many rows ``linear`` hands the tanh-form gelu to cuBLASLt's GELU epilogue; above it, bf16 on Hopper
# takes the persistent Triton kernel. One H100, against cuBLAS F.linear + bias, L2 flushed (python3 -m
# benchmarks.bench_gemm --batch-sizes 1 8 128 --layers qkv fc1, results/h100/session21/forms/gemm.log), cuBLASLt
# against Triton: so400m fc1 (gelu_pytorch_tanh) at 729 rows 0.93x / 0.86x, at 5,832 0.92x / 0.94x, at 93,312 0.91x /
# 1.00x; H/14 fc1 (gelu) at 257 rows 0.94x / 0.72x, at 2,056 0.92x / 0.81x, at 32,896 1.00x / 1.07x; bigG at 257
# 0.94x / 0.68x, at 2,056 0.93x / 0.83x, at 32,896 1.04x / 1.01x.
CUBLASLT_GELU_MAX_ROWS = 4096


def tanh_mode(x: torch.Tensor) -> str:
    """The ``TANH`` constexpr for a call whose output has x's dtype, on x's device (``tanh_form``)."""
    if not x.is_cuda or interpreting():
        return "sigmoid"
    properties = cuda_properties(x.device)
    return tanh_form(x.dtype, 10 * properties.major + properties.minor)


def tanh_form(dtype: torch.dtype, arch: int) -> str:
    """``FAST_TANH``'s form for ``dtype`` where the GPU (compute capability ``arch``, 90 for sm_90) has its
    instruction: ``tanh.approx.bf16x2`` needs sm_90 (both bf16 forms), ``tanh.approx.f32`` sm_75; older GPUs take
    the next form."""
    form = FAST_TANH.get(dtype, "sigmoid")
    if form in GELU_AS_TANH and (arch < 90 or dtype != torch.bfloat16):  # the bf16 forms round to bf16
        form = "f32"
    if form == "f32" and arch < 75:
        form = "sigmoid"
    return form


@triton.jit
def half_plus_half_tanh(x, TANH: tl.constexpr):
    """``(1 + tanh(x)) / 2``, that is ``sigmoid(2x)``, computed as ``TANH`` says (``FAST_TANH``)."""
    if TANH == "f32":
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
        y = 0.5 + 0.5 * t
    elif TANH == "bf16x2" or TANH == "bf16x2_math":
        t = tl.inline_asm_elementwise(
            "tanh.approx.bf16x2 $0, $1;", "=r,r", [x.to(tl.bfloat16)], dtype=tl.bfloat16, is_pure=True, pack=2
        )
        y = 0.5 + 0.5 * t.to(tl.float32)
    else:
        y = tl.sigmoid(2.0 * x)
    return y


@triton.jit
def activate(x, ACTIVATION: tl.constexpr, TANH: tl.constexpr = "sigmoid"):
    """``ACTIVATION`` of fp32 ``x``; "none" passes x through."""
    if ACTIVATION == "quick_gelu":
        y = x * half_plus_half_tanh(0.851 * x, TANH)  # sigmoid(1.702 x)
    elif ACTIVATION == "gelu_pytorch_tanh" or (ACTIVATION == "gelu" and (TANH == "bf16x2" or TANH == "bf16x2_math")):
        # For bf16 outputs on CUDA the exact gelu takes the tanh form too (GELU_AS_TANH).
        y = x * half_plus_half_tanh(0.7978845608028654 * (x + 0.044715 * x * x * x), TANH)  # sqrt(2 / pi)
    elif ACTIVATION == "gelu":
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))  # 1 / sqrt(2)
    else:
        y = x
    return y


# BF16X2_MATH: where TANH is "bf16x2_math" (bf16 outputs on sm_90), the tanh-shaped activations run on the output's
# bf16 pairs after its rounding, two elements an instruction (``fma.rn.bf16x2``): the pre-activation is rounded to
# bf16 once, and scale, tanh, ``(1 + t) / 2`` and the product are each rounded to bf16, as transformers' bf16 eager
# run rounds each op. Per pair that is one conversion and four to six packed instructions, against two conversions,
# two unpacks and six to ten fp32 instructions with the tanh alone on pairs. The bf16 constants (hex bit patterns):
# 0.851 -> 0x3F5A (0.8515625), sqrt(2 / pi) -> 0x3F4C (0.796875), 0.044715 sqrt(2 / pi) -> 0x3D12 (0.03564453),
# 0.5 -> 0x3F00, -0.0 -> 0x8000 (the addend of a plain product).
_QUICK_GELU_BF16X2 = tl.constexpr("""{
.reg .b32 c, z, h, t;
mov.b32 c, 0x3F5A3F5A;
mov.b32 z, 0x80008000;
mov.b32 h, 0x3F003F00;
fma.rn.bf16x2 t, $1, c, z;
tanh.approx.bf16x2 t, t;
fma.rn.bf16x2 t, t, h, h;
fma.rn.bf16x2 $0, $1, t, z;
}""")
_GELU_TANH_BF16X2 = tl.constexpr("""{
.reg .b32 a, b, z, h, t;
mov.b32 a, 0x3F4C3F4C;
mov.b32 b, 0x3D123D12;
mov.b32 z, 0x80008000;
mov.b32 h, 0x3F003F00;
fma.rn.bf16x2 t, $1, $1, z;
fma.rn.bf16x2 t, t, b, a;
fma.rn.bf16x2 t, $1, t, z;
tanh.approx.bf16x2 t, t;
fma.rn.bf16x2 t, t, h, h;
fma.rn.bf16x2 $0, $1, t, z;
}""")


@triton.jit
def activate_rounded(acc, dtype: tl.constexpr, ACTIVATION: tl.constexpr, TANH: tl.constexpr):
    """``ACTIVATION`` of fp32 ``acc`` as ``dtype``: on bf16 pairs after rounding (``BF16X2_MATH``) where TANH says
    so, else in fp32 (``activate``) and rounded once."""
    if TANH == "bf16x2_math" and ACTIVATION == "quick_gelu":
        y = tl.inline_asm_elementwise(
            _QUICK_GELU_BF16X2, "=r,r", [acc.to(tl.bfloat16)], dtype=tl.bfloat16, is_pure=True, pack=2
        )
    elif TANH == "bf16x2_math" and (ACTIVATION == "gelu_pytorch_tanh" or ACTIVATION == "gelu"):
        y = tl.inline_asm_elementwise(
            _GELU_TANH_BF16X2, "=r,r", [acc.to(tl.bfloat16)], dtype=tl.bfloat16, is_pure=True, pack=2
        )
    else:
        y = activate(acc, ACTIVATION, TANH).to(dtype)
    return y


@triton.autotune(
    configs=matmul_configs(),
    key=["M_BUCKET", "N", "K", "ACTIVATION", "TANH", "USE_TMA"],
    prune_configs_by={"early_config_prune": prune_matmul_configs},
)
@triton.heuristics({"EVEN_K": even_k})
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_kernel(
    x,  # (M, K); a TMA descriptor when USE_TMA, else a pointer
    w,  # (N, K); as x
    bias_ptr,  # (N,) contiguous; None without bias
    out_ptr,  # (M, N)
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    ACTIVATION: tl.constexpr,
    TANH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
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
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, activate_rounded(acc, out_ptr.dtype.element_ty, ACTIVATION, TANH), mask=mask)


@triton.jit
def _store_slice(
    acc,  # fp32 (BLOCK_M, width) slice of a tile, its bias not yet added
    bias_ptr,
    out,  # (M, N) TMA descriptor, blocks (BLOCK_M, width)
    offset_m,
    offset_n,
    N,
    ACTIVATION: tl.constexpr,
    TANH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    cols = offset_n + tl.arange(0, acc.shape[1])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out.store([offset_m, offset_n], activate_rounded(acc, out.dtype, ACTIVATION, TANH))


@triton.jit
def _persistent_tile(
    x,  # (M, K) TMA descriptor, blocks (BLOCK_M, BLOCK_K)
    w,  # (N, K) TMA descriptor, blocks (BLOCK_N, BLOCK_K)
    bias_ptr,
    out,  # (M, N) TMA descriptor, blocks (BLOCK_M, BLOCK_N // EPILOGUE_SPLIT)
    tile,
    M,
    N,
    K,
    ACTIVATION: tl.constexpr,
    TANH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    """One output tile of a persistent kernel: its main loop, then its epilogue stored whole or in two halves."""
    pid_m, pid_n = tile_coordinates(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = accumulate_tile_tma(x, w, K, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K)
    offset_m = pid_m * BLOCK_M
    offset_n = pid_n * BLOCK_N
    if EPILOGUE_SPLIT == 2:
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        _store_slice(left, bias_ptr, out, offset_m, offset_n, N, ACTIVATION, TANH, HAS_BIAS)
        _store_slice(right, bias_ptr, out, offset_m, offset_n + BLOCK_N // 2, N, ACTIVATION, TANH, HAS_BIAS)
    else:
        _store_slice(acc, bias_ptr, out, offset_m, offset_n, N, ACTIVATION, TANH, HAS_BIAS)


@triton.autotune(
    configs=persistent_configs(),
    key=["M_BUCKET", "N", "K", "ACTIVATION", "TANH"],
    prune_configs_by={"early_config_prune": prune_persistent_configs},
)
@triton.heuristics({"PROGRAMS": persistent_programs})
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_persistent_kernel(
    x,  # (M, K) TMA descriptor
    w,  # (N, K) TMA descriptor, nn.Linear layout
    bias_ptr,  # (N,) contiguous; None without bias
    out,  # (M, N) TMA descriptor
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    ACTIVATION: tl.constexpr,
    TANH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PROGRAMS: tl.constexpr,  # the grid (persistent_programs)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
    CTAS_PER_SM: tl.constexpr,  # programs resident per SM, read by persistent_programs
):
    """The TMA path at large M as a persistent kernel (the persistent-matmul tutorial's schedule,
    https://triton-lang.org/main/getting-started/tutorials/09-persistent-matmul.html): ``flatten`` turns the
    tile loop and its K loop into one software-pipelined loop, so the next tile's first loads are in flight
    while this tile's bias, activation and TMA stores run."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        _persistent_tile(
            x, w, bias_ptr, out, tile, M, N, K, ACTIVATION, TANH, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
            EPILOGUE_SPLIT,
        )  # fmt: skip


@triton.autotune(
    configs=warp_specialized_configs(),
    key=["M_BUCKET", "N", "K", "ACTIVATION", "TANH"],
)
@triton.heuristics({"PROGRAMS": persistent_programs})
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_ws_kernel(
    x_ptr,  # (M, K), rows stride_xm apart, unit column stride, 16-byte aligned
    w_ptr,  # (N, K), rows stride_wn apart, nn.Linear layout; as x
    bias_ptr,  # (N,) contiguous; None without bias
    out_ptr,  # (M, N) contiguous
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_wn,
    ACTIVATION: tl.constexpr,
    TANH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PROGRAMS: tl.constexpr,  # the grid (persistent_programs)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    CTAS_PER_SM: tl.constexpr,  # programs resident per SM, read by persistent_programs
):
    """The persistent kernel's schedule, warp-specialised (triton 3.6 on Hopper): at num_warps=4 the compiler
    splits the tile loop into a producer warp issuing the TMA loads and two consumer warpgroups taking turns
    at the wgmma and the epilogue, so one tile's bias, activation and store overlap the next tile's main loop
    instead of running in series with it. The compiler only does this with descriptors built in the kernel
    (global scratch memory per program, which ``_launch.Plan`` allocates per launch), an unflattened tile
    loop and an epilogue stored whole (no column split)."""
    x = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
    w = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
    out = tl.make_tensor_descriptor(out_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=False, warp_specialize=True):
        _persistent_tile(
            x, w, bias_ptr, out, tile, M, N, K, ACTIVATION, TANH, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, 1
        )


# From this many rows, calls that may take TMA run the persistent kernel. Every M: at batch 1 and 8 it took fc1's
# GPU time from 0.49-0.58x of cuBLAS (plain loads, one tile a program) to 0.63-0.81x (``_matmul._PERSISTENT_SMALL_M``),
# and plans encode the TMA descriptors once per address, so the host cost of a call that once kept small M on
# plain loads (``_matmul.TMA_MIN_ROWS``, 9-20 us on an H100 host) is not paid per call.
PERSISTENT_MIN_ROWS = 1
_PERSISTENT_ARGS = ("x", "w", "bias_ptr", "out", "M", "N", "K", "M_BUCKET")
_WS_ARGS = ("x_ptr", "w_ptr", "bias_ptr", "out_ptr", "M", "N", "K", "M_BUCKET", "stride_xm", "stride_wn")
_RUNTIME_ARGS = (
    "x", "w", "bias_ptr", "out_ptr", "M", "N", "K", "M_BUCKET",
    "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_om", "stride_on",
)  # fmt: skip
PLANS = PlanCache("linear")


def linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    out: torch.Tensor | None = None,
    tma: bool | None = None,
    persistent: bool | None = None,
    warp_specialize: bool | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Launches the fused kernel; ``out``, when given, is a (..., N) buffer the result is written into.

    ``tma`` picks the main loop: None decides per signature, True and False force it (see ``matmul_operands``).
    ``persistent`` picks the persistent TMA kernel: None takes it (and the TMA path) from ``PERSISTENT_MIN_ROWS``
    rows wherever the operands and the device allow TMA with 16-byte aligned output rows, True wherever the TMA
    path runs, False never. ``warp_specialize`` picks its warp-specialised variant
    (``_linear_ws_kernel``): True wherever TMA can run (any M; it builds no host descriptor), None and False
    never, until it is measured against the persistent kernel on the GPU. ``config`` pins a tile config
    instead of autotuning (benchmark sweeps).
    """
    key = (
        x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16,
        weight.shape, weight.stride(), weight.dtype, weight.device, weight.data_ptr() % 16,
        None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device, bias.data_ptr() % 16),
        activation, tma, persistent, warp_specialize, config, FAST_TANH.get(x.dtype),
    )  # fmt: skip
    entry = PLANS.get(key)
    if entry is None:
        return _plan_linear(key, x, weight, bias, activation, out, tma, persistent, warp_specialize, config)
    return launch_gemm_plan(entry, x, weight, bias, out)


def _plan_linear(key, x, weight, bias, activation, out, tma, persistent, warp_specialize, config) -> torch.Tensor:
    check_activation(activation)
    check_operands(x, weight)
    n, k = weight.shape
    shape = (*x.shape[:-1], n)
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1 or bias.device != x.device):
        raise ValueError(f"bias is {tuple(bias.shape)} on {bias.device}; expected a contiguous ({n},) on {x.device}")
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        check_out(out, shape, x.dtype)
    if out.numel() == 0:
        return out
    m = out.numel() // n
    x2d = rows_view(x, m, k)
    if x2d is None:
        # Leading dims that do not flatten to one row stride: copy once, and plan the copy's layout.
        linear_triton(
            x.reshape(m, k), weight, bias, activation, out=out.view(m, n), tma=tma, persistent=persistent,
            warp_specialize=warp_specialize, config=config,
        )  # fmt: skip
        return out
    flags = dict(ACTIVATION=activation or "none", TANH=tanh_mode(x), HAS_BIAS=bias is not None)
    # The TMA store needs 16-byte aligned output rows as well as TMA operands.
    aligned_rows = (n * x.element_size()) % 16 == 0
    if warp_specialize:
        check_warp_specialize(x2d, weight, tma, persistent, aligned_rows)
        static = (m, n, k, m_bucket(m), x2d.stride(0), weight.stride(0))
        operands = (x2d, weight, bias, out, *static)
        plan = first_launch(_linear_ws_kernel, persistent_grid, _WS_ARGS, operands, flags, config)
        PLANS.add(key, (plan, None, None, None, shape, static))
        return out
    wants_persistent = persistent or (persistent is None and m >= PERSISTENT_MIN_ROWS)
    if tma is None and wants_persistent and aligned_rows and x.is_cuda and tma_device(x.device):
        tma = True if tma_supported(x2d, weight) else None
    x_operand, w_operand, use_tma = matmul_operands(x2d, weight, tma)
    if use_tma and wants_persistent and aligned_rows:
        out_operand = output_descriptor(out, m, n)
        static = (m, n, k, m_bucket(m))
        plan = first_launch(
            _linear_persistent_kernel,
            persistent_grid,
            _PERSISTENT_ARGS,
            (x_operand, w_operand, bias, out_operand, *static),
            flags,
            config,
        )
    else:
        if persistent:
            raise ValueError(
                f"persistent=True needs the TMA path and 16-byte aligned output rows; got N = {n} in {x.dtype}"
                f"{'' if use_tma else ' and operands or a device that rule TMA out'}"
            )
        out_operand = None
        static = (m, n, k, m_bucket(m), x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), n, 1)
        plan = first_launch(
            _linear_kernel,
            matmul_grid(m, n),
            _RUNTIME_ARGS,
            (x_operand, w_operand, bias, out, *static),
            dict(**flags, IEEE_DOT=dot_is_ieee(x.dtype), USE_TMA=use_tma),
            config,
        )
    entry = (plan, plan_operand(x_operand), plan_operand(w_operand), plan_operand(out_operand), shape, static)
    PLANS.add(key, entry)
    return out


def check_warp_specialize(
    x: torch.Tensor, weight: torch.Tensor, tma: bool | None, persistent: bool | None, aligned_rows: bool
) -> None:
    """Raises where ``warp_specialize=True`` cannot run: the kernel is persistent and loads and stores through
    TMA, so it needs TMA operands on a TMA device and 16-byte aligned output rows."""
    if tma is False or persistent is False:
        raise ValueError(f"warp_specialize=True runs the persistent TMA kernel; got tma={tma}, persistent={persistent}")
    require_tma(x, weight, "warp_specialize=True")
    if not aligned_rows:
        raise ValueError(
            f"warp_specialize=True needs 16-byte aligned output rows; got N = {weight.shape[0]} in {x.dtype}"
        )


@torch.library.custom_op("vitriton::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    return linear_triton(x, weight, bias, activation)


@_linear_op.register_fake
def _linear_fake(x, weight, bias, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    eager: bool | None = None,
) -> torch.Tensor:
    """``x``: (..., K); ``weight``: (N, K) as nn.Linear stores it; ``activation`` one of ``ACTIVATIONS``.

    CUDA calls take the fastest measured path per case (``benchmarks/bench_gemm.py``, results/h100):
    - no activation: cuBLAS, whose epilogue already adds the bias (our persistent kernel is level with it at
      b128 on L/14 and so400m, behind it on smaller shapes);
    - the tanh-form gelu with a bias, that is gelu_pytorch_tanh and, for bf16 outputs on sm_90, the exact gelu
      (``GELU_AS_TANH``): cuBLASLt's bias + GELU epilogue (``torch._addmm_activation``, the same tanh
      approximation) up to ``CUBLASLT_GELU_MAX_ROWS`` rows, and for bf16 on Hopper the persistent Triton kernel
      above them;
    - otherwise (quick_gelu; the erf gelu elsewhere) the Triton kernel.
    ``linear_triton`` runs the Triton kernel on any call.
    """
    if not use_triton(x, eager, weight, bias):
        return linear_reference(x, weight, bias, activation)
    if x.is_cuda:
        if activation is None:
            return F.linear(x, weight, bias)
        tanh_gelu = activation == "gelu_pytorch_tanh" or (activation == "gelu" and tanh_mode(x) in GELU_AS_TANH)
        if tanh_gelu and bias is not None:
            rows = x.reshape(-1, x.shape[-1])
            if not (x.dtype == torch.bfloat16 and rows.shape[0] > CUBLASLT_GELU_MAX_ROWS and tma_device(x.device)):
                out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
                return out.view(*x.shape[:-1], weight.shape[0])
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias, activation)
    return linear_triton(x, weight, bias, activation)


def linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    check_activation(activation)
    out = F.linear(x, weight, bias)
    if activation == "quick_gelu":
        return out * torch.sigmoid(1.702 * out)
    if activation == "gelu":
        return F.gelu(out)
    if activation == "gelu_pytorch_tanh":
        return F.gelu(out, approximate="tanh")
    return out
