"""torch.compile(fullgraph=True) traces every model without a graph break: no host synchronisation (the text
embeddings' id checks become async asserts when compiling), no data-dependent Python branches."""

from __future__ import annotations

import pytest
import torch

import vitriton
from tests.encoders import models
from vitriton.graphs import _FORWARDS, AutoGraphs, tower_op


@pytest.fixture(scope="module")
def clip():
    return vitriton.from_transformers(models.clip_model())


@pytest.fixture(scope="module")
def siglip():
    return vitriton.from_transformers(models.siglip_model())


def explain(fn, *args, **kwargs):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args, **kwargs)


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_no_graph_breaks(family, clip, siglip):
    model, size = (clip, 40) if family == "clip" else (siglip, 35)
    px = models.pixels(1, size)
    ids, mask = models.text(1, 6)
    for what, fn, args in (
        ("vision", model.vision_model, (px,)),
        ("text", model.text_model, (ids, mask)),
        ("full", model, (ids, px, mask)),
    ):
        report = explain(fn, *args)
        assert report.graph_break_count == 0, f"{family} {what}: {report.break_reasons}"
        assert report.graph_count == 1


@torch.no_grad()
def test_compiled_matches_eager_and_checks_ids(clip):
    torch._dynamo.reset()
    compiled = torch.compile(clip.text_model, fullgraph=True, backend="eager")
    ids, mask = models.text(2, 6, seed=3)
    torch.testing.assert_close(compiled(ids, mask).pooler_output, clip.text_model(ids, mask).pooler_output)
    ids[0, 1] = 99
    with pytest.raises(RuntimeError, match="token id is outside the vocabulary of 99 tokens"):
        compiled(ids, mask)


# Compiled towers as one opaque op (vitriton.graphs.compiled_call). On the CPU the automatic graphs are fakes
# (tests.test_graphs._FakeRunner): a replay returns the captured call's outputs, so a compiled call that went
# through a tower's graphs is told apart from one traced through its kernels.
@pytest.fixture
def fake_graphs(monkeypatch):
    from tests.test_graphs import _FakeRunner
    from vitriton.graphs import AutoGraphs

    monkeypatch.setattr(AutoGraphs, "device_type", "cpu")
    monkeypatch.setattr(AutoGraphs, "runner_cls", _FakeRunner)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graph_ops(fn, *args, **kwargs) -> list[str]:
    report = explain(fn, *args, **kwargs)
    assert report.graph_break_count == 0 and report.graph_count == 1, report.break_reasons
    return [str(node.target) for graph in report.graphs for node in graph.graph.nodes if node.op == "call_function"]


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_compiled_towers_are_one_op_each(family, fake_graphs):
    source = models.clip_model() if family == "clip" else models.siglip_model()
    model = vitriton.from_transformers(source, device="cpu")
    size = models.CLIP_VISION["image_size"] if family == "clip" else models.SIGLIP_VISION["image_size"]
    px, (ids, mask) = models.pixels(1, size), models.text(1, 6)
    full = model(ids, px, mask)  # plain, first call of each tower: eager
    ops = graph_ops(model, ids, px, mask)
    assert ops.count("vitriton.tower.default") == 2, ops
    assert not [op for op in ops if op.startswith(("vitriton.attention", "vitriton.layer_norm"))], ops
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids, px, mask)  # second call of each shape: captured, then replayed
    torch.testing.assert_close(out.logits_per_image, full.logits_per_image)
    assert len(model.vision_model.auto_graphs.captured) == len(model.text_model.auto_graphs.captured) == 1
    other = models.pixels(1, size, seed=7)
    replayed = compiled(ids, other, mask).image_embeds  # a fake replay returns the captured call's outputs
    torch.testing.assert_close(replayed, out.image_embeds)
    model.vision_model.auto_graphs.enabled = False  # a guard: traced again, through the kernels
    own = model.get_image_features(other).pooler_output
    assert not torch.allclose(own, replayed)
    torch.testing.assert_close(compiled(ids, other, mask).image_embeds, own / own.norm(dim=-1, keepdim=True))


