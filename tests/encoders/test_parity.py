"""vitriton against transformers' own CLIP and SigLIP in fp32: every output within 1e-4 relative.

On CPU the ops run the Triton kernels through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipConfig, SiglipModel

import vitriton
from tests.encoders import models
from vitriton.encoders import trunk
from vitriton.encoders.clip import CLIPVisionTransformer
from vitriton.parallel import RowParallelLinear, Weights


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * max(scale, 1e-6), msg=lambda m: f"{what}: {m}")


def assert_pooled_output(ours, ref, what: str) -> None:
    assert_matches(ours.last_hidden_state, ref.last_hidden_state, f"{what} last_hidden_state")
    if ref.pooler_output is not None:
        assert_matches(ours.pooler_output, ref.pooler_output, f"{what} pooler_output")
    if ref.hidden_states is not None:
        assert len(ours.hidden_states) == len(ref.hidden_states)
        for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states, strict=True)):
            assert_matches(a, b, f"{what} hidden_states[{i}]")


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    hf = models.clip_model()
    path = models.save(hf, tmp_path_factory.mktemp("clip"))
    return hf, path, vitriton.from_pretrained(path)


@pytest.fixture(scope="module")
def siglip_pair(tmp_path_factory):
    hf = models.siglip_model()
    path = models.save(hf, tmp_path_factory.mktemp("siglip"))
    return hf, path, vitriton.from_pretrained(path)


@torch.no_grad()
def test_clip_full_model(clip_pair):
    hf, _, ours = clip_pair
    px = models.pixels(3, 40)
    ids, mask = models.text(3, 11)
    ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask, output_hidden_states=True)
    out = ours(ids, px, mask, output_hidden_states=True)
    for key in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert_matches(out[key], ref[key], key)
    assert_pooled_output(out.vision_model_output, ref.vision_model_output, "vision")
    assert_pooled_output(out.text_model_output, ref.text_model_output, "text")


@torch.no_grad()
def test_clip_features(clip_pair):
    hf, _, ours = clip_pair
    px = models.pixels(2, 40, seed=3)
    ids, mask = models.text(2, 9, seed=3)
    assert_pooled_output(ours.get_image_features(px), hf.get_image_features(px), "image features")
    ref = hf.get_text_features(input_ids=ids, attention_mask=mask)
    assert_pooled_output(ours.get_text_features(ids, mask), ref, "text features")


@torch.no_grad()
@pytest.mark.parametrize("eos_token_id", [2, 98])
def test_clip_text_eos_pooling(tmp_path, eos_token_id):
    """Legacy checkpoints (eos_token_id == 2) pool at the highest id; newer ones at the first eos id."""
    hf = models.clip_model(eos_token_id=eos_token_id).text_model
    ours = vitriton.from_transformers(hf)
    ids, mask = models.text(3, 12, seed=5)
    ids[0, 2] = 98  # an eos-valued token before the end: the two conventions pick different rows
    ref = hf(input_ids=ids, attention_mask=mask)
    assert_pooled_output(ours(ids, mask), ref, "text")


@torch.no_grad()
def test_clip_text_position_ids(clip_pair):
    hf, _, ours = clip_pair
    ids, mask = models.text(2, 8, seed=6)
    position_ids = torch.arange(3, 11).expand(2, -1)
    ref = hf.text_model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    assert_pooled_output(ours.text_model(ids, mask, position_ids), ref, "text")


@torch.no_grad()
def test_siglip_full_model(siglip_pair):
    hf, _, ours = siglip_pair
    px = models.pixels(3, 35)
    ids, mask = models.text(3, 10)
    ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask, output_hidden_states=True)
    out = ours(ids, px, mask, output_hidden_states=True)
    for key in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert_matches(out[key], ref[key], key)
    assert_pooled_output(out.vision_model_output, ref.vision_model_output, "vision")
    assert_pooled_output(out.text_model_output, ref.text_model_output, "text")


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_interpolate_pos_encoding(family, clip_pair, siglip_pair):
    hf, _, ours = clip_pair if family == "clip" else siglip_pair
    px = models.pixels(2, (48, 32) if family == "clip" else (42, 56), seed=2)
    ref = hf.vision_model(pixel_values=px, interpolate_pos_encoding=True)
    assert_pooled_output(ours.vision_model(px, interpolate_pos_encoding=True), ref, family)


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_feature_layers(family, clip_pair, siglip_pair):
    hf, _, ours = clip_pair if family == "clip" else siglip_pair
    size = 40 if family == "clip" else 35
    px = models.pixels(2, size, seed=4)
    ref = hf.vision_model(pixel_values=px, output_hidden_states=True).hidden_states
    tower = ours.vision_model
    out = tower(px, feature_layers=-2)
    assert len(out.hidden_states) == 1 and out.pooler_output is None
    assert_matches(out.hidden_states[0], ref[-2], "layer -2")
    assert_matches(out.last_hidden_state, ref[-2], "layer -2 as last_hidden_state")
    out = tower(px, feature_layers=[2, 0, -2])
    for got, index in zip(out.hidden_states, [2, 0, -2], strict=True):
        assert_matches(got, ref[index], f"layer {index}")
    assert out.pooler_output is not None  # the deepest layer asked for is the last: the whole tower ran


def test_feature_layers_stop_early(clip_pair):
    """Layers after the deepest one asked for never run."""
    _, _, ours = clip_pair
    calls = []
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, layer in enumerate(ours.vision_model.encoder.layers)
    ]
    try:
        with torch.no_grad():
            ours.vision_model(models.pixels(1, 40), feature_layers=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0]


@pytest.mark.parametrize("bad", [3, -4, []])
def test_feature_layers_out_of_range(clip_pair, bad):
    _, _, ours = clip_pair
    with pytest.raises(ValueError, match="feature"):
        ours.vision_model(models.pixels(1, 40), feature_layers=bad)


@torch.no_grad()
def test_sharded_checkpoint_and_tower_loading(clip_pair, tmp_path):
    hf, _, _ = clip_pair
    path = models.save(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    px = models.pixels(2, 40, seed=7)
    ref = hf.vision_model(pixel_values=px)
    assert_pooled_output(vitriton.from_pretrained(path, tower="vision")(px), ref, "tower='vision'")
    assert_pooled_output(vitriton.CLIPVisionModel.from_pretrained(path)(px), ref, "CLIPVisionModel.from_pretrained")
    ids, mask = models.text(2, 7, seed=7)
    text = vitriton.CLIPTextModel.from_pretrained(path)
    assert_pooled_output(text(ids, mask), hf.text_model(input_ids=ids, attention_mask=mask), "text tower")


@torch.no_grad()
def test_standalone_tower_checkpoints(clip_pair, siglip_pair, tmp_path):
    """Towers saved by transformers 5 (no prefix) and in the hub's older layout (vision_model.*)."""
    hf, _, _ = clip_pair
    px = models.pixels(2, 40, seed=8)
    ref = hf.vision_model(pixel_values=px)
    path = models.save(hf.vision_model, tmp_path / "tower")
    assert_pooled_output(vitriton.from_pretrained(path)(px), ref, "transformers 5 tower")
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "config.json").write_text((path / "config.json").read_text())
    state = {f"vision_model.{k}": v.contiguous() for k, v in hf.vision_model.state_dict().items()}
    save_file(state, nested / "model.safetensors")
    assert_pooled_output(vitriton.from_pretrained(nested)(px), ref, "nested tower")
    shf, _, _ = siglip_pair
    spx = models.pixels(2, 35, seed=8)
    spath = models.save(shf.vision_model, tmp_path / "siglip_tower")
    assert_pooled_output(vitriton.from_pretrained(spath)(spx), shf.vision_model(pixel_values=spx), "siglip tower")


