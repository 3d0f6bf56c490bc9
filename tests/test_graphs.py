"""CUDA graphs: argument checks, bucket choice, padding, output slicing and the eager fallback on the CPU;
capture and replay, through ``CUDAGraphRunner`` and ``enable_cuda_graphs``, on a GPU."""

from __future__ import annotations

import copy
import functools
import gc
import inspect
import pickle
import random
import weakref
from collections import OrderedDict

import pytest
import torch
from transformers import CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vitriton
from tests.encoders import models
from vitriton import graphs
from vitriton.encoders.trunk import TextTransformer, Tower, VisionTransformer
from vitriton.graphs import (
    DEFAULT_BATCH_SIZES,
    AutoGraphs,
    CUDAGraphRunner,
    bucket_for,
    cuda_graph_buckets,
    cuda_graph_runners,
    eager_reason,
    enable_cuda_graphs,
    normalize_batch_sizes,
    pad_rows,
    take_rows,
)
from vitriton.kernels import eager_mode


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


def test_take_rows_keeps_none_and_dicts_keyed_by_layer():
    static = BaseModelOutputWithPooling(last_hidden_state=torch.ones(4, 3, 2), pooler_output=None)
    out = take_rows(static, 2, 4)
    assert out.pooler_output is None and out.last_hidden_state.shape == (2, 3, 2)
    states = take_rows({0: torch.ones(4, 3), -1: None, "note": "kept"}, 2, 4)
    assert states[0].shape == (2, 3) and states[-1] is None and states["note"] == "kept"


def test_take_rows_outside_inference_mode_gives_ordinary_tensors():
    with torch.inference_mode():
        static = torch.ones(4, 3)
    out = take_rows(static, 2, 4)
    assert not out.is_inference()
    # A module that tracks grad (a LLaVA projector) may save it for backward.
    torch.nn.Linear(3, 2)(out).sum().backward()


@pytest.mark.parametrize(
    ("cuda_graphs", "buckets"),
    [
        (False, None),
        ("auto", None),
        (True, DEFAULT_BATCH_SIZES),
        ((8, 1, 8), (1, 8)),
        ([3], (3,)),
        (range(1, 3), (1, 2)),
    ],
)
def test_cuda_graph_buckets(cuda_graphs, buckets):
    assert cuda_graph_buckets(cuda_graphs) == buckets


@pytest.mark.parametrize(("cuda_graphs", "error"), [(8, TypeError), ("1,2", TypeError), (None, TypeError)])
def test_cuda_graph_buckets_rejects_what_is_not_a_bool_or_sizes(cuda_graphs, error):
    with pytest.raises(error, match="cuda_graphs=.*expected 'auto', True, False or a sequence of batch sizes"):
        cuda_graph_buckets(cuda_graphs)


@pytest.mark.parametrize("cuda_graphs", [(), (0, 4), [2.5], (True, 2)])
def test_cuda_graph_buckets_rejects_bad_sizes_by_name(cuda_graphs):
    with pytest.raises(ValueError, match="^cuda_graphs (holds|is empty)"):
        cuda_graph_buckets(cuda_graphs)


@pytest.fixture(scope="module")
def cpu_clip():
    return vitriton.from_transformers(models.clip_model(), device="cpu")


def test_enable_cuda_graphs_false_leaves_the_weights_and_forwards_alone(cpu_clip):
    before = {name: tensor.data_ptr() for name, tensor in cpu_clip.state_dict().items()}
    try:
        assert enable_cuda_graphs(cpu_clip, False) is cpu_clip
        assert cuda_graph_runners(cpu_clip) == []
        assert "forward" not in cpu_clip.vision_model.__dict__ and "forward" not in cpu_clip.text_model.__dict__
        assert {name: tensor.data_ptr() for name, tensor in cpu_clip.state_dict().items()} == before
    finally:
        enable_cuda_graphs(cpu_clip, "auto")


@pytest.mark.parametrize(("cuda_graphs", "shown"), [(True, "True"), ((1, 8), r"\(1, 8\)")])
def test_enable_cuda_graphs_on_a_cpu_model_says_where_it_is(cpu_clip, cuda_graphs, shown):
    with pytest.raises(RuntimeError, match=f"^cuda_graphs={shown} needs the model on a CUDA device; it is on cpu$"):
        enable_cuda_graphs(cpu_clip, cuda_graphs)
    assert cuda_graph_runners(cpu_clip) == []


def test_enable_cuda_graphs_checks_its_argument_before_the_device(cpu_clip):
    with pytest.raises(TypeError, match="cuda_graphs=4"):
        enable_cuda_graphs(cpu_clip, 4)


def test_enable_cuda_graphs_needs_parameters():
    with pytest.raises(ValueError, match="ReLU has no parameters"):
        enable_cuda_graphs(torch.nn.ReLU(), True)


CPU = torch.device("cpu")


