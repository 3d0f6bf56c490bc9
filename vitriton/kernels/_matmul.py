"""The GEMM main loop and tile configs shared by ``linear`` and ``qkv_projection``.

Algorithm: the tiled GEMM of the Triton matmul tutorial
(https://triton-lang.org/main/getting-started/tutorials/03-matrix-multiplication.html): one program per
BLOCK_M x BLOCK_N output tile, a K loop of ``tl.dot`` over BLOCK_K slices into an fp32 accumulator, and the
grouped tile order (GROUP_M tile rows walk the N tiles together) so that a column panel of W stays in L2
while the programs that read it run. Each op writes its own epilogue around :func:`accumulate_tile`.

Two main loops, chosen per call by the constexpr ``USE_TMA`` (see :func:`matmul_operands`):
- TMA (Hopper and newer, 16-bit operands, 16-byte aligned base and row stride, unit column stride): x and w
  arrive as host-built ``TensorDescriptor``s; each tile is one bulk copy that the hardware zero-fills past M,
  N and K, so there is no index arithmetic, no mask and no K-tail special case. The descriptors' block shapes
  depend on the config, so every config's ``pre_hook`` (:func:`set_descriptor_blocks`) sets them before the
  launch. Host-built descriptors need no global scratch memory, which device-built ones take per program (only
  ``linear``'s warp-specialised kernel builds its own, as triton 3.6 specialises no other; ``_launch.Plan``
  allocates the scratch).
- plain ``tl.load`` everywhere else (pre-Hopper GPUs, fp32, misaligned or strided operands): Triton pipelines
  the loads over ``num_stages`` buffers (cp.async feeding the tensor cores). Load indices wrap modulo M and N,
  so the edge tiles read valid (repeated) rows instead of paying a mask on every load; only a K tail that is
  not a multiple of BLOCK_K is masked (``EVEN_K`` drops that mask).
Both paths leave the epilogue to the op, which masks its stores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from vitriton.kernels._dispatch import interpreting
from vitriton.kernels._launch import check_out, cuda_properties, sm_count

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton before 3.4: the plain-load path only
    TensorDescriptor = None

# Fewer rows than this take the plain-load main loop of the one-tile-a-program kernels (qkv_projection, and
# linear where it does not run persistent) even where TMA could run. Measured on an H100 when triton still encoded
# every descriptor per launch: qkv at M = 729 took 21.3 us of GPU time on plain loads against 24.2 with TMA, and
# the encode cost 9-20 us of host time a call. (Plans now encode once per address: ``_launch.Plan.expand``.)
TMA_MIN_ROWS = 2049

# M at or below this runs the small-tile configs: at batch 1 (M = 50..729) 128-row tiles leave most of the
# 132 SMs of an H100 idle. A power of two, so no autotune bucket of M (see m_bucket) straddles it.
SMALL_M = 2048


def set_descriptor_blocks(nargs: dict[str, Any]) -> None:
    """Config pre-hook: gives the TMA descriptors (when the call has them) this config's tile shapes."""
    x, w = nargs["x"], nargs["w"]
    if TensorDescriptor is not None and isinstance(x, TensorDescriptor):
        x.block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        w.block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
        if isinstance(nargs.get("out"), TensorDescriptor):  # the persistent kernel's TMA store
            nargs["out"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"] // nargs["EPILOGUE_SPLIT"]]


def _config(
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    group_m: int = 8,
    epilogue_split: int | None = None,
    host_descriptors: bool = True,
    ctas_per_sm: int | None = None,
) -> triton.Config:
    """A tile config; ``host_descriptors`` False for a kernel that builds its TMA descriptors itself (their block
    shapes are its constexprs), which then needs no pre-hook. ``epilogue_split`` and ``ctas_per_sm`` are the
    persistent kernels' (column slices of the TMA store; programs launched per SM)."""
    sizes = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}
    if epilogue_split is not None:
        sizes["EPILOGUE_SPLIT"] = epilogue_split
    if ctas_per_sm is not None:
        sizes["CTAS_PER_SM"] = ctas_per_sm
    pre_hook = set_descriptor_blocks if host_descriptors else None
    return triton.Config(sizes, num_warps=num_warps, num_stages=num_stages, pre_hook=pre_hook)


