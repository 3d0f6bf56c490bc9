"""Fused linear (bias + activation) against its eager reference.

CPU cases run the Triton kernel through the interpreter at small odd shapes; GPU cases run the models' full
GEMM shapes in fp32, fp16 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DEVICE, DTYPES, TOLERANCES, assert_lowp_bound, poisoned
from vitriton.kernels import _launch
from vitriton.kernels import linear as linear_module
from vitriton.kernels._matmul import TMA_MIN_ROWS, matmul_operands
from vitriton.kernels.linear import ACTIVATIONS, PLANS, linear, linear_reference, linear_triton

# fp32 at the full GPU shapes: K up to 4304 products summed in a different order than cuBLAS; the rounding
# differences reach ~sqrt(K) ulp of the partial sums, above TOLERANCES' atol of 1e-5 for O(1) outputs.
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


def make_inputs(
    lead: tuple[int, ...],
    k: int,
    n: int,
    dtype: torch.dtype,
    *,
    bias: bool,
    weight_std: float = 1.0,
    device: str = DEVICE,
    seed: int = 0,
):
    """x ~ N(0, 1) and W ~ N(0, weight_std^2 / K), so the pre-activations have standard deviation ~weight_std."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * std).to(dtype)

    x = randn(*lead, k)
    w = randn(n, k, std=weight_std / k**0.5)
    b = randn(n, std=0.5) if bias else None
    return x, w, b


def assert_matches_reference(out, x, w, b, activation, *, fp32_tolerance=None):
    dtype = x.dtype
    if dtype == torch.float32:
        rtol, atol = fp32_tolerance or TOLERANCES[torch.float32]
        expected = linear_reference(x, w, b, activation)
        torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
        return
    x32, w32, b32 = (t.float() if t is not None else None for t in (x, w, b))
    ref_fp32 = linear_reference(x32, w32, b32, activation)
    eager_lowp = linear_reference(x, w, b, activation)
    assert_lowp_bound(out, ref_fp32, eager_lowp, atol=TOLERANCES[dtype][1])