def test_eager_reason_accepts_a_plain_batch():
    ids = torch.zeros(3, 5, dtype=torch.long)
    assert (
        eager_reason({"input_ids": ids, "attention_mask": torch.ones(3, 5), "output_hidden_states": True}, CPU) is None
    )
    assert eager_reason({"pixel_values": torch.ones(2, 3, 4, 4), "feature_layers": [-2, -1]}, CPU) is None


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"pixel_values": torch.ones(2, 3), "output_attentions": True}, "output_attentions=True"),
        ({"pixel_values": [torch.ones(2, 3)]}, "pixel_values holds tensors inside a container"),
        ({"input_ids": torch.ones(2, 3), "position_ids": torch.ones(1, 3)}, "disagree on the batch size"),
        ({"pixel_values": torch.tensor(1.0)}, "scalar tensor"),
        ({"pixel_values": torch.ones(0, 3)}, "empty"),
        ({"pixel_values": torch.ones(2, 3, device="meta")}, "pixel_values is on meta; the model is on cpu"),
        ({"output_hidden_states": True}, "no tensor argument"),
    ],
)
def test_eager_reason_names_what_a_graph_cannot_replay(arguments, reason):
    assert reason in eager_reason(arguments, CPU)


def test_eager_reason_runs_inputs_that_require_grad_eagerly_unless_grad_is_off():
    pixels = torch.ones(2, 3, requires_grad=True)
    assert "requires grad" in eager_reason({"pixel_values": pixels}, CPU)
    with torch.no_grad():
        assert eager_reason({"pixel_values": pixels}, CPU) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_runner_raises_a_clear_error_without_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CUDAGraphRunner(torch.nn.Linear(4, 4))


def _tiny_clip_vision(dtype: torch.dtype) -> CLIPVisionModel:
    """transformers' tiny CLIP vision tower on the GPU (the runner takes any batch-first module)."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(**models.CLIP_VISION, attn_implementation="sdpa")
    return CLIPVisionModel(config).to("cuda", dtype).eval()


def _vitriton_clip_vision(dtype: torch.dtype = torch.float32):
    return vitriton.from_transformers(_tiny_clip_vision(dtype), device="cuda")


def _pixels(batch: int, dtype: torch.dtype = torch.float32, size: int = 40, seed: int = 1) -> torch.Tensor:
    return models.pixels(batch, size, seed=seed).to("cuda", dtype)


def _text(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = models.text(batch, 11, seed=seed)
    return ids.cuda(), mask.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["transformers", "vitriton"])
def test_runner_matches_the_model_for_every_batch_size(name):
    model = _tiny_clip_vision(torch.float16)
    if name == "vitriton":
        model = vitriton.from_transformers(model, device="cuda")
    runner = CUDAGraphRunner(model, batch_sizes=(1, 4, 8))
    for batch in (1, 3, 4, 8, 2, 11):
        pixels = _pixels(batch, torch.float16, seed=batch)
        with torch.inference_mode():
            expected = model(pixels)
        out = runner(pixels)
        assert out.pooler_output.shape == (batch, 144)
        torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-2, atol=2e-3)
        torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=1e-2, atol=2e-3)
    # 3 went to bucket 4 and 2 to bucket 4 as well; 11 exceeds the largest bucket and ran eagerly.
    assert sorted(key[0] for key in runner.captured) == [1, 4, 8], runner.why_eager(_pixels(1, torch.float16))
    if name == "vitriton":  # the runner's warm-ups set off no automatic graph; batch 11 ran eagerly twice
        assert {key[0] for key in model.vision_model.auto_graphs.captured} <= {11}


@pytest.mark.gpu
def test_runner_outputs_follow_new_inputs_and_do_not_alias():
    model = _vitriton_clip_vision()
    runner = CUDAGraphRunner(model, batch_sizes=(2,))
    first_pixels, second_pixels = _pixels(2, seed=1), _pixels(2, seed=2)
    first = runner(first_pixels)
    kept = first.pooler_output.clone()
    second = runner(second_pixels)
    torch.testing.assert_close(first.pooler_output, kept, rtol=0, atol=0)
    with torch.inference_mode():
        expected = model(second_pixels).pooler_output
    torch.testing.assert_close(second.pooler_output, expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(first.pooler_output, second.pooler_output)
    assert len(runner.captured) == 1


@pytest.mark.gpu
def test_runner_captures_each_option_separately_and_ahead_of_time():
    model = _vitriton_clip_vision()
    runner = CUDAGraphRunner(model, batch_sizes=(1, 2))
    pixels = _pixels(1)
    runner.capture(pixels)
    assert sorted(key[0] for key in runner.captured) == [1, 2]
    out = runner(pixels, output_hidden_states=True)
    assert len(runner.captured) == 3
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (1, 26, 144)
    # The same call spelled by keyword, with a default written out, finds the same graph.
    runner(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=False)
    assert len(runner.captured) == 3


@pytest.mark.gpu
def test_runner_pads_token_ids_for_the_vitriton_text_tower():
    model = vitriton.from_transformers(models.clip_model().text_model, device="cuda")
    ids, mask = _text(3)
    runner = CUDAGraphRunner(model, batch_sizes=(4,))
    with torch.inference_mode():
        expected = model(ids, mask)
    out = runner(ids, mask)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-4)
    assert [key[0] for key in runner.captured] == [4]


def _build(family: str, kind: str, dtype: torch.dtype, cuda_graphs="auto"):
    hf = models.clip_model() if family == "clip" else models.siglip_model()
    return vitriton.from_transformers(
        hf, device="cuda", dtype=dtype, tower=None if kind == "full" else kind, cuda_graphs=cuda_graphs
    )


def _call(model, family: str, kind: str, batch: int, seed: int, dtype: torch.dtype):
    size = models.CLIP_VISION["image_size"] if family == "clip" else models.SIGLIP_VISION["image_size"]
    pixels = _pixels(batch, dtype, size=size, seed=seed)
    ids, mask = _text(batch, seed=seed)
    if family == "siglip":
        mask = None  # SigLIP is trained with max-length padding and pools the last position
    if kind == "vision":
        return {"image": model(pixels, output_hidden_states=True)}
    if kind == "text":
        return {"text": model(ids, mask, output_hidden_states=True)}
    out = model(ids, pixels, mask)
    return {
        "full": out,
        "image": model.get_image_features(pixels),
        "text": model.get_text_features(ids, mask),
    }


def _assert_same(graphed, plain, dtype: torch.dtype) -> None:
    """Equal within the dtype's rounding: the graph runs the same kernels, at a padded batch."""
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    for key, expected in plain.items():
        ours = graphed[key]
        if isinstance(expected, torch.Tensor):
            torch.testing.assert_close(ours, expected, rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
        elif isinstance(expected, tuple):
            assert len(ours) == len(expected), key
            for index, (a, b) in enumerate(zip(ours, expected, strict=True)):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, k=f"{key}[{index}]": f"{k}: {m}")
        elif expected is None:
            assert ours is None, key


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["vision", "text", "full"])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_cuda_graphs_match_the_plain_model(family, kind, dtype):
    plain = _build(family, kind, dtype, cuda_graphs=False)
    graphed = enable_cuda_graphs(_build(family, kind, dtype), (1, 4, 8))
    runners = cuda_graph_runners(graphed)
    assert len(runners) == (2 if kind == "full" else 1)
    for batch, seed in ((1, 1), (3, 2), (8, 3), (3, 4), (11, 5)):  # padded, exact, again, past the largest
        with torch.inference_mode():
            expected = _call(plain, family, kind, batch, seed, dtype)
            ours = _call(graphed, family, kind, batch, seed, dtype)
        for part in expected:
            _assert_same(ours[part], expected[part], dtype)
    # Every tower replayed graphs of buckets 1, 4 and 8; batch 11 ran eagerly.
    for runner in runners:
        assert {key[0] for key in runner.captured} == {1, 4, 8}


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_cuda_graphs_give_each_call_its_own_result(family):
    """Two different inputs in a row through the same graph: each result is its own input's, and the first is not
    overwritten by the second replay."""
    plain, graphed = (
        _build(family, "full", torch.float32, cuda_graphs=False),
        enable_cuda_graphs(_build(family, "full", torch.float32), True),
    )
    with torch.inference_mode():
        first = _call(graphed, family, "full", 2, 1, torch.float32)
        kept = first["text"].pooler_output.clone(), first["image"].pooler_output.clone()
        second = _call(graphed, family, "full", 2, 2, torch.float32)
        expected = _call(plain, family, "full", 2, 2, torch.float32)
    torch.testing.assert_close(first["text"].pooler_output, kept[0], rtol=0, atol=0)
    torch.testing.assert_close(first["image"].pooler_output, kept[1], rtol=0, atol=0)
    for part in ("text", "image"):
        _assert_same({"pooled": second[part].pooler_output}, {"pooled": expected[part].pooler_output}, torch.float32)
        assert not torch.equal(first[part].pooler_output, second[part].pooler_output)
    assert all(len(runner.captured) == 1 for runner in cuda_graph_runners(graphed))