# Shared memory per config is num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K * itemsize; all fit the H100's 227 KiB.
# Two candidates per M range on the plain-load path and three on the TMA path keep the first call of a whole
# model (3 kernel variants, each compiled per config) within its compile budget.
# 16-bit operands, M > SMALL_M: 256x128 tiles (144 KiB, one CTA per SM, 8 warps) amortise the epilogue over
# the most FLOPs; 128x256 would do the same, but triton 3.6's ptxas serialises its wgmma chain (warning C7515)
# in the activation and q/k/v variants. 128x128 tiles at 3 stages (96 KiB, at most 255 registers x 128
# threads) fit two CTAs per SM, so one CTA's epilogue (activation, residual, scattered q/k/v stores) overlaps
# the other's main loop.
_LARGE_M_16BIT = [
    _config(256, 128, 64, num_warps=8, num_stages=3),
    _config(128, 128, 64, num_warps=4, num_stages=3),
]
# 16-bit operands, M <= SMALL_M: 64 and 96 KiB.
_SMALL_M_16BIT = [
    _config(64, 64, 64, num_warps=4, num_stages=4),
    _config(64, 128, 64, num_warps=4, num_stages=4),
]
# The TMA path (16-bit only). Its loads issue from one thread and hold no address registers, so deeper
# pipelines fit: 256x128 at 3 and 4 stages (144 and 192 KiB), 128x128 at 8 warps and 4 stages (128 KiB) for
# the residual epilogue, where 256x128 spills. 128x256 is left out: triton 3.6's ptxas serialises its wgmma
# chain (C7515) with any of our epilogues, even bias-only, on both paths.
_TMA_LARGE_M = [
    _config(256, 128, 64, num_warps=8, num_stages=3),
    _config(256, 128, 64, num_warps=8, num_stages=4),
    _config(128, 128, 64, num_warps=8, num_stages=4),
]
# M <= SMALL_M: 320 and 160 tiles of an N = 4096 output at M = 577, 64 and 128 KiB.
_TMA_SMALL_M = [
    _config(64, 128, 64, num_warps=4, num_stages=4),
    _config(128, 128, 64, num_warps=8, num_stages=4),
    _config(64, 64, 64, num_warps=4, num_stages=4),
]
# The persistent TMA kernel (``linear``'s large-M epilogue path): CTAS_PER_SM programs per SM walk the tiles,
# and the flattened tile x K loop lets the pipeliner issue the next tile's loads while this tile's epilogue
# runs. Its TMA store goes out in EPILOGUE_SPLIT column slices, so the staging buffer is a slice, not the whole
# tile: 128x256 at 3 stages is 144 KiB of operands plus 32 KiB of staging. One warpgroup's 128x128 tiles at 3
# stages take 112 KiB as compiled for sm90, so two programs fit an SM, and one's epilogue (bias, activation,
# store) runs while the other's wgmma keep the tensor cores busy: the two-CTA form of CUTLASS's ping-pong
# schedule. One H200, fc1 with its activation against cuBLAS F.linear + bias (benchmarks/sweep_matmul.py,
# results/h200/session20/sweeps/sweep_persistent.log): 128x256 one a SM wins at L/14-336 b128 (0.90x against
# 0.86x), ties at so400m b128 (0.83x), and the two-program 128x128 wins at L/14-336 b8 (0.89x against 0.83x),
# so400m b8 (0.92 / 0.89), B/16 b128 (0.94 / 0.87), H/14 b128 (0.76 / 0.71) and bigG b128 (0.83 / 0.76), the last
# two with the erf gelu. 128x128 at 8 warps or 4 stages, one a SM, never won and is left out.
_PERSISTENT = [
    _config(128, 256, 64, num_warps=8, num_stages=3, epilogue_split=2, ctas_per_sm=1),
    _config(256, 128, 64, num_warps=8, num_stages=3, epilogue_split=2, ctas_per_sm=1),
    _config(128, 128, 64, num_warps=4, num_stages=3, epilogue_split=2, ctas_per_sm=2),
]
# M <= SMALL_M (batch 1 to 8): 64-row tiles for more of them (104 KiB at 4 stages, two an SM), and the two-program
# 128x128. One H200 (results/h200/session20/sweeps/sweep_small_m.log), GPU time against cuBLAS: L/14-336 fc1 at M = 577
# 0.49x with plain loads (64x128 tiles, the former path) -> 0.63x; B/16 fc1 at batch 8 0.58x -> 0.72x; so400m fc1
# at M = 729 0.58x -> 0.81x (128x128).
_PERSISTENT_SMALL_M = [
    _config(64, 128, 64, num_warps=4, num_stages=4, epilogue_split=2, ctas_per_sm=2),
    _config(128, 128, 64, num_warps=4, num_stages=3, epilogue_split=2, ctas_per_sm=2),
]
_PERSISTENT_INTERPRETER = [_config(16, 32, 32, num_warps=1, num_stages=1, group_m=2, epilogue_split=2, ctas_per_sm=1)]
# The warp-specialised persistent kernel (``linear``'s ``_linear_ws_kernel``): triton 3.6 specialises only at
# num_warps=4, into a producer warp and two consumer warpgroups of BLOCK_M x BLOCK_N tiles, with the whole tile
# as the TMA store's staging buffer. Shared memory as compiled for sm90: 128x128 128 and 160 KiB at 3 and 4
# stages, 128x256 208 KiB at 3; 128x256 at 4 stages (256 KiB) is past the H100's 227 KiB and left out.
_WARP_SPECIALIZED = [
    _config(128, 128, 64, num_warps=4, num_stages=3, host_descriptors=False, ctas_per_sm=1),
    _config(128, 128, 64, num_warps=4, num_stages=4, host_descriptors=False, ctas_per_sm=1),
    _config(128, 256, 64, num_warps=4, num_stages=3, host_descriptors=False, ctas_per_sm=1),
]
_WARP_SPECIALIZED_INTERPRETER = [
    _config(16, 32, 32, num_warps=1, num_stages=1, group_m=2, host_descriptors=False, ctas_per_sm=1)
]