# (leading dims, K, N, activation, bias): M in {1, 7, 50}, K and N off the 32-wide interpreter tiles.
CPU_CASES = [
    ((1,), 64, 72, None, True),
    ((7,), 100, 100, "quick_gelu", True),
    ((2, 25), 72, 100, "gelu", False),
    ((50,), 72, 72, "gelu_pytorch_tanh", True),
    ((2, 25), 100, 64, None, False),
    ((1, 7), 40, 130, "quick_gelu", True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, k, n, activation, bias", CPU_CASES)
def test_linear_small(lead, k, n, activation, bias, dtype):
    x, w, b = make_inputs(lead, k, n, dtype, bias=bias)
    out = linear_triton(x, w, b, activation, out=poisoned((*lead, n), dtype))
    assert out.shape == (*lead, n)
    assert_matches_reference(out, x, w, b, activation)


# exp(-x) overflows to inf far in the negative tail; the interpreter's numpy warns, the result is the exact 0.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_activations_wide_range(activation, dtype):
    """Pre-activations with standard deviation 8 reach the saturated tails of every activation."""
    x, w, b = make_inputs((50,), 72, 100, dtype, bias=True, weight_std=8.0, seed=1)
    out = linear_triton(x, w, b, activation, out=poisoned((50, 100), dtype))
    assert_matches_reference(out, x, w, b, activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_strided_operands(dtype):
    """x transposed and sliced, weight sliced: strides go to the kernel; a non-flattenable x is copied once."""
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    x_t = torch.randn(2, 72, 25, generator=generator, device=DEVICE).to(dtype).transpose(1, 2)  # (2, 25, 72)
    w_wide = (torch.randn(100, 90, generator=generator, device=DEVICE) / 8.5).to(dtype)
    w = w_wide[:, 5:77]
    x_sliced = torch.randn(50, 80, generator=generator, device=DEVICE).to(dtype)[:, :72]
    assert not x_t.is_contiguous() and not w.is_contiguous()
    for x in (x_t, x_sliced, x_t):  # x_t again: the copy path replays the copy's plan
        out = linear_triton(x, w, None, "quick_gelu", out=poisoned((*x.shape[:-1], 100), dtype))
        assert_matches_reference(out, x, w, None, "quick_gelu")


# (leading dims, K, N, activation) with K * 2 bytes a multiple of 16, as TMA needs; K = 40 and 104
# leave a K tail past the 32-wide interpreter tile, which the descriptor zero-fills.
TMA_CPU_CASES = [
    ((1,), 64, 72, None),
    ((5,), 64, 32, "quick_gelu"),  # one tile: the persistent grid is cut to it (fewer programs than the stride)
    ((7,), 104, 100, "quick_gelu"),
    ((2, 25), 72, 100, "gelu_pytorch_tanh"),
    ((50,), 40, 130, "gelu"),
    ((3, 30), 40, 104, "quick_gelu"),
]


@pytest.mark.parametrize("persistent", [False, True], ids=["tiled", "persistent"])
@pytest.mark.parametrize("lead, k, n, activation", TMA_CPU_CASES)
def test_linear_tma_interpreted(lead, k, n, activation, persistent):
    """The TMA main loops through the interpreter's descriptor loads (fp16: TMA takes 16-bit operands only).
    The persistent kernel's 3 programs walk several tiles each and store them through a TMA descriptor."""
    if persistent and (n * 2) % 16:
        pytest.skip("the persistent kernel's TMA store needs 16-byte aligned output rows")
    x, w, b = make_inputs(lead, k, n, torch.float16, bias=True)
    for _ in range(2):  # the second call launches from the plan, with a descriptor copied from its template
        out = poisoned((*lead, n), torch.float16)
        linear_triton(x, w, b, activation, out=out, tma=True, persistent=persistent)
        assert_matches_reference(out, x, w, b, activation)


def last_plan_kernel() -> str:
    """The kernel of the plan ``linear`` built last: which kernel a forced call really ran."""
    return next(reversed(PLANS.plans.values()))[0].jit.__name__


# (leading dims, K, N, activation, bias): M off the 16-row interpreter tile and N off its 32 columns (rows stay
# 16-byte aligned in fp16, as the TMA store needs), K = 40 and 104 off its 32-wide K step; each activation
# with and without bias.
WS_CPU_CASES = [
    ((7,), 104, 72, "quick_gelu", True),
    ((1,), 64, 40, "quick_gelu", False),
    ((2, 25), 72, 104, "gelu_pytorch_tanh", False),
    ((50,), 40, 72, "gelu_pytorch_tanh", True),
    ((3, 30), 40, 136, "gelu", True),
    ((33,), 64, 40, "gelu", False),
    ((50,), 72, 104, None, True),
    ((2, 9), 104, 72, None, False),
]


@pytest.mark.parametrize("lead, k, n, activation, bias", WS_CPU_CASES)
def test_linear_warp_specialized_interpreted(lead, k, n, activation, bias):
    """The warp-specialised kernel forced, its descriptors built in the kernel (fp16: TMA takes 16-bit operands
    only); 3 programs walk several tiles each, and the second call launches from the plan."""
    x, w, b = make_inputs(lead, k, n, torch.float16, bias=bias)
    for _ in range(2):
        out = poisoned((*lead, n), torch.float16)
        linear_triton(x, w, b, activation, out=out, warp_specialize=True)
        assert_matches_reference(out, x, w, b, activation)
    assert last_plan_kernel() == "_linear_ws_kernel"


def test_linear_warp_specialized_strided_operands():
    """x and the weight as column slices of wider rows: the kernel's descriptors take their row strides."""
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    x = torch.randn(50, 80, generator=generator, device=DEVICE).half()[:, :72]
    w = (torch.randn(104, 96, generator=generator, device=DEVICE) / 8.5).half()[:, 8:80]
    out = linear_triton(x, w, None, "quick_gelu", out=poisoned((50, 104), torch.float16), warp_specialize=True)
    assert last_plan_kernel() == "_linear_ws_kernel"
    assert_matches_reference(out, x, w, None, "quick_gelu")


def test_linear_warp_specialized_says_why_it_cannot_run():
    x, w, b = make_inputs((7,), 72, 104, torch.float16, bias=True)
    with pytest.raises(ValueError, match="warp_specialize=True needs 16-bit operands"):
        linear_triton(x.float(), w.float(), b.float(), "gelu", warp_specialize=True)
    with pytest.raises(ValueError, match="warp_specialize=True needs 16-bit operands"):
        linear_triton(x[:, 1:], w[:, 1:], b, "gelu", warp_specialize=True)  # 2 bytes past 16-byte alignment
    with pytest.raises(ValueError, match="warp_specialize=True needs 16-byte aligned output rows"):
        linear_triton(x, w[:100], b[:100], "gelu", warp_specialize=True)  # N = 100: 200-byte rows
    with pytest.raises(ValueError, match="warp_specialize=True runs the persistent TMA kernel"):
        linear_triton(x, w, b, "gelu", tma=False, warp_specialize=True)
    with pytest.raises(ValueError, match="warp_specialize=True runs the persistent TMA kernel"):
        linear_triton(x, w, b, "gelu", persistent=False, warp_specialize=True)


def test_linear_persistent_needs_aligned_rows():
    x, w, b = make_inputs((7,), 72, 100, torch.float16, bias=True)
    with pytest.raises(ValueError, match="persistent=True needs the TMA path and 16-byte aligned output rows"):
        linear_triton(x, w, b, "gelu", tma=True, persistent=True)


def test_linear_tma_selection():
    """TMA only where the operands allow it; tma=True says why it cannot run, tma=False always runs plain."""
    x, w, _ = make_inputs((7,), 72, 100, torch.float16, bias=False)
    tall, _, _ = make_inputs((TMA_MIN_ROWS,), 72, 100, torch.float16, bias=False)
    hopper = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    assert matmul_operands(tall, w, None)[2] == hopper
    assert matmul_operands(x, w, None)[2] is False  # few rows: plain loads, no per-launch descriptor encode
    assert matmul_operands(x, w, False)[2] is False
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        matmul_operands(x.float(), w.float(), True)
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        matmul_operands(x[:, 1:], w[:, 1:], True)  # base pointers 2 bytes past 16-byte alignment
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        matmul_operands(x.t().contiguous().t(), w, True)  # column stride 7
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        matmul_operands(x[:1].expand(7, 72), w, True)  # broadcast rows


def test_linear_public_dispatch():
    """The public op runs the Triton custom op here (interpreter or GPU) and the reference when eager."""
    x, w, b = make_inputs((2, 7), 40, 72, torch.float32, bias=True, seed=3)
    expected = linear_reference(x, w, b, "gelu")
    before = PLANS.builds + PLANS.hits
    torch.testing.assert_close(linear(x, w, b, "gelu"), expected, rtol=1e-4, atol=1e-5)
    assert PLANS.builds + PLANS.hits == before + 1
    torch.testing.assert_close(linear(x, w, b, "gelu", eager=True), expected, rtol=0, atol=0)
    assert PLANS.builds + PLANS.hits == before + 1


def test_linear_plan_is_built_once_and_reused(monkeypatch):
    """The second call of a signature neither re-validates the operands nor re-plans; a new M plans anew."""
    x, w, b = make_inputs((2, 7), 40, 72, torch.float32, bias=True, seed=6)
    PLANS.clear()
    first = linear_triton(x, w, b, "quick_gelu")
    assert (PLANS.builds, PLANS.hits) == (1, 0)

    def no_validation(*args):
        raise AssertionError("operands validated again on a plan hit")

    monkeypatch.setattr(linear_module, "check_operands", no_validation)
    monkeypatch.setattr(linear_module, "first_launch", no_validation)
    x.normal_()
    second = linear_triton(x, w, b, "quick_gelu")
    assert (PLANS.builds, PLANS.hits) == (1, 1)
    torch.testing.assert_close(second, linear_reference(x, w, b, "quick_gelu"), rtol=1e-4, atol=1e-5)
    assert not torch.equal(first, second)
    monkeypatch.undo()
    linear_triton(x[:1], w, b, "quick_gelu")
    assert (PLANS.builds, PLANS.hits) == (2, 1)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)])
