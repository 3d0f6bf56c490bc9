"""vitriton's classes called exactly as transformers' are, with the same positional and keyword arguments:
the same outputs (fp32, 1e-4 relative), tuples with return_dict=False, attention weights, losses."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers.utils import ModelOutput

import vitriton
from tests.encoders import models


def assert_same(ours, ref, what: str = "output") -> None:
    """Field by field (ModelOutput) or item by item (tuple), recursively, within 1e-4 relative."""
    if isinstance(ref, ModelOutput):
        assert isinstance(ours, type(ref)), f"{what}: {type(ours).__name__} is not a {type(ref).__name__}"
        assert list(ours.keys()) == list(ref.keys()), f"{what}: fields {list(ours.keys())} != {list(ref.keys())}"
        for key in ref.keys():
            assert_same(ours[key], ref[key], f"{what}.{key}")
    elif isinstance(ref, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(ref), f"{what}: {type(ours)} of {len(ours)} != {len(ref)}"
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            assert_same(a, b, f"{what}[{i}]")
    elif ref is None:
        assert ours is None, f"{what}: {type(ours).__name__} where transformers gives None"
    else:
        assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
        scale = max(ref.abs().max().item(), 1e-6)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{what}: {m}")


def eager(model):
    """transformers returns attention weights from its eager attention only."""
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def clip_pair():
    hf = eager(models.clip_model())
    return hf, vitriton.from_transformers(hf)


@pytest.fixture(scope="module")
def siglip_pair():
    hf = eager(models.siglip_model())
    return hf, vitriton.from_transformers(hf)


def pair(family, clip_pair, siglip_pair):
    return (clip_pair if family == "clip" else siglip_pair), (40 if family == "clip" else 35)


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_inner_towers_take_what_outer_models_pass(family, clip_pair, siglip_pair):
    """The calls transformers' CLIPModel / SiglipModel / LLaVA make on .vision_model / .text_model / vision_tower."""
    (hf, ours), size = pair(family, clip_pair, siglip_pair)
    px = models.pixels(2, size, seed=11)
    ids, mask = models.text(2, 9, seed=11)
    call = dict(interpolate_pos_encoding=False, return_dict=True, output_hidden_states=True, output_attentions=True)
    assert_same(ours.vision_model(pixel_values=px, **call), hf.vision_model(pixel_values=px, **call), "vision")
    llava = dict(output_hidden_states=True, return_dict=True, image_sizes=None)
    assert_same(ours.vision_model(px, **llava), hf.vision_model(px, **llava), "vision as LLaVA calls it")
    text = dict(input_ids=ids, attention_mask=mask, position_ids=None, return_dict=True, output_attentions=True)
    assert_same(ours.text_model(**text), hf.text_model(**text), "text")


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_full_model_positional_tuple_and_loss(family, clip_pair, siglip_pair):
    (hf, ours), size = pair(family, clip_pair, siglip_pair)
    px = models.pixels(3, size, seed=12)
    ids, mask = models.text(3, 10, seed=12)
    args = (ids, px, mask, None, True, False)  # input_ids, pixel_values, attention_mask, position_ids, return_loss, ...
    ref = hf(*args, return_dict=False, output_hidden_states=True)
    out = ours(*args, return_dict=False, output_hidden_states=True)
    assert_same(out, ref, family)
    assert ref[0].dim() == 0 and torch.isfinite(out[0])  # the loss comes first
    assert_same(ours(*args), hf(*args), f"{family} dict")


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_features_and_towers_as_transformers(family, clip_pair, siglip_pair):
    (hf, ours), size = pair(family, clip_pair, siglip_pair)
    px = models.pixels(2, size, seed=13)
    ids, mask = models.text(2, 8, seed=13)
    features = dict(return_dict=False)
    assert_same(ours.get_image_features(px, False, **features), hf.get_image_features(px, False, **features))
    assert_same(ours.get_text_features(ids, mask, None), hf.get_text_features(ids, mask, None))
    vision_cls = getattr(transformers, f"{'CLIP' if family == 'clip' else 'Siglip'}VisionModel")
    hf_vision = eager(vision_cls(hf.config.vision_config).eval())
    hf_vision.load_state_dict(hf.vision_model.state_dict())
    ours_vision = vitriton.from_transformers(hf_vision)
    assert type(ours_vision).__name__ == vision_cls.__name__
    assert_same(ours_vision(px, False, output_attentions=True), hf_vision(px, False, output_attentions=True))


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hidden_states_of_chosen_layers(family, clip_pair, siglip_pair):
    """transformers 5.17 takes ``output_hidden_states`` as a list (tuple, set) of layer indices: hidden_states then
    has one place per layer, the chosen layers' outputs and None elsewhere (no embeddings state; an index out of
    range chooses nothing). Towers, features and the full model alike."""
    (hf, ours), size = pair(family, clip_pair, siglip_pair)
    px, (ids, mask) = models.pixels(2, size, seed=9), models.text(2, 9, seed=9)
    for layers in ([1], [0, 1], (0,), {1, 7}, [5], [-1], []):
        ref = hf.vision_model(px, output_hidden_states=layers)
        assert_same(ours.vision_model(px, output_hidden_states=layers), ref, f"vision {layers}")
        ref = hf.text_model(ids, mask, output_hidden_states=layers, return_dict=False)
        assert_same(ours.text_model(ids, mask, output_hidden_states=layers, return_dict=False), ref, f"text {layers}")
    assert_same(ours(ids, px, mask, output_hidden_states=[0]), hf(ids, px, mask, output_hidden_states=[0]), "full")
    ref = hf.get_image_features(px, output_hidden_states=[1])
    assert_same(ours.get_image_features(px, output_hidden_states=[1]), ref, "image features")


