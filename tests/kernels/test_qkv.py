"""QKV projection (one GEMM, head-split epilogue) against its eager reference.

CPU cases run the Triton kernel through the interpreter with head dims 64, 72, 80 and 104 at small shapes;
GPU cases run the models' full shapes in fp32, fp16 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DEVICE, DTYPES, TOLERANCES, assert_lowp_bound, poisoned
from vitriton.kernels.qkv import PLANS, qkv_projection, qkv_projection_reference, qkv_projection_triton

# fp32 at the full GPU shapes: K up to 1664 products summed in a different order than cuBLAS (see test_linear).
GPU_FP32_TOLERANCE = (1e-4, 1e-4)


@pytest.fixture(autouse=True)
def exact_fp32_reference():
    """The fp32 reference must not run on TF32 tensor cores."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def make_inputs(batch, seq, hidden, heads, head_dim, dtype, *, bias=True, device=DEVICE, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    n = 3 * heads * head_dim
    x = torch.randn(batch, seq, hidden, generator=generator, device=device).to(dtype)
    w = (torch.randn(n, hidden, generator=generator, device=device) / hidden**0.5).to(dtype)
    b = (torch.randn(n, generator=generator, device=device) * 0.5).to(dtype) if bias else None
    return x, w, b


def assert_matches_reference(outs, x, w, b, heads, *, fp32_tolerance=None):
    dtype = x.dtype
    if dtype == torch.float32:
        rtol, atol = fp32_tolerance or TOLERANCES[torch.float32]
        for out, expected in zip(outs, qkv_projection_reference(x, w, b, heads), strict=True):
            torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
        return
    b32 = b.float() if b is not None else None
    refs_fp32 = qkv_projection_reference(x.float(), w.float(), b32, heads)
    eagers = qkv_projection_reference(x, w, b, heads)
    for out, ref_fp32, eager_lowp in zip(outs, refs_fp32, eagers, strict=True):
        assert_lowp_bound(out, ref_fp32, eager_lowp, atol=TOLERANCES[dtype][1])