@pytest.mark.gpu
def test_cuda_graphs_under_no_grad_inference_mode_and_grad():
    model = enable_cuda_graphs(_build("clip", "full", torch.float32), (2,))
    pixels = _pixels(2)
    with torch.inference_mode():
        expected = model.get_image_features(pixels).pooler_output
    with torch.no_grad():
        no_grad = model.get_image_features(pixels).pooler_output
    with_grad = model.get_image_features(pixels).pooler_output
    for out in (no_grad, with_grad):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert not out.is_inference()
    # Ordinary tensors: a module that tracks grad can use them and backpropagate to its own weights.
    head = torch.nn.Linear(48, 2, device="cuda")
    head(with_grad).sum().backward()
    assert head.weight.grad is not None
    assert len(model.vision_model.forward.captured) == 1  # the vision tower's runner; the text tower never ran


@pytest.mark.gpu
def test_cuda_graphs_leave_inputs_that_require_grad_to_the_eager_path():
    model = enable_cuda_graphs(_build("clip", "vision", torch.float32), (2,))
    runner = cuda_graph_runners(model)[0]
    pixels = _pixels(2).requires_grad_()
    assert "requires grad" in runner.why_eager(pixels)
    with torch.no_grad():
        model(pixels)
    assert len(runner.captured) == 1


@pytest.mark.gpu
def test_enable_cuda_graphs_again_replaces_the_graphs():
    model = enable_cuda_graphs(_build("clip", "vision", torch.float32), (1, 2))
    with torch.inference_mode():
        model(_pixels(1))
    first = cuda_graph_runners(model)[0]
    assert len(first.captured) == 1
    enable_cuda_graphs(model, (4,))
    (runner,) = cuda_graph_runners(model)
    assert runner is not first and first.captured == [] and runner.batch_sizes == (4,)
    # The class's eager forward (under the automatic graphs' wrapper), not the old runner.
    assert runner.forward.function is type(model.vision_model).forward.__wrapped__