@torch.no_grad()
def test_feature_layers_on_features(clip_pair):
    hf, ours = clip_pair
    px = models.pixels(2, 40, seed=14)
    ref = hf.vision_model(px, output_hidden_states=True).hidden_states
    out = ours.get_image_features(px, feature_layers=[-2, 1])
    assert out.pooler_output is None
    assert_same(out.hidden_states, (ref[-2], ref[1]), "feature layers")
    full = ours.get_image_features(px, feature_layers=-1)
    assert_same(full.pooler_output, hf.get_image_features(px).pooler_output, "projected with the last layer")


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_fully_padded_text_row(family, implementation):
    """A row whose mask is all zeros: transformers' sdpa path gives its queries zeros, its eager path (used for
    output_attentions) uniform weights over all keys; vitriton gives each the same answer."""
    hf = models.clip_model() if family == "clip" else models.siglip_model()
    hf = hf.text_model
    hf.set_attn_implementation(implementation)
    ours = vitriton.from_transformers(hf)
    ids, mask = models.text(3, 8, seed=15)
    mask[1] = 0
    weights = implementation == "eager"
    ref = hf(ids, mask, output_attentions=weights)
    assert_same(ours(ids, mask, output_attentions=weights), ref, implementation)


@torch.no_grad()
def test_with_projection_classes_load_as_themselves(tmp_path):
    full = models.clip_model()
    vision = transformers.CLIPVisionModelWithProjection(full.config.vision_config).eval()
    text = transformers.CLIPTextModelWithProjection(full.config.text_config).eval()
    px = models.pixels(2, 40, seed=16)
    ids, mask = models.text(2, 7, seed=16)
    for hf, args in ((vision, (px,)), (text, (ids, mask))):
        ours = vitriton.from_pretrained(models.save(hf, tmp_path / type(hf).__name__))
        assert type(ours).__name__ == type(hf).__name__
        assert_same(ours(*args, output_hidden_states=True), hf(*args, output_hidden_states=True), type(hf).__name__)
        assert_same(ours(*args, return_dict=False), hf(*args, return_dict=False), f"{type(hf).__name__} tuple")


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("part", ["full", "vision", "text"])
def test_model_attributes_as_transformers(family, part, clip_pair, siglip_pair):
    """What code around a model reads from it: main_input_name, device, dtype, num_parameters (also without the
    embeddings) and get_input_embeddings (SiglipModel's is the text tower's; CLIPModel has none)."""
    (hf_full, _), _ = pair(family, clip_pair, siglip_pair)
    hf = {"full": hf_full, "vision": hf_full.vision_model, "text": hf_full.text_model}[part]
    ours = vitriton.from_transformers(hf, dtype=torch.float32)
    assert ours.main_input_name == hf.main_input_name
    assert (ours.device, ours.dtype) == (hf.device, hf.dtype)
    assert ours.num_parameters() == hf.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    assert ours.num_parameters(only_trainable=True) == 0  # frozen: vitriton is for inference
    if part == "full" and family == "clip":
        with pytest.raises(NotImplementedError):
            hf.get_input_embeddings()
        with pytest.raises(NotImplementedError, match="two input embeddings"):
            ours.get_input_embeddings()
    else:
        weight = hf.get_input_embeddings().weight
        ours_weight = getattr(ours.get_input_embeddings(), "weight", None)
        theirs = ours.get_input_embeddings().patch_weight if ours_weight is None else ours_weight
        assert torch.equal(theirs, weight)


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_jit_trace_follows_the_batch(family, clip_pair, siglip_pair):
    """``torch.jit.trace`` (the older route to ONNX) records the eager references: each tower traced at batch 2
    runs batch 3 as transformers' does, images and masked text. (transformers' full models do not trace: their
    outputs nest ModelOutputs.)"""
    (hf, ours), size = pair(family, clip_pair, siglip_pair)
    px, (ids, mask) = models.pixels(2, size, seed=3), models.text(2, 9, seed=3)
    vision = torch.jit.trace(ours.vision_model, (px,), strict=False)
    text = torch.jit.trace(ours.text_model, (ids, mask), strict=False)
    px, (ids, mask) = models.pixels(3, size, seed=4), models.text(3, 9, seed=4)
    for got, ref in ((vision(px), hf.vision_model(px)), (text(ids, mask), hf.text_model(ids, mask))):
        for key in ("last_hidden_state", "pooler_output"):
            assert_same(got[key], ref[key], key)


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_layer_hooks_see_transformers_hidden_states(family, clip_pair, siglip_pair):
    """A forward hook on an encoder layer gets that layer's output hidden states, as in transformers, and what
    it returns replaces them; pre-hooks see the layer's input. Vision and masked text towers."""
    (hf, ours), size = pair(family, clip_pair, siglip_pair)
    px, (ids, mask) = models.pixels(2, size, seed=6), models.text(2, 9, seed=6)
    for tower, call in (("vision_model", lambda m: m(px)), ("text_model", lambda m: m(ids, mask))):
        seen = {}

        def keep(name, seen=seen):
            def hook(module, args, out):
                seen.setdefault(name, []).append((args[0], out))
                return out * 0.5  # replaces the layer's output downstream

            return hook

        handles = [getattr(model, tower).encoder.layers[1].register_forward_hook(keep(name))
                   for name, model in (("hf", hf), ("ours", ours))]  # fmt: skip
        try:
            ref, got = call(getattr(hf, tower)), call(getattr(ours, tower))
        finally:
            for handle in handles:
                handle.remove()
        (hf_in, hf_out), (our_in, our_out) = seen["hf"][0], seen["ours"][0]
        assert type(our_out) is torch.Tensor
        assert_same(our_in, hf_in, f"{tower} layer 1 input")
        assert_same(our_out, hf_out, f"{tower} layer 1 output")
        assert_same(got.pooler_output, ref.pooler_output, f"{tower} pooled, output halved by the hook")


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_fused_activation_module_takes_hooks_and_replacement(family, clip_pair, siglip_pair):
    """``mlp.activation_fn`` is transformers' module even where the activation is fused into fc1 (quick_gelu,
    gelu_pytorch_tanh): a hook on it sees the activations transformers gives it (neuron probes), and a module put
    in its place runs."""
    (hf, ours), size = pair(family, clip_pair, siglip_pair)
    px = models.pixels(1, size, seed=7)
    seen = {}
    handles = [model.vision_model.encoder.layers[1].mlp.activation_fn.register_forward_hook(
                   lambda module, args, out, name=name: seen.setdefault(name, out))
               for name, model in (("hf", hf), ("ours", ours))]  # fmt: skip
    try:
        ref, got = hf.get_image_features(px), ours.get_image_features(px)
    finally:
        for handle in handles:
            handle.remove()
    assert_same(seen["ours"], seen["hf"], "layer 1 activations")
    assert_same(got.pooler_output, ref.pooler_output, "image embeddings while hooked")
    mlp = ours.vision_model.encoder.layers[1].mlp
    activation, mlp.activation_fn = mlp.activation_fn, torch.nn.Identity()
    try:
        assert not torch.allclose(ours.get_image_features(px).pooler_output, got.pooler_output)
    finally:
        mlp.activation_fn = activation


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_layer_backward_hooks_and_replaced_forward_run(family, clip_pair, siglip_pair):
    """What ``nn.Module.__call__`` does besides forward hooks reaches the layer too: a full backward hook (while
    gradients flow to the pixels) and a ``forward`` replaced on the instance, as accelerate's hooks replace it."""
    (hf, ours), size = pair(family, clip_pair, siglip_pair)
    for model in (hf, ours):
        layer = model.vision_model.encoder.layers[1]
        calls = []
        handle = layer.register_full_backward_hook(lambda module, grad_in, grad_out, calls=calls: calls.append(1))
        px = models.pixels(1, size, seed=8).requires_grad_()
        try:
            model.vision_model(px).pooler_output.sum().backward()
        finally:
            handle.remove()
        assert calls and px.grad is not None, type(model).__name__
        original = layer.forward
        layer.forward = lambda *args, original=original, **kwargs: original(*args, **kwargs) * 0.0
        try:
            with torch.no_grad():
                zeroed = model.vision_model(models.pixels(1, size, seed=8), output_hidden_states=True)
        finally:
            del layer.forward
        assert not zeroed.hidden_states[2].any(), type(model).__name__


