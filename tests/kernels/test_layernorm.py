"""Fused residual add + LayerNorm against its eager reference, through the interpreter on CPU."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DEVICE, DTYPES, TOLERANCES, poisoned
from vitriton.kernels.layernorm import (
    MAX_FUSED_N,
    layer_norm,
    layer_norm_config,
    layer_norm_reference,
    layer_norm_triton,
)

EPS = 1e-5
CPU_ROWS = (1, 7, 50)
CPU_COLS = (32, 72, 768, 1152)
GPU_ROWS = 128 * 577
GPU_COLS = (768, 1024, 1152, 1280, 1664, 8192)
# (has_residual, has_bias)
VARIANTS = [(True, True), (True, False), (False, True), (False, False)]


def make_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, *, has_residual: bool = True, has_bias: bool = True, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """x, weight, bias, residual: random, never zeros; the weight sits near 1 as a trained one does."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=generator, device=DEVICE, dtype=torch.float32)

    n_cols = shape[-1]
    x = (randn(*shape) * 2 + 0.5).to(dtype)
    residual = randn(*shape).to(dtype) if has_residual else None
    weight = (1 + 0.1 * randn(n_cols)).to(dtype)
    bias = (0.1 * randn(n_cols)).to(dtype) if has_bias else None
    return x, weight, bias, residual


def check_launcher(x, weight, bias, residual) -> None:
    """Runs the launcher into NaN-poisoned buffers and compares with the eager reference."""
    out_buffer = poisoned(x.shape, x.dtype, x.device)
    residual_out_buffer = poisoned(x.shape, x.dtype, x.device) if residual is not None else None
    out, residual_out = layer_norm_triton(
        x, weight, bias, EPS, residual, out=out_buffer, residual_out=residual_out_buffer
    )
    ref_out, ref_residual_out = layer_norm_reference(x, weight, bias, EPS, residual)

    assert out is out_buffer
    rtol, atol = TOLERANCES[x.dtype]
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    if residual is None:
        assert residual_out is None
    else:
        assert residual_out is residual_out_buffer
        # Both round the exact fp32 sum once to x's dtype: bit-identical.
        torch.testing.assert_close(residual_out, ref_residual_out, rtol=0, atol=0)


@pytest.mark.parametrize("has_residual, has_bias", VARIANTS)
@pytest.mark.parametrize("n_cols", CPU_COLS)
@pytest.mark.parametrize("n_rows", CPU_ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype: torch.dtype, n_rows: int, n_cols: int, has_residual: bool, has_bias: bool) -> None:
    check_launcher(*make_inputs((n_rows, n_cols), dtype, has_residual=has_residual, has_bias=has_bias))