@torch.no_grad()
def test_compiled_tower_options_and_batch_sizes(fake_graphs):
    """Hidden states, feature layers, tuples and a batch of another size come out as the plain call gives them."""
    tower = vitriton.from_transformers(models.clip_model(), device="cpu").vision_model
    compiled = torch.compile(tower, fullgraph=True, backend="aot_eager")
    size = models.CLIP_VISION["image_size"]
    assert "vitriton.tower.default" in graph_ops(tower, models.pixels(1, size), output_hidden_states=True)
    for batch, kwargs in (
        (1, dict(output_hidden_states=True)),
        (2, dict(output_hidden_states=True, return_dict=False)),
        (3, dict(feature_layers=(1, -2))),
        (2, dict(feature_layers=1, return_dict=False)),
    ):
        px = models.pixels(batch, size, seed=batch)
        got, want = compiled(px, **kwargs), tower(px, **kwargs)
        assert type(got) is type(want)
        got, want = (got, want) if isinstance(want, tuple) else (got.to_tuple(), want.to_tuple())
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


@torch.no_grad()
def test_compiled_model_follows_config_output_options_changed_after_compiling(fake_graphs):
    """The config's output options are read from its dict (trunk.config_flag): changing one after compiling, by
    attribute or through transformers' output_attentions property, is seen by the compiled model's guards."""
    model = vitriton.from_transformers(models.clip_model(), device="cpu").vision_model
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    px = models.pixels(1, models.CLIP_VISION["image_size"])
    assert compiled(px).hidden_states is None
    config = model.config
    try:
        config.output_hidden_states = True
        assert len(compiled(px).hidden_states) == models.CLIP_VISION["num_hidden_layers"] + 1
        config.return_dict = False
        assert isinstance(compiled(px), tuple)
        config.return_dict = True
        config._attn_implementation = "eager"
        config.output_attentions = True
        assert len(compiled(px).attentions) == models.CLIP_VISION["num_hidden_layers"]
    finally:
        config.output_hidden_states = config.output_attentions = False
        config.return_dict = True


@torch.no_grad()
def test_compiled_tower_with_varying_feature_layers_and_copies(fake_graphs):
    """An int option that changes between calls (dynamo then makes it symbolic) still compiles whole; a shallow
    copy of a tower gets graphs of its own, so the original's compiled calls keep running the original."""
    import copy
    import gc

    tower = vitriton.from_transformers(models.clip_model(), device="cpu").vision_model
    px = models.pixels(1, models.CLIP_VISION["image_size"])
    compiled = torch.compile(lambda x, layer: tower(x, feature_layers=layer), fullgraph=True, backend="aot_eager")
    for layer in (1, 2, 0, -1):
        got, want = compiled(px, layer).hidden_states, tower(px, feature_layers=layer).hidden_states
        torch.testing.assert_close(got, want)
    shallow = copy.copy(tower)
    assert shallow.auto_graphs is not tower.auto_graphs and shallow.auto_graphs.handle != tower.auto_graphs.handle
    del shallow
    gc.collect()
    torch.testing.assert_close(compiled(px, 1).hidden_states, tower(px, feature_layers=1).hidden_states)


@pytest.mark.parametrize("case", ["grad", "graphs off", "attentions", "hooks", "hidden states by layer"])
def test_compiled_towers_traced_through_where_graphs_do_not_serve(case, fake_graphs):
    """Where the plain call could not replay, or a hook would see the fake run's tensors, compile traces the
    kernels as before."""
    model = vitriton.from_transformers(models.clip_model(), device="cpu")
    px = models.pixels(1, models.CLIP_VISION["image_size"])
    kwargs = dict(output_attentions=True) if case == "attentions" else {}
    if case == "hidden states by layer":
        kwargs = dict(output_hidden_states=[1])  # a place left None: the op returns tensors only
    if case == "graphs off":
        vitriton.enable_cuda_graphs(model, False)
    if case == "hooks":
        model.vision_model.encoder.layers[0].register_forward_hook(lambda module, args, out: None)
    with torch.set_grad_enabled(case == "grad"):
        ops = graph_ops(model.vision_model, px, **kwargs)
    assert "vitriton.tower.default" not in ops and "vitriton.linear.default" in ops, ops