@pytest.mark.gpu
def test_enable_cuda_graphs_keeps_the_state_dict_and_submodules():
    plain = _build("siglip", "full", torch.float32)
    graphed = enable_cuda_graphs(_build("siglip", "full", torch.float32), True)
    assert list(graphed.state_dict()) == list(plain.state_dict())
    assert graphed.vision_model.embeddings is not None and graphed.text_model.encoder is not None


@pytest.mark.gpu
def test_enable_cuda_graphs_needs_a_vitriton_tower():
    with pytest.raises(ValueError, match="holds no vitriton VisionTransformer or TextTransformer.*vitriton.patch"):
        enable_cuda_graphs(CLIPTextModel(models.clip_model().config.text_config).cuda(), True)


@pytest.mark.gpu
def test_runner_rejects_a_model_on_the_cpu():
    with pytest.raises(RuntimeError, match="parameters are on cpu"):
        CUDAGraphRunner(torch.nn.Linear(4, 4))


@pytest.mark.gpu
def test_cuda_graphs_run_output_attentions_eagerly_and_replay_return_dict_false():
    plain = _build("clip", "vision", torch.float32, cuda_graphs=False)
    model = enable_cuda_graphs(_build("clip", "vision", torch.float32), (4,))
    runner = cuda_graph_runners(model)[0]
    pixels = _pixels(3)
    with torch.inference_mode():
        attended = model(pixels, output_attentions=True)
        expected = plain(pixels, output_attentions=True)
        as_tuple = model(pixels, return_dict=False)
        tuple_expected = plain(pixels, return_dict=False)
    assert runner.captured and all(("output_attentions", ("value", True)) not in key[2] for key in runner.captured)
    assert len(attended.attentions) == 2 and attended.attentions[0].shape == (3, 2, 26, 26)
    torch.testing.assert_close(attended.attentions[1], expected.attentions[1], rtol=1e-5, atol=1e-5)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(tuple_expected)
    for ours, theirs in zip(as_tuple, tuple_expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_graphs_leave_autocast_calls_to_the_eager_path():
    plain = _build("clip", "vision", torch.float32, cuda_graphs=False)
    model = enable_cuda_graphs(_build("clip", "vision", torch.float32), (2,))
    pixels = _pixels(2)
    with torch.inference_mode():
        fp32 = model(pixels).last_hidden_state
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(pixels).last_hidden_state
            expected = plain(pixels).last_hidden_state
    # The residual stream keeps the weights' dtype under autocast, as in transformers; the linears ran in bf16.
    assert fp32.dtype == bf16.dtype == expected.dtype == torch.float32
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, expected, rtol=0, atol=0)
    assert len(cuda_graph_runners(model)[0].captured) == 1  # the fp32 call's graph only


# Automatic graphs (the default).


def test_towers_start_with_automatic_graphs_and_enable_cuda_graphs_switches_them(cpu_clip):
    towers = [cpu_clip.vision_model, cpu_clip.text_model]
    assert all(tower.auto_graphs.enabled for tower in towers)
    try:
        assert enable_cuda_graphs(cpu_clip, False) is cpu_clip
        assert not any(tower.auto_graphs.enabled for tower in towers)
    finally:
        enable_cuda_graphs(cpu_clip, "auto")
    assert all(tower.auto_graphs.enabled for tower in towers)


@pytest.mark.parametrize(("value", "enabled"), [("0", False), ("off", False), ("1", True), ("auto", True), ("", True)])
def test_vitriton_cuda_graphs_sets_the_default(monkeypatch, value, enabled):
    monkeypatch.setenv("VITRITON_CUDA_GRAPHS", value)
    assert AutoGraphs().enabled is enabled