# (batch, seq, hidden, heads, head_dim, bias): N = 3 * heads * head_dim never a multiple of the
# 32-wide interpreter tile's head alignment, so tiles straddle heads and q/k/v.
CPU_CASES = [
    (2, 7, 48, 3, 72, True),
    (1, 50, 64, 2, 80, False),
    (3, 5, 100, 1, 64, True),
    (1, 7, 40, 2, 104, True),
    (1, 1, 32, 1, 72, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, seq, hidden, heads, head_dim, bias", CPU_CASES)
def test_qkv_small(batch, seq, hidden, heads, head_dim, bias, dtype):
    x, w, b = make_inputs(batch, seq, hidden, heads, head_dim, dtype, bias=bias)
    packed = qkv_projection_triton(x, w, b, heads, out=poisoned((3, batch, heads, seq, head_dim), dtype))
    assert_matches_reference(packed.unbind(0), x, w, b, heads)


# (batch, seq, hidden, heads, head_dim): hidden * 2 bytes a multiple of 16, as TMA needs.
TMA_CPU_CASES = [
    (2, 7, 48, 3, 72),
    (1, 50, 64, 2, 80),
    (3, 5, 104, 1, 64),
    (1, 7, 40, 2, 104),
]


@pytest.mark.parametrize("batch, seq, hidden, heads, head_dim", TMA_CPU_CASES)
def test_qkv_tma_interpreted(batch, seq, hidden, heads, head_dim):
    """The TMA main loop through the interpreter's descriptor loads (fp16: TMA takes 16-bit operands only)."""
    x, w, b = make_inputs(batch, seq, hidden, heads, head_dim, torch.float16)
    for _ in range(2):  # the second call launches from the plan, with a descriptor copied from its template
        out = poisoned((3, batch, heads, seq, head_dim), torch.float16)
        packed = qkv_projection_triton(x, w, b, heads, out=out, tma=True)
        assert_matches_reference(packed.unbind(0), x, w, b, heads)


def test_qkv_public_layout():
    """Public op: three contiguous (B, H, S, D) tensors; the eager switch gives the reference."""
    x, w, b = make_inputs(2, 7, 48, 3, 72, torch.float32, seed=1)
    before = PLANS.builds + PLANS.hits
    q, k, v = qkv_projection(x, w, b, 3)
    assert PLANS.builds + PLANS.hits == before + 1
    for t in (q, k, v):
        assert t.shape == (2, 3, 7, 72) and t.is_contiguous()
    assert_matches_reference((q, k, v), x, w, b, 3)
    eager = qkv_projection(x, w, b, 3, eager=True)
    assert PLANS.builds + PLANS.hits == before + 1
    for out, expected in zip(eager, qkv_projection_reference(x, w, b, 3), strict=True):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_qkv_strided_x():
    """x sliced from a wider buffer keeps its row stride; the kernel reads it in place."""
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.randn(2, 7, 64, generator=generator, device=DEVICE)[..., 8:56]
    w = torch.randn(3 * 2 * 80, 48, generator=generator, device=DEVICE) / 7
    assert not x.is_contiguous()
    q, k, v = qkv_projection(x, w, None, 2)
    assert_matches_reference((q, k, v), x, w, None, 2)


@pytest.mark.parametrize("batch, seq", [(0, 7), (2, 0)])
def test_qkv_empty(batch, seq):
    x, w, b = make_inputs(batch, seq, 48, 3, 72, torch.float32)
    q, k, v = qkv_projection(x, w, b, 3)
    assert q.shape == k.shape == v.shape == (batch, 3, seq, 72)


def test_qkv_rejects_bad_arguments():
    x, w, b = make_inputs(2, 7, 48, 3, 72, torch.float32)
    with pytest.raises(ValueError, match="not divisible into 3 x 5 heads"):
        qkv_projection(x, w, b, 5)
    with pytest.raises(ValueError, match="expected \\(batch, seq, hidden\\)"):
        qkv_projection_triton(x[0], w, b, 3)
    with pytest.raises(ValueError, match="bias is"):
        qkv_projection_triton(x, w, b[:-1], 3)
    with pytest.raises(ValueError, match="out is"):
        qkv_projection_triton(x, w, b, 3, out=torch.empty(3, 2, 7, 3, 72))


def test_qkv_opcheck():
    x, w, b = make_inputs(1, 3, 32, 1, 72, torch.float32, seed=3)
    torch.library.opcheck(torch.ops.vitriton.qkv_projection.default, (x, w, b, 1))


def test_qkv_compiles_fullgraph():
    """torch.compile traces the custom op and the unbind in one graph (aot_eager here: no C compiler on CPU)."""
    x, w, b = make_inputs(1, 3, 32, 1, 72, torch.float32, seed=4)
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(lambda x, w, b: qkv_projection(x, w, b, 1), fullgraph=True, backend=backend)
    assert_matches_reference(compiled(x, w, b), x, w, b, 1)


# (batch, seq, hidden, heads, head_dim): the models at batch 128 and 1, and a tensor-parallel rank's slice.
GPU_CASES = [
    (128, 577, 1024, 16, 64),  # ViT-L/14-336
    (128, 729, 1152, 16, 72),  # so400m-384
    (128, 197, 768, 12, 64),  # ViT-B/16
    (64, 257, 1280, 16, 80),  # ViT-H/14
    (32, 257, 1664, 16, 104),  # ViT-bigG/14
    (128, 729, 1152, 8, 72),  # so400m, one rank of 2
    (1, 577, 1024, 16, 64),
    (1, 729, 1152, 16, 72),
    (1, 50, 768, 12, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, seq, hidden, heads, head_dim", GPU_CASES)
def test_qkv_gpu(batch, seq, hidden, heads, head_dim, dtype):
    x, w, b = make_inputs(batch, seq, hidden, heads, head_dim, dtype, device="cuda")
    for _ in range(2):  # the second call runs from the plan
        out = poisoned((3, batch, heads, seq, head_dim), dtype, device="cuda")
        packed = qkv_projection_triton(x, w, b, heads, out=out)
        assert_matches_reference(packed.unbind(0), x, w, b, heads, fp32_tolerance=GPU_FP32_TOLERANCE)


# (batch, seq, hidden, heads, head_dim): odd M on both sides of the small-M configs' bound, and N = 3 * H * D
# off the 128-wide tiles.
TMA_GPU_CASES = [
    (1, 577, 1024, 16, 64),
    (2, 729, 1152, 16, 72),
    (7, 577, 1024, 16, 64),
    (3, 257, 1664, 16, 104),
    (128, 729, 1152, 16, 72),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "plain"])
@pytest.mark.parametrize("batch, seq, hidden, heads, head_dim", TMA_GPU_CASES)
def test_qkv_gpu_tma(batch, seq, hidden, heads, head_dim, tma, dtype):
    """Both main loops, forced, with the head-split epilogue unchanged."""
    if tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA path needs compute capability 9.0 or more")
    x, w, b = make_inputs(batch, seq, hidden, heads, head_dim, dtype, device="cuda")
    for _ in range(2):
        out = poisoned((3, batch, heads, seq, head_dim), dtype, device="cuda")
        packed = qkv_projection_triton(x, w, b, heads, out=out, tma=tma)
        assert_matches_reference(packed.unbind(0), x, w, b, heads)


@pytest.mark.gpu
def test_qkv_gpu_cuda_graph():
    x, w, b = make_inputs(4, 577, 1024, 16, 64, torch.bfloat16, device="cuda")
    expected = qkv_projection(x, w, b, 16)  # tunes and compiles before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = qkv_projection(x, w, b, 16)
    x.normal_()
    graph.replay()
    for out, fresh, old in zip(captured, qkv_projection(x, w, b, 16), expected, strict=True):
        torch.testing.assert_close(out, fresh, rtol=0, atol=0)
        assert not torch.equal(out, old)