def test_linear_empty(lead):
    x, w, b = make_inputs(lead, 40, 72, torch.float32, bias=True)
    out = linear_triton(x, w, b, "quick_gelu")
    assert out.shape == (*lead, 72)


def test_linear_rejects_bad_arguments():
    x, w, b = make_inputs((7,), 40, 72, torch.float32, bias=True)
    with pytest.raises(ValueError, match="activation 'relu'"):
        linear(x, w, b, "relu")
    with pytest.raises(ValueError, match="weight has shape"):
        linear_triton(x, w[:, :39], b)
    with pytest.raises(ValueError, match="bias is"):
        linear_triton(x, w, b[:71])
    with pytest.raises(ValueError, match="weight has dtype"):
        linear_triton(x, w.half(), b)


def test_linear_opcheck():
    """Schema, fake (meta) implementation and dispatch of the registered custom op."""
    x, w, b = make_inputs((1, 3), 40, 72, torch.float32, bias=True, seed=4)
    torch.library.opcheck(torch.ops.vitriton.linear.default, (x, w, b, "quick_gelu"))


def test_linear_compiles_fullgraph():
    """torch.compile traces the custom op in one graph (aot_eager here: no C compiler needed on CPU)."""
    x, w, b = make_inputs((2, 7), 40, 72, torch.float32, bias=True, seed=5)
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(lambda *args: linear(*args), fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(x, w, b, "gelu_pytorch_tanh"), linear_reference(x, w, b, "gelu_pytorch_tanh"))