@torch.no_grad()
def test_hook_registered_after_compiling_runs_in_the_op(fake_graphs):
    """Whether a tower is hooked is read once per compilation (dynamo does not guard module hooks either): a hook
    added later runs in the op's plain call, which then runs eagerly, on real tensors, and its effect is kept."""
    tower = vitriton.from_transformers(models.clip_model(), device="cpu").vision_model
    px = models.pixels(1, models.CLIP_VISION["image_size"])
    compiled = torch.compile(tower, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        before = compiled(px).pooler_output
    seen = []

    def shift(module, args, out):
        seen.append(type(out[0] if isinstance(out, tuple) else out))
        # Not the same offset in every column: the LayerNorms after it would cancel that, up to rounding.
        ramp = torch.linspace(0, 1, tower.config.hidden_size)
        return (out[0] + ramp, *out[1:]) if isinstance(out, tuple) else out + ramp

    tower.encoder.layers[0].register_forward_hook(shift)
    calls = []
    plain_call = AutoGraphs.__call__
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoGraphs, "__call__", lambda *args: calls.append(1) or plain_call(*args))
        got = compiled(px)
    assert calls and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before  # the op, no recompile
    assert seen and all(kind is torch.Tensor for kind in seen), seen
    torch.testing.assert_close(got.pooler_output, tower(px).pooler_output)
    assert not torch.allclose(got.pooler_output, before)