@torch.no_grad()
@pytest.mark.parametrize("name", ["CLIPVisionModel", "CLIPTextModel", "SiglipVisionModel", "SiglipTextModel"])
def test_tower_classes_hold_transformers_parts(name):
    """transformers 5.17's tower classes hold the tower's parts themselves: ``model.encoder.layers[i]`` (to hook a
    layer), ``model.embeddings``, the final LayerNorm, SigLIP's ``head``. vitriton's hold the tower as a child and
    read those parts from it, the same modules; ``get_submodule`` and a copy of the model work too."""
    tower = "vision" if "Vision" in name else "text"
    hf = eager(transformers_model(name, tower, seed=5))
    ours = vitriton.from_transformers(hf)
    parts = ["embeddings", "encoder"]
    parts += ["pre_layrnorm", "post_layernorm"] if name == "CLIPVisionModel" else []
    parts += ["post_layernorm", "head"] if name == "SiglipVisionModel" else []
    parts += ["final_layer_norm"] if tower == "text" else []
    parts += ["head"] if name == "SiglipTextModel" else []
    inner = getattr(ours, f"{tower}_model")
    for part in parts:
        assert hasattr(hf, part), part
        assert getattr(ours, part) is getattr(inner, part), part
    assert ours.get_submodule("encoder.layers.1") is inner.encoder.layers[1]
    with pytest.raises(AttributeError, match=f"'{name}' object has no attribute 'no_such_part'"):
        ours.no_such_part  # noqa: B018
    copied = copy.deepcopy(ours)
    assert copied.encoder is copied.get_submodule(f"{tower}_model.encoder") is not inner.encoder

    seen = {}
    handles = [model.encoder.layers[1].register_forward_hook(lambda m, a, out, key=key: seen.setdefault(key, out))
               for key, model in (("hf", hf), ("ours", ours))]  # fmt: skip
    try:
        call(hf, tower, name), call(ours, tower, name)
    finally:
        for handle in handles:
            handle.remove()
    assert_same(seen["ours"], seen["hf"], "layer 1 output, hooked through model.encoder")


