"""Compiles vitriton's Triton kernels to PTX for sm90 (H100) without a GPU: ``python3 -m tests.kernels.sm90_compile``.

The interpreter that runs the CPU suite executes a kernel as Python, so it accepts code that Triton's compiler
rejects (a variable bound in only some branches, an early return) and never emits the inline assembly the GPU
takes. This runs the compiler itself, frontend to PTX, for sm90, on the constexpr combinations the launchers pick
for the reference models (bf16), and prints one line a case; it exits 1 on the first failure. Run it without
TRITON_INTERPRET (``test_sm90_compile.py`` starts it in a subprocess).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("sm90_compile needs TRITON_INTERPRET unset: it compiles the kernels instead of interpreting them")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vitriton.kernels import _matmul, attention, layernorm, linear, qkv  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
SM90_SHARED = 228 * 1024  # bytes of shared memory an SM has
TILE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
DESCRIPTORS = {"x": "tensordesc<bf16[128, 64]>", "w": "tensordesc<bf16[128, 64]>", "bias_ptr": "*bf16"}
GEMM_SCALARS = dict.fromkeys(("M", "N", "K", "M_BUCKET"), "i32")


class Case(NamedTuple):
    name: str
    kernel: Any  # a JITFunction, possibly under autotune and heuristics wrappers
    types: dict[str, str]  # runtime arguments
    constants: dict[str, Any]  # constexprs
    options: dict[str, int]  # num_warps, num_stages
    instruction: str | None = None  # the PTX must hold it
    max_shared: int | None = None  # bytes of shared memory the kernel may take at most
    target: GPUTarget = GPUTarget("cuda", 90, 32)


def jit_function(kernel: Any) -> triton.runtime.jit.JITFunction:
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_sm90(case: Case) -> Any:
    """The CompiledKernel (its ``asm["ptx"]`` and ``metadata.shared``)."""
    signature = {**case.types, **dict.fromkeys(case.constants, "constexpr")}
    source = ASTSource(fn=jit_function(case.kernel), signature=signature, constexprs=case.constants)
    return triton.compile(source, target=case.target, options=case.options)


def strides(*names: str) -> dict[str, str]:
    return {f"stride_{name}": "i32" for name in names}


def linear_cases() -> Iterator[Case]:
    """The persistent kernel in every epilogue form; the one-tile-a-program kernel in each form of quick_gelu."""
    forms = [(activation, tanh) for activation in ("quick_gelu", "gelu_pytorch_tanh") for tanh in linear.TANH_FORMS]
    gelu_forms = [("gelu", "f32"), ("gelu", "bf16x2"), ("gelu", "bf16x2_math")]
    for activation, tanh in [*forms, *gelu_forms, ("none", "f32")]:
        tanh_shaped = activation in ("quick_gelu", "gelu_pytorch_tanh") or (activation == "gelu" and "bf16" in tanh)
        expected = "tanh.approx" if tanh != "sigmoid" and tanh_shaped else None
        if tanh == "bf16x2_math" and tanh_shaped:
            expected = "fma.rn.bf16x2"
        flags = dict(ACTIVATION=activation, TANH=tanh, HAS_BIAS=True)
        yield Case(
            f"linear persistent {activation} {tanh}",
            linear._linear_persistent_kernel,
            {**DESCRIPTORS, "out": "tensordesc<bf16[128, 64]>", **GEMM_SCALARS},
            dict(**flags, PROGRAMS=132, **TILE, EPILOGUE_SPLIT=2, CTAS_PER_SM=1),
            dict(num_warps=8, num_stages=4),
            expected,
        )
        if activation == "quick_gelu":
            yield Case(
                f"linear tiled {activation} {tanh}",
                linear._linear_kernel,
                {**DESCRIPTORS, "out_ptr": "*bf16", **GEMM_SCALARS, **strides("xm", "xk", "wn", "wk", "om", "on")},
                dict(**flags, IEEE_DOT=False, USE_TMA=True, **TILE, EVEN_K=True),
                dict(num_warps=8, num_stages=4),
                expected,
            )


def linear_sm80_cases() -> Iterator[Case]:
    """bf16 on an A100 (sm_80): the plain-load kernel in the tanh form ``tanh_mode`` picks there, which must not be
    sm_90's ``tanh.approx.bf16x2`` (ptxas rejects it below sm_90)."""
    tanh = linear.tanh_form(torch.bfloat16, 80)
    for activation in ("quick_gelu", "gelu"):
        yield Case(
            f"linear tiled {activation} {tanh} sm80",
            linear._linear_kernel,
            {"x": "*bf16", "w": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16", **GEMM_SCALARS}
            | strides("xm", "xk", "wn", "wk", "om", "on"),
            dict(ACTIVATION=activation, TANH=tanh, HAS_BIAS=True, IEEE_DOT=False, USE_TMA=False, **TILE, EVEN_K=True),
            dict(num_warps=8, num_stages=3),
            "tanh.approx.f32" if activation == "quick_gelu" else None,
            target=GPUTarget("cuda", 80, 32),
        )


def linear_resident_cases() -> Iterator[Case]:
    """Every persistent config of ``linear``'s pool that launches several programs an SM, in each tanh-shaped
    activation: the programs must fit the SM's shared memory together (228 KiB on sm90, 1 KiB of it reserved per
    CTA), or they run one after another and the overlap the config is chosen for is gone."""
    for config in _matmul.persistent_configs():
        size = config.kwargs
        if size["CTAS_PER_SM"] == 1:
            continue
        store = size["BLOCK_N"] // size["EPILOGUE_SPLIT"]
        for activation in ("quick_gelu", "gelu_pytorch_tanh", "gelu"):
            yield Case(
                f"linear persistent {_matmul.config_name(config)} {activation}",
                linear._linear_persistent_kernel,
                {
                    "x": f"tensordesc<bf16[{size['BLOCK_M']}, {size['BLOCK_K']}]>",
                    "w": f"tensordesc<bf16[{size['BLOCK_N']}, {size['BLOCK_K']}]>",
                    "bias_ptr": "*bf16",
                    "out": f"tensordesc<bf16[{size['BLOCK_M']}, {store}]>",
                    **GEMM_SCALARS,
                },
                dict(ACTIVATION=activation, TANH="bf16x2", HAS_BIAS=True, PROGRAMS=264, **size),
                dict(num_warps=config.num_warps, num_stages=config.num_stages),
                "tanh.approx",
                SM90_SHARED // size["CTAS_PER_SM"] - 1024,
            )


def linear_ws_cases() -> Iterator[Case]:
    """The warp-specialised persistent kernel, which must come out specialised: ``setmaxnreg`` in the PTX is the
    register split between its producer and consumer warpgroups (``ttg.warp_specialize`` in the TTGIR)."""
    for activation, tanh in (("quick_gelu", "bf16x2"), ("gelu_pytorch_tanh", "bf16x2"), ("none", "f32")):
        yield Case(
            f"linear warp-specialised {activation} {tanh}",
            linear._linear_ws_kernel,
            {
                **dict.fromkeys(("x_ptr", "w_ptr", "bias_ptr", "out_ptr"), "*bf16"),
                **GEMM_SCALARS,
                **strides("xm", "wn"),
            },
            dict(ACTIVATION=activation, TANH=tanh, HAS_BIAS=True, PROGRAMS=132, **TILE, CTAS_PER_SM=1),
            dict(num_warps=4, num_stages=4),
            "setmaxnreg",
        )


def qkv_cases() -> Iterator[Case]:
    """The head-split epilogue at ViT-L (16 x 64) and so400m (16 x 72) heads, TMA and plain loads."""
    for heads, head_dim in ((16, 64), (16, 72)):
        for use_tma in (True, False):
            operands = DESCRIPTORS if use_tma else {"x": "*bf16", "w": "*bf16", "bias_ptr": "*bf16"}
            yield Case(
                f"qkv {heads}x{head_dim} {'tma' if use_tma else 'plain'}",
                qkv._qkv_kernel,
                {**operands, "out_ptr": "*bf16", **GEMM_SCALARS, "SEQ": "i32", **strides("xm", "xk", "wn", "wk")},
                dict(
                    HEADS=heads,
                    HEAD_DIM=head_dim,
                    HAS_BIAS=True,
                    IEEE_DOT=False,
                    VEC=qkv.store_vector_width(head_dim),
                    USE_TMA=use_tma,
                    **TILE,
                    EVEN_K=True,
                ),
                dict(num_warps=8, num_stages=4),
            )


def attention_cases() -> Iterator[Case]:
    """The tiles ``pick_config`` gives the reference shapes (head dims 64, 72, 80, 104, 256, and 104 at a long
    sequence), and the causal, masked text tower."""
    shapes = [(64, 577, False), (72, 729, False), (80, 257, False), (104, 257, False), (104, 577, False)]
    shapes += [(256, 197, False), (64, 77, True)]
    for head_dim, seq, text in shapes:
        config = attention.pick_config(head_dim, seq, 128 * 16, torch.bfloat16, 132)
        _, tiles = attention.tile_constants(head_dim, seq, config)
        align = min(head_dim & -head_dim, 16)
        types = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
        types["keep_ptr"] = "*i1" if text else "*bf16"
        types.update(strides("qb", "qh", "qs", "qd", "kb", "kh", "ks", "kd", "vb", "vh", "vs", "vd", "ob", "os", "oc"))
        types.update(strides("mb", "mk"), heads="i32", seq="i32", full_tiles="i32", qk_scale="fp32")
        yield Case(
            f"attention hd{head_dim} S{seq}{' causal masked' if text else ''}",
            attention._attention_fwd_kernel,
            types,
            dict(**tiles, ALIGN=align, O_ALIGN=align, CAUSAL=text, HAS_MASK=text, PRECISION="tf32"),
            dict(num_warps=config.num_warps, num_stages=config.num_stages),
        )


def layer_norm_cases() -> Iterator[Case]:
    """Residual add + LayerNorm at widths 768, 1152 and 1664, with and without the residual, and with an fp32
    shift (the encoder's carried biases) at 1024 and 1152."""
    for width, form in ((768, None), (1152, "residual"), (1664, "residual"), (1024, "shift"), (1152, "shift")):
        block_m, block_n, num_warps = layernorm.layer_norm_config(width, 2)
        types = {name: "*bf16" for name in ("x_ptr", "residual_ptr", "weight_ptr", "bias_ptr", "out_ptr")}
        types.update(residual_out_ptr="*bf16", **strides("x_row", "residual_row", "out_row", "residual_out_row"))
        types.update(M="i32", N="i32", eps="fp32")
        if form == "shift":
            types.update(residual_ptr="*fp32")
        yield Case(
            f"layer_norm N{width}{'' if form is None else ' + ' + form}",
            layernorm._add_layer_norm_fwd_kernel,
            types,
            dict(
                HAS_RESIDUAL=form is not None,
                STORE_RESIDUAL=form == "residual",
                HAS_BIAS=True,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
            ),
            dict(num_warps=num_warps),
        )


def cases() -> Iterator[Case]:
    yield from linear_cases()
    yield from linear_resident_cases()
    yield from linear_sm80_cases()
    yield from linear_ws_cases()
    yield from qkv_cases()
    yield from attention_cases()
    yield from layer_norm_cases()


def main() -> int:
    for case in cases():
        try:
            compiled = compile_sm90(case)
        except Exception as error:  # noqa: BLE001 - reported with the case's name
            print(f"FAIL {case.name}: {type(error).__name__}: {error}")
            return 1
        if case.instruction is not None and case.instruction not in compiled.asm["ptx"]:
            print(f"FAIL {case.name}: the PTX holds no {case.instruction}")
            return 1
        shared = compiled.metadata.shared
        if case.max_shared is not None and shared > case.max_shared:
            print(f"FAIL {case.name}: takes {shared} bytes of shared memory, more than its {case.max_shared}")
            return 1
        print(f"ok   {case.name} ({shared} bytes of shared memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