@torch.no_grad()
def test_llava_style_prefix(clip_pair, tmp_path):
    """LoRAX-style construction from a checkpoint that nests the tower under vision_tower.vision_model."""
    hf, _, _ = clip_pair
    state = {f"vision_tower.vision_model.{k}": v.contiguous() for k, v in hf.vision_model.state_dict().items()}
    state["language_model.lm_head.weight"] = torch.randn(5, 4)
    save_file(state, tmp_path / "model.safetensors")
    config = CLIPVisionConfig(**models.CLIP_VISION)
    tower = CLIPVisionTransformer("vision_tower.vision_model", config, Weights(tmp_path)).eval()
    px = models.pixels(2, 40, seed=9)
    ref = hf.vision_model(pixel_values=px, output_hidden_states=True)
    assert_pooled_output(tower(px, output_hidden_states=True), ref, "llava prefix")


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_towers_of_no_layers(family):
    """num_hidden_layers=0: the embeddings go straight to the head, and hidden_states is empty, as in transformers."""
    torch.manual_seed(2)
    empty = dict(num_hidden_layers=0)
    if family == "clip":
        config = CLIPConfig(text_config={**models.CLIP_TEXT, **empty}, vision_config={**models.CLIP_VISION, **empty})
        hf, size = CLIPModel(config).eval(), models.CLIP_VISION["image_size"]
    else:
        config = SiglipConfig(
            text_config={**models.SIGLIP_TEXT, **empty}, vision_config={**models.SIGLIP_VISION, **empty}
        )
        hf, size = SiglipModel(config).eval(), models.SIGLIP_VISION["image_size"]
    ours = vitriton.from_transformers(models.perturb_vectors(hf), device="cpu")
    ids, mask = models.text(2, 6)
    for tower, reference, inputs in (
        (ours.vision_model, hf.vision_model, (models.pixels(2, size),)),
        (ours.text_model, hf.text_model, (ids, mask)),
    ):
        got, expected = tower(*inputs, output_hidden_states=True), reference(*inputs, output_hidden_states=True)
        assert got.hidden_states == () == expected.hidden_states
        assert_pooled_output(got, expected, f"{family} {type(tower).__name__}")