@torch.no_grad()
@pytest.mark.parametrize(("name", "part"), [("CLIPVisionModel", "post_layernorm"), ("SiglipVisionModel", "head"),
                                            ("CLIPTextModel", "final_layer_norm")])  # fmt: skip
def test_tower_classes_assign_the_towers_parts(name, part):
    """Assigning a part on a tower class (``model.head = nn.Identity()`` to take features) replaces the tower's
    part, as on transformers' classes, which hold it; deleting one deletes the tower's."""
    tower = "vision" if "Vision" in name else "text"
    hf = eager(transformers_model(name, tower, seed=6))
    ours = vitriton.from_transformers(hf)
    for model in (hf, ours):
        setattr(model, part, torch.nn.Identity())
    inner = getattr(ours, f"{tower}_model")
    assert isinstance(getattr(inner, part), torch.nn.Identity) and part not in ours._modules
    assert_same(call(ours, tower, name), call(hf, tower, name), f"{part} replaced")
    delattr(ours, part)
    assert part not in inner._modules


DROP_IN_CLASSES = [
    ("CLIPModel", None),
    ("SiglipModel", None),
    ("CLIPVisionModel", "vision"),
    ("CLIPTextModel", "text"),
    ("CLIPVisionModelWithProjection", "vision"),
    ("CLIPTextModelWithProjection", "text"),
    ("SiglipVisionModel", "vision"),
    ("SiglipTextModel", "text"),
]