# fp32 operands take exact (ieee) dots on the FMA units; this path exists for parity, not speed, so one config
# each (96 and 48 KiB) and no tuning.
_LARGE_M_FP32 = [_config(128, 128, 32, num_warps=8, num_stages=3)]
_SMALL_M_FP32 = [_config(64, 64, 32, num_warps=4, num_stages=3)]

# The interpreter runs one small config: autotuning there costs minutes, and small tiles make the CPU tests'
# odd shapes cross several tile edges and GROUP_M bands.
_INTERPRETER = [_config(16, 32, 32, num_warps=1, num_stages=1, group_m=2)]


def matmul_configs() -> list[triton.Config]:
    """Every config the GEMM kernels may run; :func:`prune_matmul_configs` narrows it per call."""
    if interpreting():
        return list(_INTERPRETER)
    pools = [_LARGE_M_16BIT, _SMALL_M_16BIT, _TMA_LARGE_M, _TMA_SMALL_M, _LARGE_M_FP32, _SMALL_M_FP32]
    return list(dict.fromkeys(config for pool in pools for config in pool))


def persistent_configs() -> list[triton.Config]:
    """The persistent TMA kernel's candidates; :func:`prune_persistent_configs` keeps those of a call's M range."""
    if interpreting():
        return list(_PERSISTENT_INTERPRETER)
    return list(dict.fromkeys(_PERSISTENT + _PERSISTENT_SMALL_M))


