"""Gradients through vitriton models: the Triton kernels have no backward, so while autograd records the ops run
their eager references, and gradients to the inputs (saliency, adversarial inputs, a trainable adapter in front)
and to parameters a caller unfroze match transformers'. Under no_grad and inference_mode the kernels run."""

from __future__ import annotations

import pytest
import torch

import vitriton
from tests.encoders import models
from tests.helpers import relative_error, triton_calls


def test_pixel_gradients_match_transformers():
    hf = models.clip_model().vision_model
    ours = vitriton.from_transformers(hf, dtype=torch.float32)
    grads, outs = [], []
    for model in (hf, ours):
        x = models.pixels(2, 40, seed=3).requires_grad_()
        out = model(pixel_values=x).pooler_output
        out.square().sum().backward()
        grads.append(x.grad)
        outs.append(out.detach())
    assert relative_error(outs[1], outs[0]) <= 1e-4
    assert grads[1].norm() > 0 and relative_error(grads[1], grads[0]) <= 1e-4
    before = sum(triton_calls().values())
    with torch.no_grad():
        ours(models.pixels(2, 40, seed=3))
    assert sum(triton_calls().values()) > before, "under no_grad the Triton kernels run"


def backward_both(hf: torch.nn.Module, x: torch.Tensor, loss, **kwargs) -> tuple[torch.nn.Module, dict]:
    """A trainable vitriton copy of the transformers tower ``hf``; both run ``loss(model(x, **kwargs))`` backward.
    Returns the copy and transformers' parameters by name."""
    ours = vitriton.from_transformers(hf, dtype=torch.float32)
    ours.requires_grad_(True)
    for model in (hf, ours):
        loss(model(pixel_values=x, **kwargs)).backward()
    return ours, dict(hf.named_parameters())


def test_unfrozen_parameters_get_transformers_gradients():
    hf = models.siglip_model().vision_model
    ours, theirs = backward_both(hf, models.pixels(2, 35, seed=4), lambda out: out.pooler_output.square().sum())
    pairs = {
        "embeddings.patch_embedding.weight": ours.vision_model.embeddings.patch_weight,
        "encoder.layers.0.mlp.fc1.weight": ours.vision_model.encoder.layers[0].mlp.fc1.weight,
        "encoder.layers.1.layer_norm1.weight": ours.vision_model.encoder.layers[1].layer_norm1.weight,
        "head.mlp.fc2.bias": ours.vision_model.head.mlp.fc2.bias,
    }
    for name, parameter in pairs.items():
        assert parameter.grad is not None, name
        assert relative_error(parameter.grad, theirs[name].grad) <= 1e-4, name


def test_parameters_that_feed_no_loss_keep_grad_none():
    # LLaVA's loss reads the second-to-last hidden state: the last layer's parameters get no gradient at all in
    # transformers (None, which optimizers skip), and must not get zeros here either
    hf = models.clip_model().vision_model
    x = models.pixels(2, 40, seed=5)
    ours, theirs = backward_both(hf, x, lambda out: out.hidden_states[-2].square().sum(), output_hidden_states=True)
    shared = [(name, p) for name, p in ours.vision_model.named_parameters() if name in theirs]
    assert any("fc2.bias" in name for name, _ in shared)
    for name, parameter in shared:
        assert (parameter.grad is None) == (theirs[name].grad is None), name
        if parameter.grad is not None:
            assert relative_error(parameter.grad, theirs[name].grad) <= 1e-4, name


def test_gradient_checkpointing_recomputes_layers_with_transformers_gradients():
    # transformers' gradient_checkpointing_enable: in training mode each checkpointed layer runs again in backward
    # (every_n_layers=2: the first of two), and the gradients are those without it
    hf = models.siglip_model().vision_model.train()
    ours = vitriton.from_transformers(hf, dtype=torch.float32).train().requires_grad_(True)
    assert ours.supports_gradient_checkpointing and not ours.is_gradient_checkpointing
    for model in (hf, ours):
        model.gradient_checkpointing_enable(every_n_layers=2)
    layers = ours.encoder.layers
    assert ours.is_gradient_checkpointing and [layer.gradient_checkpointing for layer in layers] == [True, False]
    calls = []
    layers[0].mlp.fc1.register_forward_hook(lambda *_: calls.append(0))
    x = models.pixels(2, 35, seed=6)
    for model in (hf, ours):
        model(pixel_values=x).pooler_output.square().sum().backward()
    assert len(calls) == 2, "the checkpointed layer runs in the forward and again in the backward"
    theirs = dict(hf.named_parameters())
    for name in ("encoder.layers.0.mlp.fc1.weight", "encoder.layers.1.self_attn.out_proj.bias", "head.probe"):
        assert relative_error(ours.get_parameter(name).grad, theirs[name].grad) <= 1e-4, name
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing


@pytest.mark.parametrize("part", ["model", "text_model", "vision_model"])
def test_gradient_checkpointing_makes_text_embeddings_require_grad_as_transformers(part):
    # transformers' gradient_checkpointing_enable on a model whose main input is input_ids (a text tower, the dual
    # encoders) hooks the input embeddings of each model it holds, so that a frozen model's hidden states require
    # grad (for adapters); a vision tower's stay as they were
    clip = models.clip_model().requires_grad_(False)
    hf = clip if part == "model" else getattr(clip, part)
    ids, mask = models.text(2, 11)
    inputs = {
        "model": dict(input_ids=ids, pixel_values=models.pixels(2, 40), attention_mask=mask),
        "text_model": dict(input_ids=ids),
        "vision_model": dict(pixel_values=models.pixels(2, 40)),
    }[part]
    ours = vitriton.from_transformers(hf, dtype=torch.float32)
    requires = []
    for model in (hf, ours):
        model.gradient_checkpointing_enable()
        out = model(**inputs)
        outs = [out.text_model_output, out.vision_model_output] if part == "model" else [out]
        requires.append([o.last_hidden_state.requires_grad for o in outs])
    assert requires[0] == requires[1] == ([True, True] if part == "model" else [part == "text_model"])