def transformers_model(name: str, tower: str | None, seed: int):
    """A fresh transformers ``name`` with the test configs and random weights (biases and LayerNorms too)."""
    full = models.clip_model() if name.startswith("CLIP") else models.siglip_model()
    config = full.config if tower is None else getattr(full.config, f"{tower}_config")
    torch.manual_seed(seed)
    return models.perturb_vectors(getattr(transformers, name)(config).eval())


def call(model, tower: str | None, name: str):
    px = models.pixels(2, 40 if name.startswith("CLIP") else 35, seed=21)
    ids, mask = models.text(2, 9, seed=21)
    if tower is None:
        return model(ids, px, mask, output_hidden_states=True)
    return model(px, output_hidden_states=True) if tower == "vision" else model(ids, mask, output_hidden_states=True)


# The plain attributes transformers 5.17's classes set from their configs, which code around a model reads.
CLASS_ATTRIBUTES = {
    "CLIPModel": ("projection_dim", "text_embed_dim", "vision_embed_dim"),
    "CLIPTextModel": ("eos_token_id",),
    "SiglipVisionModel": ("use_head",),
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(CLASS_ATTRIBUTES))
def test_class_attributes_as_transformers(name):
    tower = dict(DROP_IN_CLASSES)[name]
    hf = transformers_model(name, tower, seed=3)
    ours = vitriton.from_transformers(hf)
    for attribute in CLASS_ATTRIBUTES[name]:
        assert getattr(ours, attribute) == getattr(hf, attribute), attribute
    if name == "CLIPTextModel":
        # transformers' forward pools at the first token equal to the eos_token_id the model holds when called
        ids, mask = models.text(2, 9, seed=22)
        before = ours(ids, mask).pooler_output
        hf.eos_token_id = ours.eos_token_id = int(ids[0, 1])
        assert_same(ours(ids, mask), hf(ids, mask), "eos_token_id set after construction")
        assert not torch.equal(ours(ids, mask).pooler_output, before)