@torch.no_grad()
@pytest.mark.parametrize("act", ["gelu_new", "gelu_fast", "gelu_python", "relu", "silu"])
def test_activations_beyond_the_fused_ones(act):
    """Aliases of a fused activation run fused; any other of transformers' activations runs after fc1."""
    torch.manual_seed(3)
    hf = CLIPVisionModel(CLIPVisionConfig(**{**models.CLIP_VISION, "hidden_act": act})).eval()
    ours = vitriton.from_transformers(models.perturb_vectors(hf), device="cpu")
    pixels = models.pixels(2, models.CLIP_VISION["image_size"])
    assert_pooled_output(ours(pixels), hf(pixels), act)


@torch.no_grad()
@pytest.mark.parametrize("act", ["prelu", "xielu"])
def test_activations_with_their_own_tensors(act, tmp_path):
    """prelu's slope and xielu's alphas are checkpoint tensors (mlp.activation_fn.*): trained values, not a fresh
    module's, reach the output, and the state dict holds them under transformers' keys."""
    torch.manual_seed(4)
    hf = models.perturb_vectors(CLIPVisionModel(CLIPVisionConfig(**{**models.CLIP_VISION, "hidden_act": act})).eval())
    pixels = models.pixels(2, models.CLIP_VISION["image_size"])
    ours = vitriton.from_pretrained(models.save(hf, tmp_path))
    assert_pooled_output(ours(pixels), hf(pixels), act)
    assert ours.state_dict().keys() == hf.state_dict().keys()
    patched = vitriton.patch(copy.deepcopy(hf))
    assert_pooled_output(patched(pixels), hf(pixels), f"{act} patched")


def test_an_unknown_activation_is_named():
    hf = CLIPVisionModel(CLIPVisionConfig(**{**models.CLIP_VISION, "hidden_act": "gelu"})).eval()
    hf.config.hidden_act = "nope"
    with pytest.raises(ValueError, match="hidden_act 'nope' is not one of transformers' activations"):
        vitriton.from_transformers(hf, device="cpu")


@torch.no_grad()
@pytest.mark.parametrize("projection_size", [0, 5, None])
def test_siglip_text_projection_size(projection_size):
    """The text head's width is projection_size, hidden_size only when it is None (0 gives an empty embedding)."""
    torch.manual_seed(5)
    config = transformers.SiglipTextConfig(**{**models.SIGLIP_TEXT, "projection_size": projection_size})
    hf = models.perturb_vectors(transformers.SiglipTextModel(config).eval())
    ids, mask = models.text(2, 6)
    got, expected = vitriton.from_transformers(hf, device="cpu")(ids, mask), hf(ids, mask)
    assert got.pooler_output.shape == expected.pooler_output.shape
    if projection_size != 0:
        assert_pooled_output(got, expected, "siglip text")


