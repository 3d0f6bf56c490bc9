"""Compiles the GEMM kernels to PTX for sm90 (H100) without a GPU: ``python3 -m tests.kernels.sm90_compile``.

The interpreter that runs the CPU suite executes a kernel as Python, so it accepts code that Triton's compiler
rejects (a variable bound in only some branches, an early return) and never emits the inline assembly the GPU
takes. This runs the compiler itself, frontend to PTX, for sm90 and prints one line a kernel; it exits 1 on the
first failure. Run without TRITON_INTERPRET (``test_kernels_compile_for_sm90`` starts it in a subprocess).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("sm90_compile needs TRITON_INTERPRET unset: it compiles the kernels instead of interpreting them")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vitriton.kernels import linear  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
TILE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8)


def jit_function(kernel) -> triton.runtime.jit.JITFunction:
    """The JITFunction under autotune and heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_ptx(kernel, types: dict[str, str], constants: dict[str, object], **options) -> str:
    signature = {**types, **dict.fromkeys(constants, "constexpr")}
    source = ASTSource(fn=jit_function(kernel), signature=signature, constexprs=constants)
    return triton.compile(source, target=SM90, options=options).asm["ptx"]


def linear_cases():
    """(name, ptx thunk, instruction the PTX must hold or None): the persistent kernel in every epilogue form, the
    one-tile-a-program kernel in each form of quick_gelu."""
    descriptors = {"x": "tensordesc<bf16[128, 64]>", "w": "tensordesc<bf16[256, 64]>", "bias_ptr": "*bf16"}
    scalars = dict.fromkeys(("M", "N", "K", "M_BUCKET"), "i32")
    strides = dict.fromkeys(("stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_om", "stride_on"), "i32")
    forms = [(activation, tanh) for activation in ("quick_gelu", "gelu_pytorch_tanh") for tanh in linear.TANH_FORMS]
    for activation, tanh in [*forms, ("gelu", "f32"), ("none", "f32")]:
        expected = "tanh.approx" if tanh != "sigmoid" and activation in ("quick_gelu", "gelu_pytorch_tanh") else None
        flags = dict(ACTIVATION=activation, TANH=tanh, HAS_BIAS=True)
        persistent = dict(**flags, PROGRAMS=132, **TILE, EPILOGUE_SPLIT=2)
        types = {**descriptors, "out": "tensordesc<bf16[128, 128]>", **scalars}
        kernel = linear._linear_persistent_kernel
        yield f"linear persistent {activation} {tanh}", (kernel, types, persistent), expected
        if activation != "quick_gelu":
            continue
        tiled = dict(**flags, IEEE_DOT=False, USE_TMA=True, **TILE, EVEN_K=True)
        types = {**descriptors, "out_ptr": "*bf16", **scalars, **strides}
        yield f"linear tiled {activation} {tanh}", (linear._linear_kernel, types, tiled), expected


def main() -> int:
    for name, (kernel, types, constants), instruction in linear_cases():
        try:
            ptx = compile_ptx(kernel, types, constants, num_warps=8, num_stages=3)
        except Exception as error:  # noqa: BLE001 - reported with the kernel's name
            print(f"FAIL {name}: {type(error).__name__}: {error}")
            return 1
        if instruction is not None and instruction not in ptx:
            print(f"FAIL {name}: the PTX holds no {instruction}")
            return 1
        print(f"ok   {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