@torch.no_grad()
@pytest.mark.parametrize(("name", "tower"), DROP_IN_CLASSES, ids=[name for name, _ in DROP_IN_CLASSES])
def test_set_input_embeddings_as_transformers(name, tower):
    """``set_input_embeddings``: a text tower (SiglipModel's too) takes a new ``nn.Embedding`` (a resized
    vocabulary: its ids are accepted, its table counts as embeddings, its weight is in the state dict);
    CLIPModel and CLIPVisionModelWithProjection raise NotImplementedError as transformers' do; a vision tower
    raises it too, since its patch embedding is not a module (transformers replaces the convolution)."""
    hf = transformers_model(name, tower, seed=7)
    ours = vitriton.from_transformers(hf)
    torch.manual_seed(8)
    table = torch.nn.Embedding(120, models.CLIP_TEXT["hidden_size"])
    if name in ("CLIPModel", "CLIPVisionModelWithProjection") or tower == "vision":
        unset = tower is None or name.endswith("WithProjection")
        if unset:
            with pytest.raises(NotImplementedError):
                hf.set_input_embeddings(table)
        with pytest.raises(NotImplementedError, match="input embeddings" if unset else "GEMM"):
            ours.set_input_embeddings(table)
        return
    for model in (hf, ours):
        model.set_input_embeddings(table)
        assert model.get_input_embeddings() is table
    ids, mask = models.text(2, 9, vocab=120, seed=8)
    ids[:, 1] = 119  # beyond the config's vocabulary of 99
    text = (lambda model: model.text_model) if tower is None else (lambda model: model)
    assert_same(text(ours)(ids, mask), text(hf)(ids, mask), "with the new table")
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    key = next(key for key in hf.state_dict() if key.endswith("token_embedding.weight"))
    assert ours.state_dict()[key] is not None and torch.equal(ours.state_dict()[key], table.weight)
    with pytest.raises(ValueError, match="token id 120 is outside the vocabulary of 120 tokens"):
        text(ours)(torch.full((1, 3), 120))

    class Wrapped(torch.nn.Module):  # a wrapper with no num_embeddings (an adapter's, say): its weight's rows count
        def __init__(self, inner):
            super().__init__()
            self.weight = inner.weight

        def forward(self, ids):
            return torch.nn.functional.embedding(ids, self.weight)

    ours.set_input_embeddings(Wrapped(table))
    with pytest.raises(ValueError, match="token id 120 is outside the vocabulary of 120 tokens"):
        text(ours)(torch.full((1, 3), 120))
    if tower is None:  # a patched model: transformers' own code puts the table in place
        patched = vitriton.patch(transformers_model(name, tower, seed=7))
        patched.text_model.embeddings.token_embedding = table
        assert_same(patched.text_model(ids, mask), text(hf)(ids, mask), "patched, table set by attribute")


@torch.no_grad()
@pytest.mark.parametrize(("name", "tower"), DROP_IN_CLASSES, ids=[name for name, _ in DROP_IN_CLASSES])
def test_state_dict_is_transformers(name, tower):
    """Both ways, strictly: vitriton's state dict has transformers' keys and shapes, and a transformers state dict
    loads into vitriton's model, in place, which then gives that model's outputs."""
    hf, other = transformers_model(name, tower, seed=3), transformers_model(name, tower, seed=4)
    ours = vitriton.from_transformers(hf)
    state = ours.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in hf.state_dict().items()}
    pointers = [p.data_ptr() for p in ours.parameters()]
    ours.load_state_dict(other.state_dict())
    assert [p.data_ptr() for p in ours.parameters()] == pointers  # copied in place: CUDA graphs see the new weights
    assert_same(call(ours, tower, name), call(other, tower, name), name)
    fresh = getattr(transformers, name)(other.config).eval()
    fresh.load_state_dict(ours.state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    ours.load_state_dict(ours.state_dict())  # vitriton to vitriton
    assert_same(call(ours, tower, name), call(other, tower, name), f"{name} reloaded")


@torch.no_grad()
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_load_state_dict_not_strict_reports_transformers_keys(family):
    """strict=False: the keys missing or unexpected are those transformers reports for the same state dict, and
    the tensors they name keep their values (a q/k/v part, the patch projection, SigLIP's packed in_proj)."""
    hf = models.clip_model() if family == "clip" else models.siglip_model()
    ours = vitriton.from_transformers(hf)
    torch.manual_seed(5)
    other = models.perturb_vectors(type(hf)(hf.config).eval()).state_dict()
    dropped = [
        "vision_model.encoder.layers.0.self_attn.k_proj.weight",
        "text_model.encoder.layers.1.self_attn.q_proj.bias",
        "vision_model.embeddings.patch_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
    ]
    if family == "siglip":
        dropped.append("vision_model.head.attention.in_proj_weight")
    partial = {k: v for k, v in other.items() if k not in dropped}
    partial["vision_model.encoder.layers.0.self_attn.extra"] = torch.zeros(1)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    result = ours.load_state_dict(partial, strict=False)
    reference = type(hf)(hf.config).load_state_dict(partial, strict=False)
    assert sorted(result.missing_keys) == sorted(reference.missing_keys) == sorted(dropped)
    assert result.unexpected_keys == reference.unexpected_keys
    after = ours.state_dict()
    for key, value in after.items():
        assert torch.equal(value, before[key] if key in dropped else other[key]), key
    with pytest.raises(RuntimeError, match="Missing key.*k_proj.weight"):
        ours.load_state_dict(partial)


@torch.no_grad()
def test_state_dict_under_any_prefix():
    """A transformers tower inside another model (LLaVA's ``vision_tower``) keeps its keys once patched, and a
    data-parallel wrapper's state dict is its tower's."""
    model = torch.nn.Module()
    model.vision_tower = transformers.SiglipVisionModel(models.siglip_model().config.vision_config).eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    vitriton.patch(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    model.load_state_dict(reference)
    wrapped = vitriton.parallel.DataParallel(model.vision_tower, None)
    assert list(wrapped.state_dict()) == list(model.vision_tower.state_dict())
    result = wrapped.load_state_dict({k.removeprefix("vision_tower."): v for k, v in reference.items()}, strict=False)
    assert result.missing_keys == result.unexpected_keys == []


@torch.no_grad()
@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("CLIPVisionModel", dict(output_hidden_states=True)),
        ("SiglipTextModel", dict(output_attentions=True, layer_norm_eps=0.25)),
        ("CLIPModel", dict(output_hidden_states=True, text_config={"layer_norm_eps": 0.25})),
    ],
)
def test_from_pretrained_config_keywords(name, overrides, tmp_path):
    """Keywords that name config attributes replace them, as transformers' from_pretrained passes them to the
    config: a tower's output flags, its fields, a sub-config's fields as a dict (and CLIPModel's own
    output_hidden_states, which transformers' towers do not read, so calls return no hidden states)."""
    tower = dict(DROP_IN_CLASSES)[name]
    transformers_model(name, tower, seed=4).save_pretrained(tmp_path)
    options = dict(attn_implementation="eager", **overrides)  # transformers returns attentions from eager only
    ref = getattr(transformers, name).from_pretrained(tmp_path, **options).eval()
    ours = getattr(vitriton, name).from_pretrained(tmp_path, **options)
    px = models.pixels(2, 40 if name.startswith("CLIP") else 35, seed=21)
    ids, mask = models.text(2, 9, seed=21)
    inputs = {"vision": (px,), "text": (ids, mask), None: (ids, px, mask)}[tower]
    assert_same(ours(*inputs), ref(*inputs), name)