@torch.no_grad()
def test_siglip_takes_any_grid_of_its_patch_count(siglip_pair):
    """As transformers: a 1 x 25 grid where the config's is 5 x 5 (the position table added row by row, the pixels
    that fill no whole patch dropped); a patch count the table does not hold raises."""
    hf, _, ours = siglip_pair
    patch, size = models.SIGLIP_VISION["patch_size"], models.SIGLIP_VISION["image_size"]
    count = (size // patch) ** 2
    pixels = torch.randn(2, 3, patch + 2, patch * count + 3, generator=torch.Generator().manual_seed(5))
    assert_pooled_output(ours.vision_model(pixels), hf.vision_model(pixels), "siglip 1 x 25 grid")
    with pytest.raises(ValueError, match=f"gives {count - 1} patches"):
        ours.vision_model(pixels[:, :, :, : patch * (count - 1)])


@torch.no_grad()
def test_empty_batch(clip_pair):
    _, _, ours = clip_pair
    out = ours(torch.zeros(0, 11, dtype=torch.long), models.pixels(0, 40))
    assert out.logits_per_image.shape == (0, 0)
    assert out.vision_model_output.last_hidden_state.shape == (0, 26, 144)
    assert out.text_model_output.pooler_output.shape == (0, 48)


@torch.no_grad()
def test_llava_checkpoints_both_layouts(clip_pair, tmp_path):
    """A tower class loads the vision tower of a LLaVA checkpoint as transformers 5 saves it
    (vision_tower.embeddings...) and in the older layout (vision_tower.vision_model.embeddings...)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    hf, _, _ = clip_pair
    text = LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=hf.config.vision_config.to_dict(), text_config=text.to_dict(), image_token_id=5)
    )
    llava.model.vision_tower.load_state_dict(hf.vision_model.state_dict())
    new = models.save(llava, tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((new / "config.json").read_text())
    state = {f"vision_tower.vision_model.{k}": v.contiguous() for k, v in hf.vision_model.state_dict().items()}
    save_file(state, old / "model.safetensors")
    px = models.pixels(1, 40, seed=10)
    ref = hf.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    for path in (new, old):
        tower = vitriton.CLIPVisionModel.from_pretrained(path, feature_layers=-2)
        assert len(tower.vision_model.encoder.layers) == 1  # the last layer is never loaded
        assert_matches(tower(px, feature_layers=-2).hidden_states[0], ref, path.name)


def count_accumulates(monkeypatch) -> list[int]:
    """Counts ``RowParallelLinear.accumulate`` calls: the single-rank stream path's projections."""
    calls, original = [], RowParallelLinear.accumulate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RowParallelLinear, "accumulate", counted)
    return calls


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_single_rank_stream_against_the_pair(family, clip_pair, siglip_pair, monkeypatch):
    """One rank carries the residual stream with the biases travelling to the LayerNorms as shifts
    (``Encoder.forward_accumulated``); tensor parallelism's (delta, residual) pair gives the same outputs, hidden
    states and attention weights, and both match transformers."""
    hf, _, ours = clip_pair if family == "clip" else siglip_pair
    px, (ids, mask) = models.pixels(2, 40 if family == "clip" else 35, seed=4), models.text(2, 9, seed=4)
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    calls = count_accumulates(monkeypatch)
    stream = ours(input_ids=ids, pixel_values=px, attention_mask=mask, **kwargs)
    layers = len(ours.vision_model.encoder.layers) + len(ours.text_model.encoder.layers)
    assert len(calls) == 2 * layers
    monkeypatch.setattr(trunk, "ACCUMULATE_RESIDUAL", False)
    calls.clear()
    pair = ours(input_ids=ids, pixel_values=px, attention_mask=mask, **kwargs)
    assert not calls
    ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask, **kwargs)
    for tower in ("vision_model_output", "text_model_output"):
        ours_stream, ours_pair = stream[tower], pair[tower]
        assert_matches(ours_stream.last_hidden_state, ours_pair.last_hidden_state, f"{tower} last_hidden_state")
        assert_matches(ours_stream.pooler_output, ours_pair.pooler_output, f"{tower} pooler_output")
        for key in ("hidden_states", "attentions"):
            for i, (a, b) in enumerate(zip(ours_stream[key], ours_pair[key], strict=True)):
                assert_matches(a, b, f"{tower} {key}[{i}]")
        assert_pooled_output(ours_stream, ref[tower], tower)