def prune_persistent_configs(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """The persistent candidates for this call's M: ``_PERSISTENT_SMALL_M`` up to SMALL_M rows, else
    ``_PERSISTENT`` (the interpreter's one config stays as is)."""
    pool = _PERSISTENT_SMALL_M if {**named_args, **kwargs}["M"] <= SMALL_M else _PERSISTENT
    return [config for config in configs if config in pool] or configs[:1]


def warp_specialized_configs() -> list[triton.Config]:
    """The warp-specialised persistent kernel's candidates, all tuned per shape as the persistent kernel's are."""
    return list(_WARP_SPECIALIZED_INTERPRETER if interpreting() else _WARP_SPECIALIZED)


def matmul_config_pool(m: int, element_size: int, use_tma: bool) -> list[triton.Config]:
    """The configs autotuned for one call: its path, operand width and M range (at most 3)."""
    small = m <= SMALL_M
    if use_tma:
        return _TMA_SMALL_M if small else _TMA_LARGE_M
    if element_size >= 4:
        return _SMALL_M_FP32 if small else _LARGE_M_FP32
    return _SMALL_M_16BIT if small else _LARGE_M_16BIT


def prune_matmul_configs(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """Keeps :func:`matmul_config_pool`'s configs for this call (the interpreter's one config stays as is)."""
    args = {**named_args, **kwargs}
    x = args["x"]
    element_size = (x.base if args["USE_TMA"] else x).element_size()
    pool = matmul_config_pool(args["M"], element_size, args["USE_TMA"])
    return [config for config in configs if config in pool] or configs[:1]


def tma_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the operands meet TMA's layout rules (the device aside): 16-bit, non-empty, unit column stride,
    16-byte aligned base pointers and row strides, rows that do not overlap (no broadcast x)."""
    if TensorDescriptor is None or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return all(
        min(t.shape) > 0
        and t.stride(1) == 1
        and t.stride(0) >= t.shape[1]
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        for t in (x, weight)
    )


# The TMA kernels' default configs take up to 192 KiB of shared memory a block (two 112 KiB programs an SM for the
# two-program ones), sized for Hopper's 227 KiB a block, which datacenter Blackwell keeps. Consumer Blackwell
# (sm_120) gives about 99 KiB, where every persistent config would fail to launch: it takes the plain-load kernels,
# whose pools have configs that fit.
TMA_SHARED_BYTES = 192 * 1024


def tma_device(device: torch.device) -> bool:
    """Hopper or newer with Hopper's shared memory a block (``TMA_SHARED_BYTES``); the interpreter also runs
    descriptor loads, so it counts too."""
    if device.type == "cuda":
        properties = cuda_properties(device)
        return properties.major >= 9 and properties.shared_memory_per_block_optin >= TMA_SHARED_BYTES
    return interpreting()


def require_tma(x: torch.Tensor, weight: torch.Tensor, asked: str) -> None:
    """Raises, naming ``asked`` (the argument that forced a TMA kernel), where the operands or the device rule
    TMA out (:func:`tma_supported`, :func:`tma_device`)."""
    if not tma_supported(x, weight):
        raise ValueError(
            f"{asked} needs 16-bit operands with unit column strides and distinct, 16-byte aligned rows; got x "
            f"{x.dtype} strides {x.stride()}, weight strides {weight.stride()}"
        )
    if not tma_device(x.device):
        raise ValueError(f"{asked} needs a GPU of compute capability 9.0 or more (or the interpreter); got {x.device}")


def matmul_operands(x: torch.Tensor, weight: torch.Tensor, tma: bool | None) -> tuple[Any, Any, bool]:
    """(x, w, USE_TMA) as the kernels take them: TMA descriptors where :func:`tma_supported` holds on a CUDA
    device of compute capability 9 or more and x has at least ``TMA_MIN_ROWS`` rows, else the tensors
    themselves.

    ``tma``: None picks as above; True requires the TMA path (also in the interpreter), raising where the
    operands or the device rule it out; False forces the plain-load path.
    """
    if tma is None:
        use_tma = (
            x.shape[0] >= TMA_MIN_ROWS and x.device.type == "cuda" and tma_device(x.device) and tma_supported(x, weight)
        )
    elif tma:
        require_tma(x, weight, "tma=True")
        use_tma = True
    else:
        use_tma = False
    if not use_tma:
        return x, weight, False
    # The block shapes are placeholders until a config's pre-hook (set_descriptor_blocks) sets them.
    x_desc = TensorDescriptor(x, list(x.shape), [x.stride(0), 1], [16, 16])
    w_desc = TensorDescriptor(weight, list(weight.shape), [weight.stride(0), 1], [16, 16])
    return x_desc, w_desc, True


def output_descriptor(out: torch.Tensor, m: int, n: int) -> Any:
    """A TMA store descriptor over a contiguous (..., n) output of m rows; the config's pre-hook sets its block."""
    return TensorDescriptor(out.view(m, n), [m, n], [n, 1], [16, 16])


def descriptor_over(tensor: torch.Tensor, template: Any) -> Any:
    """``template`` (a TMA descriptor a plan was built with) over ``tensor``'s memory.

    The plan's signature fixes shape, strides, dtype and alignment, which TensorDescriptor's constructor
    re-validates in Python on every call; a copy of the validated template with the new base skips that. The
    launcher reads only the base's address, so ``tensor`` may keep its leading dims.
    """
    descriptor = object.__new__(TensorDescriptor)
    descriptor.__dict__.update(template.__dict__)
    descriptor.base = tensor
    return descriptor


def launch_gemm_plan(entry: tuple, x: torch.Tensor, weight: torch.Tensor, bias, out) -> torch.Tensor:
    """A GEMM op's steady-state call: ``entry`` is ``(plan, x_template, w_template, out_template, shape,
    static)`` as ``linear`` and ``qkv_projection`` record it (templates None on the plain-load path). Allocates
    or checks ``out``, puts the call's tensors into the plan's TMA descriptors and launches.

    The kernels take x's base pointer and the plan's row stride, so x goes in as it is (no (M, K) view).
    """
    plan, x_template, w_template, out_template, shape, static = entry
    if out is None:
        out = x.new_empty(shape)
    else:
        check_out(out, shape, x.dtype)
    device_index = x.device.index
    if x_template is not None:
        x, weight = descriptor_over(x, x_template), descriptor_over(weight, w_template)
    plan.launch(
        device_index, x, weight, bias, out if out_template is None else descriptor_over(out, out_template), *static
    )
    return out


def plan_operand(operand: Any) -> Any:
    """What a plan keeps of a GEMM operand: a TMA descriptor without its tensor (``descriptor_over`` puts the
    call's tensor back), or None for a plain pointer. Plans then hold no tensor, so a model's weights are freed
    with the model, and a weight reallocated at the same address with the same layout finds a correct plan."""
    if TensorDescriptor is None or not isinstance(operand, TensorDescriptor):
        return None
    return descriptor_over(None, operand)


def config_name(config: triton.Config) -> str:
    """A tile config as "256x128x64 w8 s3", with " 2/SM" where a persistent kernel runs two programs an SM."""
    size = config.kwargs
    name = f"{size['BLOCK_M']}x{size['BLOCK_N']}x{size['BLOCK_K']} w{config.num_warps} s{config.num_stages}"
    ctas = size.get("CTAS_PER_SM", 1)
    return name if ctas == 1 else f"{name} {ctas}/SM"


def last_config(kernel: triton.runtime.Autotuner) -> str:
    """The config an autotuned GEMM kernel ran last (``config_name``), for benchmark tables."""
    config = getattr(kernel, "best_config", None)
    return "-" if config is None else config_name(config)


def m_bucket(m: int) -> int:
    """The autotune key's stand-in for M: one tuning per power of two, not per batch size."""
    return triton.next_power_of_2(max(m, 1))


def matmul_grid(m: int, n: int) -> Callable[[dict[str, Any]], tuple[int]]:
    """One program per output tile, all on grid axis 0 (axes 1 and 2 stop at 65535)."""

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    return grid


def persistent_programs(args: dict[str, Any]) -> int:
    """A persistent kernel's ``PROGRAMS``, the stride of its tile loop: ``CTAS_PER_SM`` programs on every SM (3 in
    the interpreter, so that the CPU tests' programs walk several tiles each). It depends on the device and the
    config only: a constexpr that followed M would compile the kernel again for every batch size."""
    x = args["x"] if "x" in args else args["x_ptr"]
    device = getattr(x, "base", x).device  # x is a host TMA descriptor or a tensor
    return sm_count(device) * args["CTAS_PER_SM"] if device.type == "cuda" else 3


def persistent_grid(meta: dict[str, Any]) -> tuple[int]:
    """``PROGRAMS`` programs, or one per tile where the output has fewer tiles (each then runs its own)."""
    tiles = triton.cdiv(meta["M"], meta["BLOCK_M"]) * triton.cdiv(meta["N"], meta["BLOCK_N"])
    return (min(meta["PROGRAMS"], tiles),)


def even_k(args: dict[str, Any]) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


def dot_is_ieee(dtype: torch.dtype) -> bool:
    """fp32 operands take exact fp32 dots (no TF32), so fp32 parity with transformers holds to 1e-4."""
    return dtype == torch.float32


def check_operands(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected (N, {x.shape[-1]}) for x {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x has dtype {x.dtype}; expected float32, float16 or bfloat16")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight has dtype {weight.dtype}; expected x's dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}; expected x's device {x.device}")


@triton.jit
def tile_coordinates(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: bands of GROUP_M tile rows, column-major inside."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    band_size = GROUP_M * tiles_n
    first_m = (pid // band_size) * GROUP_M
    band_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    in_band = pid % band_size
    return first_m + in_band % band_rows, in_band // band_rows


@triton.jit
def accumulate_tile_tma(
    x_desc,  # (M, K) descriptor, blocks (BLOCK_M, BLOCK_K)
    w_desc,  # (N, K) descriptor, blocks (BLOCK_N, BLOCK_K), nn.Linear layout
    K,
    pid_m,
    pid_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_N) tile of ``x @ w^T``; TMA zero-fills past M, N and K, so edge rows hold zeros."""
    offset_m = pid_m * BLOCK_M
    offset_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x_tile = x_desc.load([offset_m, k * BLOCK_K])
        w_tile = w_desc.load([offset_n, k * BLOCK_K])
        acc = tl.dot(x_tile, w_tile.T, acc)
    return acc


@triton.jit
def accumulate_tile(
    x_ptr,  # (M, K)
    w_ptr,  # (N, K), nn.Linear layout
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    pid_m,
    pid_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_N) tile of ``x @ w^T``; rows past M and columns past N hold wrapped values."""
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x_tile = tl.load(x_ptrs)
            w_tile = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            x_tile = tl.load(x_ptrs, mask=ks[None, :] < k_left, other=0.0)
            w_tile = tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0)
        if IEEE_DOT:
            acc = tl.dot(x_tile, w_tile, acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile, w_tile, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def gemm_tile(
    x,  # (M, K) pointer, or its TMA descriptor when USE_TMA
    w,  # (N, K) pointer, or its TMA descriptor when USE_TMA
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """This program's ``(pid_m, pid_n, acc)``: its tile in grouped order and the fp32 tile of ``x @ w^T``."""
    pid_m, pid_n = tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if USE_TMA:
        acc = accumulate_tile_tma(x, w, K, pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = accumulate_tile(
            x,
            w,
            M,
            N,
            K,
            stride_xm,
            stride_xk,
            stride_wn,
            stride_wk,
            pid_m,
            pid_n,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            EVEN_K,
            IEEE_DOT,
        )
    return pid_m, pid_n, acc
