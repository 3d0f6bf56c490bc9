"""Flash attention kernel against its eager reference.

CPU cases run the Triton kernel through the interpreter at small shapes (sequence lengths that leave ragged
query and key tiles, head dims 32 to 104), with causal and key-padding masks, strided views and forced tile
configurations; GPU cases run the models' full shapes in fp32, fp16 and bf16, a grid of more than 65535
heads, 64-bit offsets, torch.compile and CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import DEVICE, DTYPES, TOLERANCES, assert_lowp_bound, poisoned, triton_calls
from vitriton.kernels.attention import (
    AttentionConfig,
    attention,
    attention_reference,
    attention_triton,
    head_dim_chunks,
)

# Slack for the low-precision bound at |out| < 1: one rounding of the stored output (bf16 half-ulp at 1 is
# 2e-3) on top of twice the error of eager SDPA in the same dtype.
LOWP_ATOL = {torch.float16: 1e-3, torch.bfloat16: 4e-3}


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


def make_qkv(batch, heads, seq, head_dim, dtype, *, device=DEVICE, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    return tuple(
        torch.randn(batch, heads, seq, head_dim, generator=generator, device=device, dtype=dtype) for _ in range(3)
    )


def left_padding_mask(batch, seq, *, device=DEVICE):
    """Batch 0 attends everywhere, batch 1 has 3 padded keys on the left, batch 2 (if any) has no key at all."""
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    if batch > 1:
        mask[1, : min(3, seq - 1)] = False
    if batch > 2:
        mask[2] = False
    return mask


def eager_lowp(q, k, v, *, scale=None, causal=False, key_padding_mask=None):
    """Eager SDPA in the inputs' own dtype, rows without keys zeroed, laid out as (B, S, H * D)."""
    batch, heads, seq, head_dim = q.shape
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril() if causal else None
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    if allowed is not None:
        out = out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def assert_matches_reference(out, q, k, v, **kwargs):
    if q.dtype == torch.float32 or not torch.cuda.is_available():
        rtol, atol = TOLERANCES[q.dtype]
        torch.testing.assert_close(out, attention_reference(q, k, v, **kwargs), rtol=rtol, atol=atol)
        return
    ref_fp32 = attention_reference(q.float(), k.float(), v.float(), **kwargs)
    assert_lowp_bound(out, ref_fp32, eager_lowp(q, k, v, **kwargs), atol=LOWP_ATOL[q.dtype])


def run_poisoned(q, k, v, **kwargs):
    batch, heads, seq, head_dim = q.shape
    out = poisoned((batch, seq, heads * head_dim), q.dtype)
    result = attention_triton(q, k, v, out=out, **kwargs)
    assert result.data_ptr() == out.data_ptr()
    return result