@torch.no_grad()
@pytest.mark.parametrize(("name", "tower"), [DROP_IN_CLASSES[1], DROP_IN_CLASSES[2]], ids=["SiglipModel", "CLIPVision"])
def test_save_pretrained_loads_in_transformers(name, tower, tmp_path):
    """save_pretrained writes what transformers' from_pretrained loads (the same outputs), in the model's dtype,
    sharded above max_shard_size; saving again unsharded leaves no stale shard behind. A tower saves as its
    transformers model class."""
    hf = transformers_model(name, tower, seed=6)
    ours = vitriton.from_transformers(hf)
    ours.save_pretrained(tmp_path / "whole")
    loaded = getattr(transformers, name).from_pretrained(tmp_path / "whole").eval()
    assert_same(call(loaded, tower, name), call(hf, tower, name), name)
    assert_same(call(vitriton.from_pretrained(tmp_path / "whole"), tower, name), call(hf, tower, name), name)
    tower_module = ours.vision_model
    tower_module.save_pretrained(tmp_path / "tower", max_shard_size="200KB")
    assert (tmp_path / "tower" / "model.safetensors.index.json").is_file()
    vision_cls = getattr(transformers, f"{name[:4] if name.startswith('CLIP') else 'Siglip'}VisionModel")
    reloaded = vision_cls.from_pretrained(tmp_path / "tower").eval()
    pixels = models.pixels(2, 40 if name.startswith("CLIP") else 35, seed=22)
    assert_same(reloaded(pixels).pooler_output, ours.vision_model(pixels).pooler_output, "tower")
    tower_module.save_pretrained(tmp_path / "tower")
    assert sorted(p.name for p in (tmp_path / "tower").iterdir()) == ["config.json", "model.safetensors"]
    half = vitriton.from_transformers(hf, dtype=torch.float16)
    half.save_pretrained(tmp_path / "half", safe_serialization=False)  # safetensors anyway, as transformers 5.17
    assert getattr(transformers, name).from_pretrained(tmp_path / "half").dtype == torch.float16
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(NotImplementedError, match="push_to_hub is not implemented: call model.save_pretrained"):
        ours.save_pretrained(tmp_path / "hub", push_to_hub=True)
    with pytest.raises(NotImplementedError, match="push_to_hub is not implemented"):
        tower_module.push_to_hub("user/repo", commit_message="upload")


