"""Gradients through vitriton models: the Triton kernels have no backward, so while autograd records the ops run
their eager references, and gradients to the inputs (saliency, adversarial inputs, a trainable adapter in front)
and to parameters a caller unfroze match transformers'. Under no_grad and inference_mode the kernels run."""

from __future__ import annotations

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