def test_vitriton_cuda_graphs_rejects_other_values(monkeypatch):
    monkeypatch.setenv("VITRITON_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match="VITRITON_CUDA_GRAPHS='sometimes'; expected auto"):
        AutoGraphs()


def test_auto_graphs_say_why_a_call_runs_eagerly(cpu_clip):
    vision = cpu_clip.vision_model
    pixels = models.pixels(1, models.CLIP_VISION["image_size"])
    assert "not on a CUDA device" in vision.auto_graphs.why_eager(vision, pixels)
    handle = vision.encoder.layers[0].mlp.register_forward_hook(lambda *args: None)
    try:
        assert "MLP in the tower has hooks" in vision.auto_graphs.why_eager(vision, pixels)
    finally:
        handle.remove()
    weight = vision.post_layernorm.weight
    weight.requires_grad_(True)
    try:
        assert "grad is on and parameters require grad" in vision.auto_graphs.why_eager(vision, pixels)
        with torch.no_grad():
            assert "not on a CUDA device" in vision.auto_graphs.why_eager(vision, pixels)
    finally:
        weight.requires_grad_(False)


def test_copies_and_pickles_of_a_tower_keep_the_setting_but_no_graphs(cpu_clip):
    vision = cpu_clip.vision_model
    copied = copy.deepcopy(vision)
    assert copied.auto_graphs is not vision.auto_graphs and copied.auto_graphs.enabled
    restored = pickle.loads(pickle.dumps(AutoGraphs(enabled=False)))
    assert not restored.enabled and restored.captured == []


def test_automatic_runners_bind_calls_to_the_towers_own_parameters(cpu_clip):
    vision, text = cpu_clip.vision_model, cpu_clip.text_model
    for tower, first in ((vision, "pixel_values"), (text, "input_ids")):
        forward = graphs._TowerMethod(tower, type(tower).forward.__wrapped__)
        bound = inspect.signature(forward).bind(torch.ones(1, 2), output_hidden_states=True)
        assert list(bound.arguments) == [first, "output_hidden_states"]


def _positional_only(a, b=1, /, c=2, *, d=3, **rest):
    return a


def _no_var_keyword(x, y=None, z=False, *, w=(1, 2)):
    return x


@pytest.mark.parametrize(
    "function",
    [_positional_only, _no_var_keyword, VisionTransformer.forward.__wrapped__, TextTransformer.forward.__wrapped__],
)
def test_a_layout_binds_every_call_as_inspect_does(function):
    """Random calls: where ``inspect`` binds one, the cached layout gives the same canonical arguments and names
    (inspect's ``args``, ``kwargs``, and its ``arguments`` with ``**kwargs`` spread out)."""
    signature = inspect.signature(function)
    names = [*signature.parameters, "extra", "other"]
    rng = random.Random(0)
    bound_some = 0
    for _ in range(400):
        args = tuple(object() for _ in range(rng.randint(0, 4)))
        kwargs = {name: object() for name in rng.sample(names, rng.randint(0, 3))}
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            continue
        bound_some += 1
        bound.apply_defaults()
        named = {}
        for name, value in bound.arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        positional, keywords, by_name = graphs._Layout(signature, len(args), tuple(kwargs)).canonical(args, kwargs)
        assert positional == bound.args and keywords == bound.kwargs and by_name == named
        assert list(keywords) == list(bound.kwargs) and list(by_name) == list(named)
    assert bound_some > 40


def test_a_steady_call_is_bound_once_and_looked_up_after(cpu_clip, monkeypatch):
    """Calls that differ only in tensor values reuse their binding; metadata, options and the grad mode do not."""
    vision = cpu_clip.vision_model
    runner = _FakeRunner.for_tower(vision, None)
    size = models.CLIP_VISION["image_size"]
    first = runner.bind((models.pixels(1, size, seed=1),), {})
    binds = []
    monkeypatch.setattr(runner, "signature", _Counting(runner.signature, binds))
    second = runner.bind((models.pixels(1, size, seed=2),), {})
    assert binds == [] and second.signature == first.signature and not torch.equal(second.args[0], first.args[0])
    runner.bind((models.pixels(2, size),), {})
    runner.bind((models.pixels(1, size),), {"output_hidden_states": True})
    leaf = models.pixels(1, size).requires_grad_()
    assert runner.bind((leaf,), {}) is None
    with torch.no_grad():
        assert runner.bind((leaf,), {}).batch == 1
    assert len(binds) == 4 and len(runner._bindings) == 5


class _Counting:
    """An inspect.Signature that counts its ``bind`` calls."""

    def __init__(self, signature, calls):
        self.signature, self.calls = signature, calls
        self.parameters = signature.parameters

    def bind(self, *args, **kwargs):
        self.calls.append(len(args))
        return self.signature.bind(*args, **kwargs)


def test_a_deleted_model_is_freed_without_the_garbage_collector():
    """Its automatic graphs hold no reference back to the tower, so ``del model`` frees the weights at once."""
    model = vitriton.from_transformers(models.clip_model(), device="cpu")
    vision = model.vision_model
    vision.auto_graphs.why_eager(vision, models.pixels(1, models.CLIP_VISION["image_size"]))
    assert vision.auto_graphs._modules  # its cache of the tower's structure is filled
    towers = [weakref.ref(vision), weakref.ref(model.text_model)]
    gc.disable()
    try:
        del model, vision
        assert [tower() for tower in towers] == [None, None]
    finally:
        gc.enable()


class _FakeGraph:
    def replay(self) -> None:
        pass


class _FakeRunner(CUDAGraphRunner):
    """The runner's bookkeeping on the CPU, for the automatic graphs' rules: a "capture" runs the forward once and
    keeps its outputs, a "replay" returns copies of them, whatever the inputs. A call that replayed therefore
    returns the captured call's result, and one that ran eagerly its own: the tests tell them apart by that."""

    @staticmethod
    def device_of(model):
        return next(model.parameters()).device

    def _capture(self, bucket, args, kwargs):
        with graphs._capturing():
            outputs = self.forward(*args, **kwargs)
        return graphs._Captured(_FakeGraph(), list(args), dict(kwargs), outputs)

    def replay(self, captured, call, bucket, check=None):
        if check is not None and check() is not None:
            return graphs.STALE
        return take_rows(captured.outputs, call.batch, bucket)


@pytest.fixture
def on_cpu(monkeypatch):
    """Automatic graphs with the CPU standing in for the GPU and fake graphs; yields a fresh CLIP vision model."""
    monkeypatch.setattr(AutoGraphs, "device_type", "cpu")
    monkeypatch.setattr(AutoGraphs, "runner_cls", _FakeRunner)
    model = vitriton.from_transformers(models.clip_model().vision_model, device="cpu")
    first, second = (models.pixels(1, models.CLIP_VISION["image_size"], seed=seed) for seed in (1, 2))
    with eager_mode():  # the reference ops: the rules under test do not depend on the kernels
        yield model, model.vision_model, first, second


def _pooled(model, pixels, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(pixels, **kwargs).pooler_output


def _replays(model, tower, first, second) -> bool:
    """Captures ``first``'s shape (two calls), then says whether a call with ``second`` replays."""
    for _ in range(2):
        _pooled(model, first)
    return torch.equal(_pooled(model, second), _pooled_eager(tower, first))


def _pooled_eager(tower, pixels) -> torch.Tensor:
    with torch.no_grad():
        return type(tower).forward.__wrapped__(tower, pixels).pooler_output


def test_auto_graphs_capture_a_shape_on_its_second_call(on_cpu):
    model, tower, first, second = on_cpu
    _pooled(model, first)
    assert tower.auto_graphs.captured == []
    _pooled(model, first)
    assert len(tower.auto_graphs.captured) == 1
    assert torch.equal(_pooled(model, second), _pooled_eager(tower, first))  # a (fake) replay
    assert not torch.equal(_pooled_eager(tower, second), _pooled_eager(tower, first))


def test_auto_graphs_count_only_calls_that_returned(on_cpu):
    model, tower, _, _ = on_cpu
    wrong_size = models.pixels(1, models.CLIP_VISION["image_size"] + 8)
    for _ in range(3):  # a graph key like any other, but the forward raises
        with pytest.raises(ValueError, match="image size"):
            _pooled(model, wrong_size)
    assert tower.auto_graphs.captured == [] and tower.auto_graphs._calls == {}


def test_auto_graphs_run_eagerly_under_hooks_and_dispatch_modes(on_cpu):
    model, tower, first, second = on_cpu
    assert _replays(model, tower, first, second)
    seen = []
    handle = tower.encoder.layers[0].mlp.register_forward_hook(lambda *args: seen.append(1))
    try:
        assert torch.equal(_pooled(model, second), _pooled_eager(tower, second))
    finally:
        handle.remove()
    assert seen == [1, 1]  # the call, then the reference call of the assert
    assert torch.equal(_pooled(model, second), _pooled_eager(tower, first))  # replays again
    # A module's hook dict replaced as a whole (torch's export does this) is read afresh, not a kept dict object.
    mlp = tower.encoder.layers[0].mlp
    saved = mlp._forward_hooks
    mlp._forward_hooks = OrderedDict({0: lambda *args: seen.append(2)})
    try:
        assert torch.equal(_pooled(model, second), _pooled_eager(tower, second))
    finally:
        mlp._forward_hooks = saved
    assert seen == [1, 1, 2, 2]

    class Logging(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Logging():
        assert "TorchDispatchMode" in tower.auto_graphs.why_eager(tower, second)
        assert torch.equal(_pooled(model, second), _pooled_eager(tower, second))


@pytest.mark.parametrize(
    "change", ["parametrize", "instance_forward", "delete_layer", "replace_parameter", "set_data", "dict_entry"]
)
def test_auto_graphs_start_again_after_python_level_changes(on_cpu, change):
    model, tower, first, second = on_cpu
    assert _replays(model, tower, first, second)
    layer_norm = tower.post_layernorm
    if change == "parametrize":

        class Double(torch.nn.Module):
            def forward(self, bias):
                return bias * 2

        torch.nn.utils.parametrize.register_parametrization(layer_norm, "bias", Double())
    elif change == "instance_forward":
        plain = layer_norm.forward
        layer_norm.forward = lambda x, residual=None: tuple(t * 2 for t in plain(x, residual))
    elif change == "delete_layer":
        del tower.encoder.layers[-1]
        tower.encoder.num_hidden_layers -= 1
    elif change == "set_data":  # the same Parameter, new storage: no registration hook runs
        layer_norm.bias.data = layer_norm.bias.data * 2
    elif change == "dict_entry":  # straight into the module's dict: no registration hook runs
        layer_norm._parameters["bias"] = torch.nn.Parameter(layer_norm.bias * 2, requires_grad=False)
    else:
        layer_norm.bias = torch.nn.Parameter(layer_norm.bias * 2, requires_grad=False)
    expected = _pooled_eager(tower, second)
    assert not torch.equal(expected, _pooled_eager(tower, first))
    for _ in range(3):  # eagerly, not from the stale graph; then captured again, with the change
        assert torch.equal(_pooled(model, second), expected)


def test_auto_graphs_free_their_graphs_when_the_tower_leaves_the_device(on_cpu):
    model, tower, first, second = on_cpu
    assert _replays(model, tower, first, second)
    model.to("meta")
    assert "not on a CUDA device" in tower.auto_graphs.why_eager(tower, first.to("meta"))
    assert tower.auto_graphs.captured == []


def test_auto_graphs_count_kept_hidden_states_against_the_token_cap(on_cpu):
    model, tower, first, _ = on_cpu
    patches = (models.CLIP_VISION["image_size"] // models.CLIP_VISION["patch_size"]) ** 2
    layers = models.CLIP_VISION["num_hidden_layers"]
    assert tower.graph_tokens({"pixel_values": first}) == patches
    assert tower.graph_tokens({"pixel_values": first, "output_hidden_states": True}) == patches * (layers + 2)
    assert tower.graph_tokens({"pixel_values": first, "feature_layers": [-2, -1]}) == patches * 3
    assert tower.graph_tokens({"pixel_values": first, "feature_layers": 99}) is None  # the eager call raises


def test_graph_keys_tell_equal_values_of_other_types_apart():
    assert graphs._freeze(1) != graphs._freeze(True) != graphs._freeze(1.0)
    assert graphs._freeze([1, (2, "a")]) == graphs._freeze((1, [2, "a"]))


def test_enable_cuda_graphs_starts_the_automatic_graphs_afresh(on_cpu):
    model, tower, first, second = on_cpu
    assert _replays(model, tower, first, second)
    before = tower.auto_graphs
    enable_cuda_graphs(model, False)
    assert tower.auto_graphs is not before and not tower.auto_graphs.enabled
    assert tower.auto_graphs.captured == [] and tower.auto_graphs._modules == []
    assert torch.equal(_pooled(model, second), _pooled_eager(tower, second))


def _tensors_in(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _tensors_in(item)]
    return []


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_graph_keys_hold_every_option_under_random_calls(monkeypatch, seed):
    """Random calls of both towers (batch, image size, sequence, output options, feature layers, the config's
    default), each input fixed by its shape alone. A fake replay returns the captured call's outputs, so a key that
    left out an option the forward reads would hand one call another's result; every call must equal the eager
    forward's, raising alike."""
    monkeypatch.setattr(AutoGraphs, "device_type", "cpu")
    monkeypatch.setattr(AutoGraphs, "runner_cls", _FakeRunner)
    monkeypatch.setattr(graphs, "AUTO_MAX_GRAPHS", 64)
    rng = random.Random(seed)
    clip = vitriton.from_transformers(models.clip_model(), device="cpu")
    size = models.CLIP_VISION["image_size"]
    inputs = {}
    with eager_mode(), torch.no_grad():
        for _ in range(200):
            tower = rng.choice([clip.vision_model, clip.text_model])
            batch = rng.choice([1, 2, 3])
            options = {}
            if rng.random() < 0.3:
                options["output_hidden_states"] = rng.choice([True, False, None])
            if rng.random() < 0.3:
                options["return_dict"] = rng.choice([True, False])
            if rng.random() < 0.3:
                options["feature_layers"] = rng.choice([1, -1, [0, 2], (-2,), None, 7])
            if tower is clip.vision_model:
                side = rng.choice([size, size + 8])
                shape = ("pixels", batch, side)
                if shape not in inputs:
                    inputs[shape] = (models.pixels(batch, side, seed=len(inputs)),)
                args = (*inputs[shape], side != size or rng.random() < 0.2)
            else:
                shape = ("ids", batch, rng.choice([7, 11]))
                if shape not in inputs:
                    inputs[shape] = models.text(batch, shape[2], seed=len(inputs))
                args = inputs[shape]
            tower.config.output_hidden_states = rng.random() < 0.1
            outcomes = []
            for forward in (tower, functools.partial(type(tower).forward.__wrapped__, tower)):
                try:
                    outcomes.append(_tensors_in(forward(*args, **options)))
                except (TypeError, ValueError) as error:
                    outcomes.append(type(error))
            tower.config.output_hidden_states = False
            ours, eager = outcomes
            if isinstance(eager, type) or isinstance(ours, type):
                assert ours == eager, (shape, options)
            else:
                assert len(ours) == len(eager) and all(map(torch.equal, ours, eager)), (shape, options)
    assert len(clip.vision_model.auto_graphs.captured) > 8 and len(clip.text_model.auto_graphs.captured) > 8


def test_explicit_runners_bind_replay_and_fall_back_on_the_cpu_with_fake_graphs(monkeypatch):
    """The wiring of ``cuda_graphs=`` buckets without a GPU: each tower's runner binds calls to the tower's own
    parameters, pads to a bucket, replays (fake), holds its tower weakly and shares one guard with the others."""
    for name in ("device_of", "_capture", "replay"):
        monkeypatch.setattr(CUDAGraphRunner, name, _FakeRunner.__dict__[name])
    monkeypatch.setattr(graphs, "check_cuda_graphs", lambda model, cuda_graphs: cuda_graph_buckets(cuda_graphs))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model = enable_cuda_graphs(vitriton.from_transformers(models.clip_model(), device="cpu"), (2,))
    vision, text = model.vision_model.forward, model.text_model.forward
    assert (
        set(cuda_graph_runners(model)) == {vision, text}
        and vision._guard is text._guard
        and not model.vision_model.auto_graphs.enabled
    )
    first, second = (models.pixels(1, models.CLIP_VISION["image_size"], seed=seed) for seed in (1, 2))
    with eager_mode(), torch.no_grad():
        captured = model.get_image_features(first).pooler_output
        replayed = model.get_image_features(second).pooler_output  # the fake replay: the first call's result
        three = model.get_image_features(torch.cat([first, second, second])).pooler_output  # past the bucket
        assert torch.equal(replayed, captured)
        torch.testing.assert_close(three[:1], captured, rtol=1e-5, atol=1e-5)  # eager: its own rows
        assert not torch.allclose(three[1:2], captured, rtol=1e-3, atol=1e-3)
    assert [key[0] for key in vision.captured] == [2] and text.captured == []
    towers = [weakref.ref(model.vision_model)]
    gc.disable()
    try:
        del model
        assert towers[0]() is None
    finally:
        gc.enable()


def test_training_mode_replays_unless_dropout_draws_masks(monkeypatch):
    """Graphs would repeat one dropout mask: a model in training mode with dropout runs eagerly; without dropout
    (the configs' default), or back in eval mode, it replays."""
    for name in ("device_of", "_capture", "replay"):
        monkeypatch.setattr(CUDAGraphRunner, name, _FakeRunner.__dict__[name])
    monkeypatch.setattr(graphs, "check_cuda_graphs", lambda model, cuda_graphs: cuda_graph_buckets(cuda_graphs))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model = enable_cuda_graphs(vitriton.from_transformers(models.clip_model(), device="cpu"), (2,))
    runner, px = model.vision_model.forward, models.pixels(1, models.CLIP_VISION["image_size"])
    model.train()
    assert runner.why_eager(px) is None
    for module in model.modules():
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.1
    assert "training mode with dropout" in runner.why_eager(px)
    model.vision_model.encoder.layers[0].self_attn.eval()  # one attention still drops
    assert "training mode with dropout" in runner.why_eager(px)
    model.eval()
    assert runner.why_eager(px) is None


def _towers(model) -> list[Tower]:
    return [module for module in model.modules() if isinstance(module, Tower)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["vision", "text", "full"])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_auto_graphs_replay_repeated_calls_with_the_eager_results(family, kind):
    dtype = torch.bfloat16
    plain = _build(family, kind, dtype, cuda_graphs=False)
    model = _build(family, kind, dtype)
    with torch.no_grad():
        for batch, seed in ((1, 1), (1, 2), (3, 3), (1, 4), (3, 5), (3, 6)):
            expected = _call(plain, family, kind, batch, seed, dtype)
            ours = _call(model, family, kind, batch, seed, dtype)
            for part in expected:  # the same kernels on the same shapes: the same values
                _assert_same(ours[part], expected[part], dtype)
                for got, want in zip(ours[part].values(), expected[part].values(), strict=True):
                    if isinstance(want, torch.Tensor):
                        assert torch.equal(got, want), (batch, seed, part)
    for tower in _towers(model):
        assert {key[0] for key in tower.auto_graphs.captured} == {1, 3}, tower.auto_graphs.why_eager(
            tower, *_call_arguments(tower, family)
        )
    assert all(tower.auto_graphs.captured == [] for tower in _towers(plain))


def _call_arguments(tower, family: str) -> tuple:
    if isinstance(tower, vitriton.encoders.trunk.VisionTransformer):
        size = models.CLIP_VISION["image_size"] if family == "clip" else models.SIGLIP_VISION["image_size"]
        return (_pixels(1, torch.bfloat16, size=size),)
    return (_text(1)[0],)


@pytest.mark.gpu
def test_auto_graphs_step_aside_for_hooks_grad_big_calls_and_replaced_weights(monkeypatch):
    model = _build("clip", "vision", torch.float32)
    plain = _build("clip", "vision", torch.float32, cuda_graphs=False)
    tower = model.vision_model
    pixels = _pixels(2)

    def run(module):
        with torch.no_grad():
            return module(pixels).pooler_output

    for _ in range(3):
        out = run(model)
    assert len(tower.auto_graphs.captured) == 1
    torch.testing.assert_close(out, run(plain), rtol=0, atol=0)
    seen = []
    handle = tower.encoder.layers[1].register_forward_hook(lambda *args: seen.append(1))
    run(model)
    handle.remove()
    assert seen == [1]  # the hook ran: that call was eager
    tower.post_layernorm.weight.requires_grad_(True)
    assert model(pixels).pooler_output.grad_fn is not None  # grad on: eager, with autograd
    tower.post_layernorm.weight.requires_grad_(False)
    # A replaced parameter drops the graphs; the next calls follow the new weights.
    for module in (model, plain):
        weight = module.vision_model.post_layernorm.weight
        module.vision_model.post_layernorm.weight = torch.nn.Parameter(weight * 2, requires_grad=False)
    for _ in range(3):
        out = run(model)
    assert len(tower.auto_graphs.captured) == 1
    torch.testing.assert_close(out, run(plain), rtol=0, atol=0)
    # So is eager_mode: the reference ops run, not the captured kernels.
    with torch.no_grad(), eager_mode():
        reference = model(pixels).pooler_output
    torch.testing.assert_close(reference, out, rtol=1e-4, atol=1e-4)
    # A config default read by the forward is part of the graph's identity.
    tower.config.output_hidden_states = True
    try:
        with torch.no_grad():
            assert len(model(pixels).hidden_states) == 3
    finally:
        tower.config.output_hidden_states = False
    # Past AUTO_MAX_TOKENS every call is eager.
    monkeypatch.setattr(graphs, "AUTO_MAX_TOKENS", 8)
    enable_cuda_graphs(model, "auto")
    for _ in range(3):
        run(model)
    assert tower.auto_graphs.captured == []
    assert "AUTO_MAX_TOKENS" in tower.auto_graphs.why_eager(tower, pixels)


@pytest.mark.gpu
def test_auto_graphs_serve_calls_from_another_stream():
    model = _build("clip", "vision", torch.float32)
    plain = _build("clip", "vision", torch.float32, cuda_graphs=False)
    first, second = _pixels(2, seed=1), _pixels(2, seed=2)
    side = torch.cuda.Stream()
    with torch.no_grad():
        for _ in range(2):
            model(first)
        a = model(first).pooler_output
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            b = model(second).pooler_output
        torch.cuda.current_stream().wait_stream(side)
        torch.testing.assert_close(a, plain(first).pooler_output, rtol=0, atol=0)
        torch.testing.assert_close(b, plain(second).pooler_output, rtol=0, atol=0)
    assert len(model.vision_model.auto_graphs.captured) == 1