@torch.no_grad()
def test_biases_changed_in_place_reach_the_stream(clip_pair):
    """The carried biases are summed on every call, so a bias changed in place (a merged adapter, a loaded
    state dict) changes the output as it does transformers'."""
    hf, path, _ = clip_pair
    ours, hf = vitriton.from_pretrained(path), copy.deepcopy(hf)
    px = models.pixels(2, 40, seed=6)
    before = ours.get_image_features(px).pooler_output
    # Not the same change in every column: the LayerNorms after a bias would cancel that, up to rounding.
    changes = torch.randn(2, ours.config.vision_config.hidden_size, generator=torch.Generator().manual_seed(6))
    for model in (ours, hf):
        layers = model.vision_model.encoder.layers
        layers[0].mlp.fc2.bias.add_(changes[0])
        layers[-1].self_attn.out_proj.bias.sub_(changes[1])
    after = ours.get_image_features(px).pooler_output
    assert (after - before).abs().max() > 1e-2
    assert_matches(after, hf.get_image_features(px).pooler_output, "image features after the bias change")


@torch.no_grad()
def test_a_hook_inside_a_layer_sees_its_module_called(clip_pair, monkeypatch):
    """A hook on a module inside a layer (here fc2) runs: that forward takes the (delta, residual) pair path,
    whose modules are called as modules."""
    hf, _, ours = clip_pair
    seen = []
    fc2 = ours.vision_model.encoder.layers[1].mlp.fc2
    handle = fc2.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    calls = count_accumulates(monkeypatch)
    try:
        px = models.pixels(2, 40, seed=7)
        out = ours.vision_model(px)
    finally:
        handle.remove()
    assert len(seen) == 1 and not calls
    assert_matches(out.pooler_output, hf.vision_model(px).pooler_output, "pooler_output with a hook on fc2")


@torch.no_grad()
def test_towers_of_composite_checkpoints(clip_pair, siglip_pair, tmp_path):
    """vitriton.from_pretrained(tower=) and the tower classes take a CLIP/SigLIP tower out of the checkpoint of a
    model vitriton does not implement, wherever its config holds the tower's: a VisionTextDualEncoderModel's
    vision_config and text_config, a VisionEncoderDecoderModel's encoder."""
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    hf, _, _ = clip_pair
    shf, _, _ = siglip_pair
    dual = VisionTextDualEncoderModel(
        VisionTextDualEncoderConfig.from_vision_text_configs(shf.config.vision_config, hf.config.text_config)
    )
    dual.vision_model.load_state_dict(shf.vision_model.state_dict())
    dual.text_model.load_state_dict(hf.text_model.state_dict())
    decoder = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16, add_cross_attention=True)
    captioner = VisionEncoderDecoderModel(
        VisionEncoderDecoderConfig.from_encoder_decoder_configs(hf.config.vision_config, decoder)
    )
    captioner.encoder.load_state_dict(hf.vision_model.state_dict())
    dual_path, captioner_path = models.save(dual, tmp_path / "dual"), models.save(captioner, tmp_path / "captioner")

    spx, px = models.pixels(2, 35, seed=11), models.pixels(2, 40, seed=11)
    ids, mask = models.text(2, 9, seed=11)
    vision, text = (
        vitriton.from_pretrained(dual_path, tower="vision"),
        vitriton.from_pretrained(dual_path, tower="text"),
    )
    assert (type(vision), type(text)) == (vitriton.SiglipVisionModel, vitriton.CLIPTextModel)
    assert_pooled_output(vision(spx), shf.vision_model(pixel_values=spx), "dual encoder's vision tower")
    assert_pooled_output(text(ids, mask), hf.text_model(input_ids=ids, attention_mask=mask), "dual encoder's text")
    ref = hf.vision_model(pixel_values=px)
    for tower in (
        vitriton.from_pretrained(captioner_path, tower="vision"),
        vitriton.CLIPVisionModel.from_pretrained(captioner_path),
    ):
        assert type(tower) is vitriton.CLIPVisionModel
        assert_pooled_output(tower(px), ref, "encoder-decoder's encoder")