def dropout_pair(family: str, tower: str, p: float = 0.4):
    """A transformers tower with attention dropout ``p`` (eager attention, whose dropout vitriton's train mode
    reproduces draw for draw) and vitriton's from it, both in train mode."""
    full = models.clip_model() if family == "clip" else models.siglip_model()
    hf = eager(getattr(full, f"{tower}_model"))
    hf.config.attention_dropout = p
    for module in hf.modules():
        if hasattr(module, "q_proj"):  # the encoder's attention (SigLIP's pooling head has no dropout)
            module.dropout = p
    return hf.train(), vitriton.from_transformers(hf).train()


@torch.no_grad()
@pytest.mark.parametrize("inner_hook", [False, True], ids=["fused", "pair"])
@pytest.mark.parametrize(("family", "tower"), [("clip", "vision"), ("clip", "text"), ("siglip", "vision")])
def test_attention_dropout_in_train_mode(family, tower, inner_hook):
    """Train mode with attention_dropout: each call draws new masks, the same draws as transformers' eager
    attention from the same seed (so the same outputs), on the fused single-rank path and on the (delta, residual)
    path that a hook inside a layer selects; eval mode gives transformers' outputs without dropout."""
    hf, ours = dropout_pair(family, tower)
    px = models.pixels(2, 40 if family == "clip" else 35, seed=23)
    ids, mask = models.text(2, 9, seed=23)
    run = (lambda m: m(px)) if tower == "vision" else (lambda m: m(ids, mask))
    layer = getattr(ours, f"{tower}_model").encoder.layers[0]
    handle = layer.mlp.register_forward_hook(lambda *_: None) if inner_hook else None
    try:
        first, second = run(ours).last_hidden_state, run(ours).last_hidden_state
        assert not torch.equal(first, second)
        for seed in (0, 1):
            torch.manual_seed(seed)
            reference = run(hf)
            torch.manual_seed(seed)
            assert_same(run(ours), reference, f"train mode, seed {seed}")
        hf.eval(), ours.eval()
        assert_same(run(ours), run(hf), "eval mode")
        assert torch.equal(run(ours).last_hidden_state, run(ours).last_hidden_state)
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["auto", True])
def test_state_dict_dropout_and_saving_under_cuda_graphs(graphs, tmp_path):
    """With graph replays (automatic, or explicit buckets): a transformers state dict loaded in place reaches the
    replayed graphs; training mode with attention dropout runs eagerly (calls differ), eval mode replays again and
    matches transformers; a saved model loads in transformers with the same outputs. fp32 on the GPU, where the
    kernels' dots may take tf32: 1e-2 of the largest value, against a change the new weights make of about 1e-1."""

    def close(got, want, what):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * scale, msg=lambda m: f"{what}: {m}")

    hf, other = models.clip_model().cuda(), models.clip_model()
    generator = torch.Generator().manual_seed(9)
    for parameter in other.parameters():
        parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=0.05)
    other = other.cuda()
    px = models.pixels(2, 40, seed=1).cuda()
    ours = vitriton.from_transformers(hf, cuda_graphs=graphs)
    for _ in range(3):
        before = ours.get_image_features(px).pooler_output
    ours.load_state_dict(other.state_dict())
    want = other.get_image_features(px).pooler_output
    assert (before - want).abs().max() > 5e-2 * want.abs().max()
    close(ours.get_image_features(px).pooler_output, want, "features after load_state_dict")
    for module in ours.modules():
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.3
    ours.train()
    first, second = (ours.get_image_features(px).pooler_output for _ in range(2))
    assert not torch.equal(first, second)
    ours.eval()
    close(ours.get_image_features(px).pooler_output, want, "eval features after training mode")
    ours.save_pretrained(tmp_path)
    back = transformers.CLIPModel.from_pretrained(tmp_path).cuda().eval()
    close(back.get_image_features(px).pooler_output, want, "transformers' load of the saved model")
