"""CUDA-graph runner: bucket choice, padding and output slicing on the CPU; capture and replay on a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vitriton.graphs import (
    DEFAULT_BATCH_SIZES,
    CUDAGraphRunner,
    bucket_for,
    normalize_batch_sizes,
    pad_rows,
    take_rows,
)


@pytest.mark.parametrize(
    ("batch", "bucket"),
    [(1, 1), (2, 2), (3, 4), (7, 8), (8, 8), (9, 16), (100, 128), (128, 128), (129, None), (1000, None)],
)
def test_bucket_for_picks_the_smallest_bucket_that_holds_the_batch(batch, bucket):
    assert bucket_for(batch, DEFAULT_BATCH_SIZES) == bucket


def test_bucket_for_with_uneven_buckets():
    sizes = normalize_batch_sizes([48, 1, 6])
    assert sizes == (1, 6, 48)
    assert [bucket_for(b, sizes) for b in (1, 2, 6, 7, 48, 49)] == [1, 6, 6, 48, 48, None]


@pytest.mark.parametrize("sizes", [[], [0, 4], [-1], [2.0], [True, 4]])
def test_normalize_batch_sizes_rejects_bad_buckets(sizes):
    with pytest.raises(ValueError, match="batch_sizes"):
        normalize_batch_sizes(sizes)


def test_normalize_batch_sizes_sorts_and_deduplicates():
    assert normalize_batch_sizes([32, 1, 8, 8, 1]) == (1, 8, 32)


def test_pad_rows_repeats_the_last_real_row():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 2)
    padded = pad_rows(x, 8)
    assert padded.shape == (8, 5, 2)
    torch.testing.assert_close(padded[:3], x, rtol=0, atol=0)
    torch.testing.assert_close(padded[3:], x[2:].expand(5, 5, 2), rtol=0, atol=0)
    assert padded.data_ptr() != x.data_ptr()


def test_pad_rows_keeps_integer_dtype_and_can_truncate():
    ids = torch.arange(12).view(4, 3)
    assert pad_rows(ids, 2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert pad_rows(ids, 4).dtype == torch.int64
    assert pad_rows(ids, 4).tolist() == ids.tolist()


def test_take_rows_cuts_batch_first_tensors_and_keeps_the_output_type():
    torch.manual_seed(0)
    bucket, rows = 8, 3
    static = BaseModelOutputWithPooling(
        last_hidden_state=torch.randn(bucket, 5, 4),
        pooler_output=torch.randn(bucket, 4),
        hidden_states=(torch.randn(bucket, 5, 4), torch.randn(bucket, 5, 4)),
    )
    out = take_rows(static, rows, bucket)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.last_hidden_state.shape == (rows, 5, 4)
    assert out.pooler_output.shape == (rows, 4)
    assert isinstance(out.hidden_states, tuple) and len(out.hidden_states) == 2
    assert out.attentions is None
    torch.testing.assert_close(out.hidden_states[1], static.hidden_states[1][:rows], rtol=0, atol=0)
    # Results must own their memory: the next replay rewrites the static outputs.
    static.last_hidden_state.fill_(float("nan"))
    assert torch.isfinite(out.last_hidden_state).all()


def test_take_rows_leaves_tensors_without_the_batch_dim_whole():
    out = take_rows({"logits": torch.ones(4, 2), "scale": torch.tensor(2.0), "table": torch.ones(7)}, 1, 4)
    assert out["logits"].shape == (1, 2)
    assert out["scale"].shape == ()
    assert out["table"].shape == (7,)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_runner_raises_a_clear_error_without_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CUDAGraphRunner(torch.nn.Linear(4, 4))


@pytest.mark.gpu
def test_runner_rejects_a_model_on_the_cpu():
    with pytest.raises(RuntimeError, match="parameters are on cpu"):
        CUDAGraphRunner(torch.nn.Linear(4, 4))


def _tiny_clip_vision(device: str, dtype: torch.dtype) -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        return CLIPVisionModel(config).to(dtype).eval()


def _vision_encoders():
    """The same tiny CLIP tower as transformers builds it and, once it lands, as vitriton does."""
    yield "transformers", lambda model: model
    try:
        from vitriton import from_transformers
    except ImportError:
        return
    yield "vitriton", from_transformers


@pytest.mark.gpu
@pytest.mark.parametrize("name", [name for name, _ in _vision_encoders()])
def test_runner_matches_the_model_for_every_batch_size(name):
    convert = dict(_vision_encoders())[name]
    model = convert(_tiny_clip_vision("cuda", torch.float16))
    runner = CUDAGraphRunner(model, batch_sizes=(1, 4, 8))
    torch.manual_seed(1)
    for batch in (1, 3, 4, 8, 2, 11):
        pixels = torch.randn(batch, 3, 32, 32, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            expected = model(pixels)
        out = runner(pixels)
        assert out.pooler_output.shape == (batch, 64)
        torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-2, atol=2e-3)
        torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=1e-2, atol=2e-3)
    # 3 went to bucket 4 and 2 to bucket 4 as well; 11 exceeds the largest bucket and ran eagerly.
    assert sorted(key[0] for key in runner.captured) == [1, 4, 8]


@pytest.mark.gpu
def test_runner_outputs_follow_new_inputs_and_do_not_alias():
    model = _tiny_clip_vision("cuda", torch.float32)
    runner = CUDAGraphRunner(model, batch_sizes=(2,))
    first_pixels = torch.randn(2, 3, 32, 32, device="cuda")
    second_pixels = torch.randn(2, 3, 32, 32, device="cuda")
    first = runner(first_pixels)
    kept = first.pooler_output.clone()
    second = runner(second_pixels)
    torch.testing.assert_close(first.pooler_output, kept, rtol=0, atol=0)
    with torch.inference_mode():
        expected = model(second_pixels).pooler_output
    torch.testing.assert_close(second.pooler_output, expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(first.pooler_output, second.pooler_output)


@pytest.mark.gpu
def test_runner_captures_each_option_separately_and_ahead_of_time():
    model = _tiny_clip_vision("cuda", torch.float32)
    runner = CUDAGraphRunner(model, batch_sizes=(1, 2))
    pixels = torch.randn(1, 3, 32, 32, device="cuda")
    runner.capture(pixels)
    assert sorted(key[0] for key in runner.captured) == [1, 2]
    out = runner(pixels, output_hidden_states=True)
    assert len(runner.captured) == 3
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (1, 17, 64)


@pytest.mark.gpu
def test_runner_pads_token_ids_for_the_text_tower():
    config = CLIPTextConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        vocab_size=1000,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=1,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CLIPTextModel(config).eval()
    ids = torch.randint(0, 998, (3, 16), device="cuda")
    ids[:, -1] = 999
    runner = CUDAGraphRunner(model, batch_sizes=(4,))
    with torch.inference_mode():
        expected = model(ids)
    torch.testing.assert_close(runner(ids).pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-4)