@torch.no_grad()
def test_hook_after_compiling_that_changes_an_output_dtype_raises(fake_graphs):
    """The compiled code after the op reads its outputs as traced; a later hook changing an output's dtype would
    be misread (wrong values, or memory read past an output), so the op raises and says what to do."""
    tower = vitriton.from_transformers(models.clip_model(), device="cpu").vision_model
    px = models.pixels(1, models.CLIP_VISION["image_size"])
    compiled = torch.compile(lambda x: tower(x).pooler_output * 2, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        compiled(px)
    tower.post_layernorm.register_forward_hook(lambda module, args, out: (out[0].double(), *out[1:]))
    with pytest.raises(RuntimeError, match="its outputs changed since compiling"):
        compiled(px)


@torch.no_grad()
def test_compiled_tower_guards_do_not_walk_the_layers(fake_graphs):
    """Whether the tower is sharded or hooked is read once per compilation, so no guard checks each layer on every
    call (a walk over a 24-layer tower's modules cost about 35 us a call on the CPU)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    tower = vitriton.from_transformers(models.clip_model(), device="cpu").vision_model
    px = models.pixels(1, models.CLIP_VISION["image_size"])
    compiled = torch.compile(tower, fullgraph=True, backend="eager")
    compiled(px)
    (entry,) = _debug_get_cache_entry_list(type(tower).forward.__code__)
    guards = str(entry.guard_manager)
    assert "vitriton.tower.default" in graph_ops(tower, px)
    assert "_modules['layers']._modules['0']._" not in guards, guards  # nothing read inside a layer


def test_tower_op_is_pt2_compliant_and_refuses_grad(fake_graphs):
    assert torch.Tag.pt2_compliant_tag in tower_op.tags
    tower = vitriton.from_transformers(models.clip_model(), device="cpu").vision_model
    px = models.pixels(1, models.CLIP_VISION["image_size"]).requires_grad_()
    with pytest.raises(RuntimeError, match="has no backward"):
        forward_id = _FORWARDS.index(type(tower).forward.__wrapped__)
        tower_op(tower.auto_graphs.handle, forward_id, [px], [], "(('pixel_values',), (), ())")


@torch.no_grad()
def test_compiled_tower_rejects_extra_positional_arguments_as_eager_does(fake_graphs):
    tower = vitriton.from_transformers(models.clip_model(), device="cpu").vision_model
    px = models.pixels(1, models.CLIP_VISION["image_size"])
    with pytest.raises(TypeError):
        tower(px, False, True)
    with pytest.raises(Exception, match="failed to bind arguments"):
        torch.compile(tower, fullgraph=True, backend="eager")(px, False, True)


@pytest.mark.gpu
@torch.inference_mode()
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_compiled_models_on_the_gpu_replay_their_towers(family, mode):
    """torch.compile (inductor) of a whole model on CUDA: the towers' outputs equal the plain model's bitwise (the
    same automatic graphs run, or under reduce-overhead the same kernels inside inductor's graph), and each tower
    captured its call."""
    torch._dynamo.reset()
    source = models.clip_model() if family == "clip" else models.siglip_model()
    model = vitriton.from_transformers(source, device="cuda", dtype=torch.bfloat16)
    size = models.CLIP_VISION["image_size"] if family == "clip" else models.SIGLIP_VISION["image_size"]
    px, (ids, mask) = models.pixels(2, size).cuda().bfloat16(), [t.cuda() for t in models.text(2, 6)]
    assert graph_ops(model, ids, px, mask).count("vitriton.tower.default") == 2  # the op, not the kernels
    torch._dynamo.reset()
    plain = [model(ids, px, mask) for _ in range(3)][-1]
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):
        out = compiled(ids, px, mask)
    for name in ("vision_model_output", "text_model_output"):
        got, want = getattr(out, name), getattr(plain, name)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=0)
    # The logits around the towers are inductor's kernels against eager ops, in bf16 and scaled by exp(2.66).
    torch.testing.assert_close(out.logits_per_image, plain.logits_per_image, rtol=0.02, atol=0.05)
    assert model.vision_model.auto_graphs.captured and model.text_model.auto_graphs.captured
    torch._dynamo.reset()


@torch.no_grad()
def test_export_traces_the_tower_through_or_says_why_not(fake_graphs):
    """torch.export's default (non-strict) tracing runs no dynamo: the tower is traced through its kernels. Strict
    export would put a call to this process's tower into the program, which the op refuses with the way out."""
    tower = vitriton.from_transformers(models.clip_model(), device="cpu").vision_model
    px = models.pixels(1, models.CLIP_VISION["image_size"])
    program = torch.export.export(tower, (px,), strict=False)
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert "vitriton.tower.default" not in ops and "vitriton.linear.default" in ops, ops
    torch.testing.assert_close(program.module()(px).pooler_output, tower(px).pooler_output)
    with pytest.raises(Exception, match="would call this process's tower"):
        torch.export.export(tower, (px,), strict=True)


@torch.no_grad()
def test_siglip_vision_compiled_through_after_the_image_size_turned_symbolic():
    """A SigLIP tower traced through its kernels (graphs off here: the CPU) keeps accepting any image with as many
    patches as its position table once dynamo has made the image size symbolic."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch._dynamo.reset()
    config = SiglipVisionConfig(
        hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, patch_size=3, image_size=6,
        vision_use_head=False,
    )  # fmt: skip
    model = vitriton.from_transformers(SiglipVisionModel(config).eval(), device="cpu")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for shape, interpolate in (((6, 6), True), ((9, 3), True), ((6, 6), False), ((3, 12), False)):
        px = torch.randn(1, 3, *shape)
        want = model(px, interpolate_pos_encoding=interpolate).last_hidden_state
        torch.testing.assert_close(compiled(px, interpolate_pos_encoding=interpolate).last_hidden_state, want)
    torch._dynamo.reset()


@torch.no_grad()
def test_compiled_tower_takes_options_a_repr_cannot_carry(fake_graphs):
    """A non-finite float among the extra keywords (which the forward ignores, as transformers' do) keeps the call
    traced through instead of breaking the op's argument string."""
    tower = vitriton.from_transformers(models.clip_model(), device="cpu").vision_model
    px = models.pixels(1, models.CLIP_VISION["image_size"])
    ops = graph_ops(tower, px, unused=float("inf"))
    assert "vitriton.tower.default" not in ops
    compiled = torch.compile(tower, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(px, unused=float("nan")).pooler_output, tower(px).pooler_output)