# (batch, heads, seq, head_dim, scale): with the interpreter's 32 x 32 tiles, seq 1, 7 and 20 fit one narrow
# tail tile, 33, 77 and 129 leave a 1- to 13-row tail tile and a ragged key block, 50 a row-masked full tile.
CPU_CASES = [
    (1, 2, 1, 32, None),
    (2, 2, 7, 64, None),
    (1, 2, 33, 72, None),
    (1, 2, 50, 80, 0.3),
    (1, 2, 77, 104, None),
    (2, 1, 20, 48, None),
    (1, 1, 129, 128, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, heads, seq, head_dim, scale", CPU_CASES)
def test_attention_small(batch, heads, seq, head_dim, scale, dtype):
    q, k, v = make_qkv(batch, heads, seq, head_dim, dtype)
    out = run_poisoned(q, k, v, scale=scale)
    assert_matches_reference(out, q, k, v, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal, padded", [(True, False), (False, True), (True, True)], ids=["causal", "pad", "both"])
@pytest.mark.parametrize("seq, head_dim", [(33, 72), (50, 64)])
def test_attention_masks(seq, head_dim, causal, padded, dtype):
    """Causal and key-padding masks; batch 2 has no key at all and, with causal, batch 1's first rows neither."""
    q, k, v = make_qkv(3, 2, seq, head_dim, dtype, seed=1)
    mask = left_padding_mask(3, seq) if padded else None
    out = run_poisoned(q, k, v, causal=causal, key_padding_mask=mask)
    assert_matches_reference(out, q, k, v, causal=causal, key_padding_mask=mask)
    if padded:
        assert (out[2] == 0).all(), "a row with no key to attend to must be zeros"
        if causal:
            assert (out[1, :3] == 0).all(), "causal rows before the first unpadded key must be zeros"


def test_attention_strided_views():
    """q, k, v as head-split views of one packed (B, S, 3, H, D) buffer, and a k whose head dim is strided."""
    batch, seq, heads, head_dim = 2, 33, 3, 72
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    packed = torch.randn(batch, seq, 3, heads, head_dim, generator=generator, device=DEVICE)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = run_poisoned(q, k, v)
    assert_matches_reference(out, q, k, v)

    k_t = torch.randn(batch, heads, head_dim, seq, generator=generator, device=DEVICE).transpose(-1, -2)
    assert k_t.stride(-1) != 1
    mask = left_padding_mask(batch, seq)
    out = run_poisoned(q, k_t, v, causal=True, key_padding_mask=mask)
    assert_matches_reference(out, q, k_t, v, causal=True, key_padding_mask=mask)


# Tile shapes the interpreter default does not take: narrower and wider query tiles than key tiles, the
# ragged last query tile split off (16, 32 and 64 rows wide) or row-masked, a key tile wider than the sequence.
CONFIG_CASES = [
    (AttentionConfig(16, 16, 4, 1), 33, False),
    (AttentionConfig(32, 16, 4, 1, split_tail=False), 33, True),
    (AttentionConfig(16, 64, 4, 1), 50, True),
    (AttentionConfig(64, 32, 4, 1), 77, False),
    (AttentionConfig(64, 32, 4, 1, split_tail=False), 77, True),
    (AttentionConfig(64, 32, 4, 1), 90, True),
    (AttentionConfig(128, 64, 4, 1), 50, False),
]


@pytest.mark.parametrize("config, seq, causal", CONFIG_CASES)
def test_attention_configs(config, seq, causal):
    q, k, v = make_qkv(2, 1, seq, 80, torch.float32, seed=3)
    mask = left_padding_mask(2, seq)
    out = run_poisoned(q, k, v, causal=causal, key_padding_mask=mask, config=config)
    assert_matches_reference(out, q, k, v, causal=causal, key_padding_mask=mask)


def test_attention_public_op():
    """The public function dispatches to the custom op; eager=True gives the reference; the op passes opcheck."""
    q, k, v = make_qkv(1, 2, 9, 40, torch.float32, seed=4)
    mask = left_padding_mask(1, 9)
    out = attention(q, k, v, causal=True, key_padding_mask=mask)
    assert out.shape == (1, 9, 80) and out.is_contiguous()
    assert_matches_reference(out, q, k, v, causal=True, key_padding_mask=mask)
    eager = attention(q, k, v, causal=True, key_padding_mask=mask, eager=True)
    torch.testing.assert_close(eager, attention_reference(q, k, v, causal=True, key_padding_mask=mask))
    torch.library.opcheck(torch.ops.vitriton.attention.default, (q, k, v, mask, None, True))


def test_attention_compile_traces():
    """torch.compile(fullgraph=True) traces a function calling the op (aot_eager: no C++ toolchain needed)."""
    q, k, v = make_qkv(1, 2, 9, 72, torch.float32, seed=5)

    def scaled(q, k, v):
        return attention(q, k, v) * 2

    compiled = torch.compile(scaled, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), 2 * attention_reference(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 2, 7, 64), (2, 2, 0, 64), (1, 0, 7, 64)])
def test_attention_empty(shape):
    q, k, v = (torch.randn(shape, device=DEVICE) for _ in range(3))
    out = attention_triton(q, k, v)
    assert out.shape == (shape[0], shape[2], shape[1] * shape[3])


def test_attention_rejects_bad_arguments():
    q, k, v = make_qkv(1, 1, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="dtypes"):
        attention_triton(q, k.half(), v)
    with pytest.raises(ValueError, match="scale"):
        attention_triton(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="head_dim"):
        wide = torch.randn(1, 1, 4, 264, device=DEVICE)
        attention_triton(wide, wide, wide)
    with pytest.raises(ValueError, match="out is"):
        attention_triton(q, k, v, out=torch.empty(1, 4, 33, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, key_padding_mask=torch.ones(1, 5, dtype=torch.bool, device=DEVICE))


def test_attention_beyond_the_kernel_head_dim_runs_the_reference():
    """A config with head_dim 264 works as in transformers (eager reference); the kernel itself refuses it."""
    q, k, v = (torch.randn(1, 2, 5, 264, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in range(3))
    before = triton_calls()["attention"]
    out = attention(q, k, v)
    assert triton_calls()["attention"] == before
    ref = attention_reference(q, k, v)
    assert torch.equal(out, ref)


def test_head_dim_chunks():
    assert head_dim_chunks(64) == (64, 0, 0)
    assert head_dim_chunks(72) == (64, 16, 0)
    assert head_dim_chunks(80) == (64, 16, 0)
    assert head_dim_chunks(104) == (64, 32, 16)
    assert head_dim_chunks(128) == (128, 0, 0)
    for head_dim in range(1, 257):
        chunks = [c for c in head_dim_chunks(head_dim) if c]
        assert all(c >= 16 and c & (c - 1) == 0 for c in chunks), (head_dim, chunks)
        assert 0 <= sum(chunks) - head_dim < 32, (head_dim, chunks)


# ---- GPU: the models' shapes ----------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 72, 80, 104])
@pytest.mark.parametrize("seq", [197, 577, 729, 1023])
def test_attention_full_size(seq, head_dim, dtype):
    q, k, v = make_qkv(4, 4, seq, head_dim, dtype)
    out = run_poisoned(q, k, v)
    assert_matches_reference(out, q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("batch, heads, seq, head_dim", [(16, 8, 77, 64), (8, 12, 77, 64), (4, 16, 64, 72)])
def test_attention_text_masks_full_size(batch, heads, seq, head_dim, dtype):
    """CLIP / SigLIP text towers: causal with key padding, including rows with no key at all."""
    q, k, v = make_qkv(batch, heads, seq, head_dim, dtype, seed=6)
    generator = torch.Generator(device=DEVICE).manual_seed(6)
    lengths = torch.randint(1, seq + 1, (batch,), generator=generator, device=DEVICE)
    mask = torch.arange(seq, device=DEVICE)[None, :] >= seq - lengths[:, None]  # left padding
    mask[0] = False
    out = run_poisoned(q, k, v, causal=True, key_padding_mask=mask)
    assert_matches_reference(out, q, k, v, causal=True, key_padding_mask=mask)
    assert (out[0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("batch, seq, head_dim", [(1, 577, 64), (1, 729, 72), (1, 257, 80), (2, 50, 64)])
def test_attention_small_batch(batch, seq, head_dim, dtype):
    """Batch-1 latency shapes take the 64-row tile configuration; the public op dispatches to Triton."""
    q, k, v = make_qkv(batch, 16, seq, head_dim, dtype, seed=7)
    assert_matches_reference(attention(q, k, v), q, k, v)


@pytest.mark.gpu
def test_attention_many_heads():
    """batch * heads = 65538 programs' worth of heads on grid axis 0, beyond the 65535 limit of axes 1 and 2."""
    q, k, v = make_qkv(2, 32769, 16, 64, torch.bfloat16, seed=8)
    out = run_poisoned(q, k, v)
    assert_matches_reference(out, q, k, v)


@pytest.mark.gpu
@pytest.mark.slow
def test_attention_64bit_offsets():
    """q, k, v and out each hold more than 2^31 elements (4.3 GB in bf16), so batch offsets need 64 bits."""
    batch, heads, seq, head_dim = 4100, 64, 128, 64
    assert batch * heads * seq * head_dim > 2**31
    q, k, v = make_qkv(batch, heads, seq, head_dim, torch.bfloat16, seed=9)
    out = attention_triton(q, k, v)
    for rows in (slice(0, 2), slice(batch - 2, batch)):
        assert_matches_reference(out[rows], q[rows], k[rows], v[rows])


@pytest.mark.gpu
def test_attention_torch_compile():
    q, k, v = make_qkv(2, 16, 257, 80, torch.bfloat16, seed=10)
    mask = left_padding_mask(2, 257)

    def block(q, k, v, mask):
        return attention(q, k, v, causal=True, key_padding_mask=mask) + 1

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), block(q, k, v, mask))


@pytest.mark.gpu
def test_attention_cuda_graph():
    q, k, v = make_qkv(2, 16, 729, 72, torch.bfloat16, seed=11)
    attention(q, k, v)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, k, v)
    fresh = make_qkv(2, 16, 729, 72, torch.bfloat16, seed=12)
    for static, new in zip((q, k, v), fresh, strict=True):
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(out, *fresh)