@pytest.mark.gpu
@pytest.mark.parametrize("has_residual, has_bias", [(True, True), (False, False)])
@pytest.mark.parametrize("n_cols", GPU_COLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_full_size(dtype: torch.dtype, n_cols: int, has_residual: bool, has_bias: bool) -> None:
    check_launcher(*make_inputs((GPU_ROWS, n_cols), dtype, has_residual=has_residual, has_bias=has_bias))


def check_shift(x: torch.Tensor, weight, bias, shift: torch.Tensor) -> None:
    """The shift form into a NaN-poisoned buffer against fp32 math on the rounded sum (which the kernel
    normalises, as transformers normalises its rounded hidden state)."""
    out_buffer = poisoned(x.shape, x.dtype, x.device)
    out, residual_out = layer_norm_triton(x, weight, bias, EPS, shift=shift, out=out_buffer)
    assert out is out_buffer and residual_out is None
    summed = (x.float() + shift.float()).to(x.dtype).float()
    want = torch.nn.functional.layer_norm(
        summed, (x.shape[-1],), weight.float(), None if bias is None else bias.float(), EPS
    ).to(x.dtype)
    rtol, atol = TOLERANCES[x.dtype]
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)
    ref_out, same = layer_norm_reference(x, weight, bias, EPS, shift=shift)
    assert same is x
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shift_dtype", ["fp32", "x"])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("n_cols", CPU_COLS)
@pytest.mark.parametrize("n_rows", CPU_ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shift_matches_reference(dtype: torch.dtype, n_rows: int, n_cols: int, has_bias: bool, shift_dtype: str):
    """``shift=``: a per-column vector (the encoder's carried biases, in fp32) added before the statistics."""
    x, weight, bias, _ = make_inputs((n_rows, n_cols), dtype, has_residual=False, has_bias=has_bias)
    shift = 3 * make_inputs((1, n_cols), torch.float32, has_residual=False, seed=5)[0][0]
    check_shift(x, weight, bias, shift if shift_dtype == "fp32" else shift.to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("n_cols", GPU_COLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shift_matches_reference_full_size(dtype: torch.dtype, n_cols: int) -> None:
    x, weight, bias, _ = make_inputs((GPU_ROWS, n_cols), dtype, has_residual=False)
    check_shift(x, weight, bias, 3 * make_inputs((1, n_cols), torch.float32, has_residual=False, seed=5)[0][0])


def test_shift_strided_rows_and_public_function() -> None:
    x, weight, bias, _ = make_inputs((9, 2 * 72), torch.float32, has_residual=False)
    _, weight, bias, _ = make_inputs((1, 72), torch.float32)
    shift = make_inputs((1, 2 * 72), torch.float32, has_residual=False, seed=3)[0][0]
    check_shift(x[:, 72:], weight, bias, shift[::2])  # rows of stride 144 read in place; a strided shift copied
    x3 = x[:, :72].reshape(3, 3, 72)
    out, same = layer_norm(x3, weight, bias, EPS, shift=shift[:72])
    assert same is x3 and out.shape == x3.shape
    want, _ = layer_norm_reference(x3, weight, bias, EPS, shift=shift[:72])
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_shift_alignment_is_part_of_the_plan() -> None:
    """triton specialises every pointer on 16-byte alignment, so a shift 4 bytes off it (a row of the encoder's
    (2 * layers, N) fp32 bias sums when N is not a multiple of 4) must not replay the plan of an aligned one."""
    from vitriton.kernels import layernorm

    x, weight, bias, _ = make_inputs((7, 72), torch.float32, has_residual=False)
    sums = make_inputs((1, 2 * 72 + 1), torch.float32, has_residual=False, seed=5)[0][0]
    layernorm.PLANS.clear()
    check_shift(x, weight, bias, sums[:72])
    check_shift(x, weight, bias, sums[1:73])  # same shape and stride, base pointer 4 bytes past 16-byte alignment
    assert layernorm.PLANS.builds == 2


def test_shift_rejects_bad_arguments() -> None:
    x, weight, bias, residual = make_inputs((4, 32), torch.float32)
    with pytest.raises(ValueError, match="a residual or a shift, not both"):
        layer_norm(x, weight, bias, EPS, residual, shift=bias)
    with pytest.raises(ValueError, match="shift is"):
        layer_norm(x, weight, bias, EPS, shift=bias[:16])
    with pytest.raises(ValueError, match="shift is"):
        layer_norm_triton(x, weight, bias, EPS, shift=torch.ones(32, dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_function_3d(dtype: torch.dtype) -> None:
    x, weight, bias, residual = make_inputs((3, 5, 72), dtype)
    out, residual_out = layer_norm(x, weight, bias, EPS, residual)
    ref_out, ref_residual_out = layer_norm_reference(x, weight, bias, EPS, residual)
    assert out.shape == residual_out.shape == x.shape
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(residual_out, ref_residual_out, rtol=0, atol=0)


def test_residual_out_is_x_without_residual() -> None:
    x, weight, bias, _ = make_inputs((2, 7, 32), torch.float32, has_residual=False)
    out, residual_out = layer_norm(x, weight, bias, EPS)
    assert residual_out is x
    torch.testing.assert_close(out, layer_norm_reference(x, weight, bias, EPS)[0], rtol=1e-4, atol=1e-5)


def test_non_contiguous_inputs() -> None:
    x, _, _, residual = make_inputs((9, 2 * 72), torch.float32)
    _, weight, bias, _ = make_inputs((1, 72), torch.float32)
    x_strided_rows, residual_strided_rows = x[:, :72], residual[:, 72:]  # row stride 144, read in place
    check_launcher(x_strided_rows, weight, bias, residual_strided_rows)
    x_transposed, _, _, residual_transposed = make_inputs((72, 9), torch.float32, seed=1)  # copied once
    check_launcher(x_transposed.t(), weight, bias, residual_transposed.t())
    out, residual_out = layer_norm(x_transposed.t(), weight, None, EPS, residual_transposed.t())
    assert out.is_contiguous() and residual_out.is_contiguous()


@pytest.mark.parametrize("shape", [(0, 768), (2, 0, 64)])
def test_zero_rows(shape: tuple[int, ...]) -> None:
    x, weight, bias, residual = make_inputs(shape, torch.float32)
    out, residual_out = layer_norm(x, weight, bias, EPS, residual)
    assert out.shape == residual_out.shape == x.shape
    assert layer_norm(x, weight, bias, EPS)[1] is x


@pytest.mark.parametrize("block_m, num_warps", [(1, 1), (4, 2), (16, 8)])
def test_config_overrides(block_m: int, num_warps: int) -> None:
    """The benchmark sweep overrides the tile; any override stays correct, tails of row tiles included."""
    x, weight, bias, residual = make_inputs((7, 72), torch.float32)
    out, residual_out = layer_norm_triton(x, weight, bias, EPS, residual, block_m=block_m, num_warps=num_warps)
    ref_out, ref_residual_out = layer_norm_reference(x, weight, bias, EPS, residual)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(residual_out, ref_residual_out, rtol=0, atol=0)


@pytest.mark.parametrize("n_cols", [1, 32, 72, 768, 1152, 1664, 8192, MAX_FUSED_N])
@pytest.mark.parametrize("element_size", [2, 4])
def test_config(n_cols: int, element_size: int) -> None:
    block_m, block_n, num_warps = layer_norm_config(n_cols, element_size)
    assert block_n >= n_cols and block_n & (block_n - 1) == 0
    assert block_m >= 1 and block_m & (block_m - 1) == 0
    assert num_warps in (1, 2, 4, 8, 16)


def test_wide_rows_run_eager() -> None:
    x, weight, bias, residual = make_inputs((1, MAX_FUSED_N + 1), torch.float32)
    out, residual_out = layer_norm(x, weight, bias, EPS, residual)
    ref_out, ref_residual_out = layer_norm_reference(x, weight, bias, EPS, residual)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(residual_out, ref_residual_out, rtol=0, atol=0)


def test_rejects_mismatched_shapes() -> None:
    x, weight, bias, residual = make_inputs((4, 32), torch.float32)
    with pytest.raises(ValueError, match="weight has shape"):
        layer_norm(x, weight[:16], bias, EPS, residual)
    with pytest.raises(ValueError, match="residual is"):
        layer_norm(x, weight, bias, EPS, residual.half())


@pytest.mark.parametrize("op", ["layer_norm", "layer_norm_shift", "add_layer_norm"])
def test_opcheck(op: str) -> None:
    x, weight, bias, residual = make_inputs((5, 40), torch.float32)
    args = {
        "layer_norm": (x, weight, bias, EPS, None),
        "layer_norm_shift": (x, weight, bias, EPS, residual[0]),
        "add_layer_norm": (x, residual, weight, bias, EPS),
    }[op]
    torch.library.opcheck(getattr(torch.ops.vitriton, op.removesuffix("_shift")), args)


def _compile_and_compare(backend: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    def block(x, residual, weight, bias):
        out, residual_out = layer_norm(x, weight, bias, EPS, residual)
        normed, same = layer_norm(residual_out, weight, None, EPS)
        shifted, _ = layer_norm(residual_out, weight, bias, EPS, shift=bias.float())
        return out, residual_out, normed, same, shifted

    x, weight, bias, residual = make_inputs(shape, dtype)
    compiled = torch.compile(block, backend=backend, fullgraph=True, dynamic=False)
    rtol, atol = TOLERANCES[dtype]
    for got, want in zip(compiled(x, residual, weight, bias), block(x, residual, weight, bias), strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_torch_compile_traces() -> None:
    _compile_and_compare("aot_eager", (2, 5, 72), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_compile_inductor(dtype: torch.dtype) -> None:
    _compile_and_compare("inductor", (8, 577, 1024), dtype)


@pytest.mark.gpu
def test_cuda_graph_replay() -> None:
    x, weight, bias, residual = make_inputs((4 * 197, 768), torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernel outside the capture
        layer_norm(x, weight, bias, EPS, residual)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, residual_out = layer_norm(x, weight, bias, EPS, residual)

    fresh_x, _, _, fresh_residual = make_inputs(x.shape, x.dtype, seed=1)
    x.copy_(fresh_x)
    residual.copy_(fresh_residual)
    graph.replay()
    ref_out, ref_residual_out = layer_norm_reference(x, weight, bias, EPS, residual)
    rtol, atol = TOLERANCES[x.dtype]
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(residual_out, ref_residual_out, rtol=0, atol=0)