# (M, K, N, activation): the models' GEMMs at batch 128 and batch 1.
GPU_CASES = [
    (128 * 577, 1024, 4096, "quick_gelu"),  # ViT-L/14-336 fc1
    (128 * 577, 4096, 1024, None),  # ViT-L/14-336 fc2
    (128 * 729, 1152, 4304, "gelu_pytorch_tanh"),  # so400m fc1: N = 4304 is not a multiple of 64
    (128 * 729, 4304, 1152, None),  # so400m fc2: K = 4304 is not a multiple of 64
    (128 * 197, 768, 3072, "quick_gelu"),  # ViT-B/16 fc1
    (128 * 257, 1280, 5120, "gelu"),  # ViT-H/14 fc1
    (577, 1024, 4096, "quick_gelu"),  # batch 1
    (729, 4304, 1152, None),
    (50, 768, 3072, "quick_gelu"),
    (1, 768, 768, "gelu"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, k, n, activation", GPU_CASES)
def test_linear_gpu(m, k, n, activation, dtype):
    x, w, b = make_inputs((m,), k, n, dtype, bias=True, device="cuda")
    out = linear_triton(x, w, b, activation, out=poisoned((m, n), dtype, device="cuda"))
    assert_matches_reference(out, x, w, b, activation, fp32_tolerance=GPU_FP32_TOLERANCE)
    out = linear_triton(x, w, b, activation, out=poisoned((m, n), dtype, device="cuda"))  # from the plan
    assert_matches_reference(out, x, w, b, activation, fp32_tolerance=GPU_FP32_TOLERANCE)


# (M, K, N, activation): odd M on both sides of SMALL_M, N = 4304 and K = 4304 off the 64-wide tiles.
TMA_GPU_CASES = [
    (577, 4304, 4304, "gelu_pytorch_tanh"),
    (1000, 1152, 4304, "quick_gelu"),
    (1000, 4304, 1152, None),
    (5001, 4304, 4304, "gelu"),
    (128 * 729, 1152, 4304, "gelu_pytorch_tanh"),
]


def needs_hopper() -> None:
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA path needs compute capability 9.0 or more")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["persistent", "tma", "plain"])
@pytest.mark.parametrize("m, k, n, activation", TMA_GPU_CASES)
def test_linear_gpu_tma(m, k, n, activation, path, dtype):
    """Every main loop, forced, at the shapes whose edges TMA zero-fills; the second call runs from the plan."""
    if path != "plain":
        needs_hopper()
    x, w, b = make_inputs((m,), k, n, dtype, bias=True, device="cuda")
    for _ in range(2):
        out = poisoned((m, n), dtype, device="cuda")
        linear_triton(x, w, b, activation, out=out, tma=path != "plain", persistent=path == "persistent")
        assert_matches_reference(out, x, w, b, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", [None, "quick_gelu", "gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("lead", [(1, 577), (4, 577)], ids=["small-M", "large-M"])
def test_linear_gpu_3d_public(lead, activation, dtype):
    """The public op on each path it picks per case (cuBLAS, cuBLASLt's GELU epilogue, Triton)."""
    x, w, b = make_inputs(lead, 1024, 4096, dtype, bias=True, device="cuda")
    assert_matches_reference(linear(x, w, b, activation), x, w, b, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu_pytorch_tanh", "gelu"])
@pytest.mark.parametrize(
    "dtype, tanh",
    [
        (torch.float16, "f32"),
        (torch.bfloat16, "f32"),
        (torch.bfloat16, "bf16x2"),
        (torch.bfloat16, "bf16x2_math"),
        (torch.float16, "sigmoid"),
    ],
)
@pytest.mark.parametrize("persistent", [False, True], ids=["tiled", "persistent"])
def test_linear_gpu_tanh_forms(activation, dtype, tanh, persistent, monkeypatch):
    """Each way of evaluating the sigmoid-shaped activations (``FAST_TANH``; the exact gelu in its tanh form under
    "bf16x2") within the low-precision bound, on pre-activations (standard deviation 8) that reach both saturated
    tails, on both GPU kernels."""
    needs_hopper()
    monkeypatch.setitem(linear_module.FAST_TANH, dtype, tanh)  # part of the plan's key
    x, w, b = make_inputs((3000,), 72, 1000, dtype, bias=True, weight_std=8.0, seed=1, device="cuda")
    out = linear_triton(x, w, b, activation, out=poisoned((3000, 1000), dtype, device="cuda"), persistent=persistent)
    assert_matches_reference(out, x, w, b, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [577, 5001])
def test_linear_gpu_persistent_at_every_m(rows):
    """On Hopper a 16-bit call takes the persistent TMA kernel at batch 1 as at large M, and its plan hands the C
    launch encoded descriptors (``_launch.Plan.expand``) wherever triton's launcher can be called directly."""
    needs_hopper()
    x, w, b = make_inputs((rows,), 1024, 4096, torch.bfloat16, bias=True, device="cuda")
    out = poisoned((rows, 4096), torch.bfloat16, device="cuda")
    PLANS.clear()
    for _ in range(3):  # planned, then twice from the plan (the second time with every descriptor encoded)
        out.fill_(float("nan"))
        linear_triton(x, w, b, "quick_gelu", out=out)
        assert_matches_reference(out, x, w, b, "quick_gelu")
    (entry,) = PLANS.plans.values()
    plan = entry[0]
    assert plan.jit is _launch._layers(linear_module._linear_persistent_kernel)[-1]
    if plan.launcher is not None:
        assert plan.descriptors is not None
        assert len(plan.encoded) == 3  # x, the weight and the output, each at one address


# (M, K, N, activation, dtype): three L/14-336 samples plus 5 rows, so400m's N = 4304 (not a multiple of 128), its
# K = 4304 (not a multiple of 64), B/16 at batch 128.
WS_GPU_CASES = [
    (577 * 3 + 5, 1024, 4096, "quick_gelu", torch.bfloat16),
    (577 * 3 + 5, 1024, 4096, None, torch.bfloat16),
    (577 * 3 + 5, 1024, 4096, "quick_gelu", torch.float16),
    (5001, 1152, 4304, "gelu_pytorch_tanh", torch.bfloat16),
    (1000, 4304, 1152, "gelu", torch.bfloat16),
    (128 * 197, 768, 3072, "quick_gelu", torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n, activation, dtype", WS_GPU_CASES)
def test_linear_gpu_warp_specialized(m, k, n, activation, dtype):
    """The warp-specialised kernel forced; the second call runs from the plan, its scratch allocated per launch."""
    needs_hopper()
    x, w, b = make_inputs((m,), k, n, dtype, bias=True, device="cuda")
    for _ in range(2):
        out = poisoned((m, n), dtype, device="cuda")
        linear_triton(x, w, b, activation, out=out, warp_specialize=True)
        assert_matches_reference(out, x, w, b, activation)
    assert last_plan_kernel() == "_linear_ws_kernel"


@pytest.mark.gpu
def test_linear_gpu_warp_specialized_graph_and_streams():
    """The per-launch scratch of the device-built descriptors comes from torch's allocator on the launch's stream:
    right on a side stream and replayed in a CUDA graph, with triton's allocator unset (torch.compile sets one in
    the threads it ran in, so the test unsets it)."""
    from triton.runtime import _allocation

    needs_hopper()
    token = _allocation._allocator.set(_allocation.NullAllocator())
    try:
        _check_warp_specialized_streams_and_graph()
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    finally:
        _allocation._allocator.reset(token)


def _check_warp_specialized_streams_and_graph() -> None:
    x, w, b = make_inputs((3, 577), 1024, 4096, torch.bfloat16, bias=True, device="cuda")

    def run() -> torch.Tensor:
        return linear_triton(x, w, b, "quick_gelu", warp_specialize=True)

    expected = run()  # tunes and compiles before capture
    plan = next(reversed(PLANS.plans.values()))[0]
    assert plan.jit.__name__ == "_linear_ws_kernel" and plan.scratch_bytes > 0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = run()
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(on_side, expected, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    x.normal_()
    graph.replay()
    torch.testing.assert_close(captured, run(), rtol=0, atol=0)
    assert not torch.equal(captured, expected)


@pytest.mark.gpu
def test_linear_gpu_cuda_graph():
    x, w, b = make_inputs((4, 197), 768, 3072, torch.bfloat16, bias=True, device="cuda")
    expected = linear(x, w, b, "quick_gelu")  # tunes and compiles before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = linear(x, w, b, "quick_gelu")
    x.normal_()
    graph.replay()
    torch.testing.assert_close(captured, linear(x, w, b, "quick_gelu"), rtol=0, atol=0)
    assert not torch.equal(captured, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh"])
def test_linear_gpu_tanh_gelu_path(activation):
    """bf16 on Hopper: the tanh-form gelu (the exact gelu included, ``GELU_AS_TANH``) goes to cuBLASLt's GELU
    epilogue up to ``CUBLASLT_GELU_MAX_ROWS`` rows and to the Triton kernel above them, within the bound both
    ways."""
    needs_hopper()
    limit = linear_module.CUBLASLT_GELU_MAX_ROWS
    for rows in (257, limit + 1):
        x, w, b = make_inputs((rows,), 1280, 5120, torch.bfloat16, bias=True, device="cuda")
        out = linear(x, w, b, activation)
        cublaslt = torch._addmm_activation(b, x, w.t(), use_gelu=True)
        assert torch.equal(out, cublaslt) == (rows <= limit), rows
        assert torch.equal(out, linear_triton(x, w, b, activation)) == (rows > limit), rows
        assert_matches_reference(out, x, w, b, activation)


def test_tanh_form_follows_the_gpu():
    """Each form only where the GPU has its instruction: bf16x2 from sm_90, the f32 tanh from sm_75."""
    assert linear_module.tanh_form(torch.bfloat16, 90) == "bf16x2_math"
    assert linear_module.tanh_form(torch.bfloat16, 80) == "f32"
    assert linear_module.tanh_form(torch.float16, 90) == "f32"
    assert linear_module.tanh_form(torch.float16, 70) == "sigmoid"
    assert linear_module.tanh_form(torch.float32, 90) == "sigmoid"


def test_bf16_forms_only_for_bf16(monkeypatch):
    """A bf16 form set for another dtype (a benchmark's override) falls back to the f32 tanh: those forms round
    every step to bf16."""
    monkeypatch.setitem(linear_module.FAST_TANH, torch.float16, "bf16x2_math")
    assert linear_module.tanh_form(torch.float16, 90) == "f32"


def test_persistent_programs_do_not_follow_m():
    """The persistent kernel's PROGRAMS constexpr depends on the device and config alone (a value per M would
    compile the kernel again per batch size); the grid is cut to the tile count where that is smaller."""
    from vitriton.kernels._matmul import persistent_grid, persistent_programs

    x = torch.empty(1, 8)
    sizes = {"BLOCK_M": 16, "BLOCK_N": 32, "CTAS_PER_SM": 2}
    programs = {persistent_programs({"x": x, "M": m, "N": 64, **sizes}) for m in (1, 17, 5000)}
    assert programs == {3}  # the interpreter's stride
    assert persistent_grid({"M": 17, "N": 64, "PROGRAMS": 3, **sizes}) == (3,)
    assert persistent_grid({"M": 16, "N": 32, "PROGRAMS": 3, **sizes}) == (1,)


def test_tma_device_needs_hopper_shared_memory(monkeypatch):
    """TMA (and so the persistent kernel) only on compute capability 9+ with Hopper's shared memory a block: consumer
    Blackwell's 99 KiB would fail every persistent config."""
    from vitriton.kernels._matmul import tma_device

    class Properties:
        def __init__(self, major, shared):
            self.major, self.shared_memory_per_block_optin = major, shared

    cases = [(Properties(9, 232448), True), (Properties(12, 101376), False), (Properties(8, 232448), False)]
    try:
        for properties, expected in cases:
            _launch._cuda_properties.cache_clear()
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index, p=properties: p)
            assert tma_device(torch.device("cuda", 0)) is expected
    finally:
        _launch._cuda_properties.cache_clear()
