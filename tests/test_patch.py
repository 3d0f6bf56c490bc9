"""``vitriton.patch``: transformers models accelerated in place give what they gave before, sharing their weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import (
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    SiglipVisionModel,
)

import vitriton
from tests.encoders import models
from tests.parallel.test_exit import free_port
from tests.parallel.test_tensor_parallel import run_model
from vitriton.encoders.clip import CLIPTextTransformer, CLIPVisionTransformer
from vitriton.encoders.siglip import SiglipTextTransformer, SiglipVisionTransformer
from vitriton.graphs import cuda_graph_runners
from vitriton.parallel.layers import SHARD_MULTIPLE, pad_shard


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def dual_inputs(image_size: int) -> dict[str, torch.Tensor]:
    ids, mask = models.text(3, 11, seed=5)
    return dict(input_ids=ids, pixel_values=models.pixels(3, image_size, seed=5), attention_mask=mask)


def run_dual(model, inputs) -> dict[str, torch.Tensor]:
    """The full model's outputs (hidden states included) and both get_*_features."""
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return {**run_model(model, inputs), "image_features": image.pooler_output, "text_features": text.pooler_output}


@pytest.mark.parametrize(
    ("build", "image_size", "towers"),
    [
        (models.clip_model, 40, (CLIPVisionTransformer, CLIPTextTransformer)),
        (models.siglip_model, 35, (SiglipVisionTransformer, SiglipTextTransformer)),
    ],
    ids=["clip", "siglip"],
)
def test_patch_keeps_the_full_models_outputs(build, image_size, towers):
    model = build()
    inputs = dual_inputs(image_size)
    expected = run_dual(model, inputs)
    outer = type(model)
    assert vitriton.patch(model) is model
    assert type(model) is outer
    assert type(model.vision_model) is towers[0] and type(model.text_model) is towers[1]
    for key, value in run_dual(model, inputs).items():
        close(value, expected[key])


def sampled_parameters(model) -> dict[str, torch.Tensor]:
    """Parameters found at the same attribute paths in transformers' CLIP and in vitriton's."""
    layer = model.vision_model.encoder.layers[0]
    return {
        "layer_norm1": layer.layer_norm1.weight,
        "out_proj": layer.self_attn.out_proj.weight,
        "fc1": layer.mlp.fc1.weight,
        "fc1_bias": layer.mlp.fc1.bias,
        "fc2": layer.mlp.fc2.weight,
        "post_layernorm": model.vision_model.post_layernorm.weight,
        "token_embedding": model.text_model.embeddings.token_embedding.weight,
    }


def test_patch_shares_the_transformers_tensors():
    model = models.clip_model()
    before = sampled_parameters(model)
    attention = model.vision_model.encoder.layers[0].self_attn
    qkv = torch.cat([getattr(attention, f"{p}_proj").weight for p in "qkv"]).clone()
    vitriton.patch(model)
    for name, tensor in sampled_parameters(model).items():
        assert tensor.data_ptr() == before[name].data_ptr(), f"{name} was copied"
    # The packed projection is one new tensor per layer, equal to the three it replaces.
    assert torch.equal(model.vision_model.encoder.layers[0].self_attn.qkv.weight, qkv)


def test_patch_a_tower_alone_keeps_the_object():
    vision = models.clip_model().vision_model
    text = models.clip_model().text_model
    assert type(text) is CLIPTextModel
    pixels = models.pixels(2, 40, seed=3)
    ids, mask = models.text(2, 11, seed=3)
    with torch.no_grad():
        expected_image = vision(pixels, output_hidden_states=True)
        expected_text = text(ids, mask)
    assert vitriton.patch(vision) is vision and vitriton.patch(text) is text
    # vitriton's tower, with transformers 5.17's children and model attributes.
    assert isinstance(vision, CLIPVisionTransformer) and isinstance(text, CLIPTextTransformer)
    assert vision.config.image_size == 40
    assert {"embeddings", "encoder", "post_layernorm"} <= dict(vision.named_children()).keys()
    assert (vision.device, vision.dtype, vision.main_input_name) == (torch.device("cpu"), torch.float32, "pixel_values")
    assert (text.main_input_name, vision.num_parameters()) == ("input_ids", sum(p.numel() for p in vision.parameters()))
    assert vision.get_input_embeddings() is vision.embeddings
    assert text.get_input_embeddings() is text.embeddings.token_embedding
    assert vitriton.patch(vision) is vision and isinstance(vision, CLIPVisionTransformer)
    with torch.no_grad():
        image = vision(pixels, output_hidden_states=True)
        out = text(ids, mask)
    close(image.pooler_output, expected_image.pooler_output)
    close(image.hidden_states[1], expected_image.hidden_states[1])
    close(out.pooler_output, expected_text.pooler_output)


def test_from_transformers_on_a_patched_model_says_so():
    model = vitriton.patch(models.clip_model())
    with pytest.raises(ValueError, match=r"already runs vitriton's towers \(vitriton\.patch\)"):
        vitriton.from_transformers(model)


def test_patch_a_model_with_projection():
    torch.manual_seed(2)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**models.CLIP_VISION, projection_dim=48)).eval()
    pixels = models.pixels(2, 40, seed=4)
    with torch.no_grad():
        expected = model(pixels).image_embeds
    vitriton.patch(model)
    assert isinstance(model.vision_model, CLIPVisionTransformer)
    # transformers' own get_input_embeddings reads vision_model.embeddings.patch_embedding.
    assert model.get_input_embeddings() is model.vision_model.embeddings
    with torch.no_grad():
        close(model(pixels).image_embeds, expected)


IMAGE_TOKEN = 119
TINY_LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=120,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llava() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config={**models.CLIP_VISION, "model_type": "clip_vision_model"},
        text_config=TINY_LLAMA,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=25,  # the 5 x 5 patches of a 40-pixel image; vision_feature_select_strategy drops CLS
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger projector weights so the image visibly moves the logits
        model.model.multi_modal_projector.linear_1.weight.mul_(30)
    return model


def llava_outputs(model, ids, pixels) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            "tokens": model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False),
            "logits": model(input_ids=ids, pixel_values=pixels).logits,
            "features": model.model.get_image_features(
                pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default"
            ).pooler_output[0],
        }


def test_patch_llava_keeps_generate_and_image_features():
    model = tiny_llava()
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * 25 + [7, 8]])
    pixels = models.pixels(1, 40, seed=6)
    expected = llava_outputs(model, ids, pixels)
    with torch.no_grad():
        other_image = model(input_ids=ids, pixel_values=models.pixels(1, 40, seed=7)).logits
    # The image matters to the logits far beyond the tolerance, so a wrong tower would show.
    assert (other_image - expected["logits"]).abs().max() > 100 * 1e-4 * expected["logits"].abs().max()

    vitriton.patch(model)
    assert isinstance(model.model.vision_tower, CLIPVisionTransformer)
    ours = llava_outputs(model, ids, pixels)
    assert torch.equal(ours["tokens"], expected["tokens"])
    close(ours["logits"], expected["logits"])
    close(ours["features"], expected["features"])


def test_from_transformers_takes_llavas_vision_tower():
    model = tiny_llava()
    pixels = models.pixels(2, 40, seed=9)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration; it holds a vision tower .*tower='vision'"):
        vitriton.from_transformers(model)
    tower = vitriton.from_transformers(model, tower="vision")
    assert type(tower) is vitriton.CLIPVisionModel
    with torch.no_grad():
        expected = model.model.vision_tower(pixels, output_hidden_states=True)
        ours = tower(pixels, output_hidden_states=True)
    close(ours.pooler_output, expected.pooler_output)
    close(ours.hidden_states[-2], expected.hidden_states[-2])


def test_patch_keeps_the_hooks_registered_before():
    """Hooks on the transformers tower and on parts vitriton's tower shares keep running after patching (their
    handles still remove them); transformers' own capture hooks, put on its layers by a first call, stay behind."""
    model = tiny_llava()
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * 25 + [7, 8]])
    pixels = models.pixels(1, 40, seed=6)
    tower = model.model.vision_tower
    seen = []
    tower.register_forward_hook(lambda module, args, output: seen.append(output.last_hidden_state))
    tower.encoder.layers[0].register_forward_hook(lambda module, args, output: output * 1.5)
    handle = tower.encoder.layers[0].mlp.register_forward_pre_hook(lambda module, args: seen.append("mlp"))
    expected = llava_outputs(model, ids, pixels)
    assert any(tower.encoder.layers[1]._forward_hooks.values())  # transformers' capture hook, from that call
    expected["tower"], expected["mlp calls"] = seen[-1], seen.count("mlp")
    seen.clear()

    vitriton.patch(model)
    ours = llava_outputs(model, ids, pixels)
    assert seen.count("mlp") == expected["mlp calls"] > 0
    close(seen[-1], expected["tower"])
    close(ours["logits"], expected["logits"])
    close(ours["features"], expected["features"])
    assert not model.model.vision_tower.encoder.layers[1]._forward_hooks  # no hook of transformers' came along
    handle.remove()
    seen.clear()
    llava_outputs(model, ids, pixels)
    assert "mlp" not in seen


def test_patch_refuses_hooks_on_parts_it_does_not_have():
    model = tiny_llava()
    model.model.vision_tower.encoder.layers[1].self_attn.k_proj.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"vision_tower has hooks on encoder.layers.1.self_attn.k_proj, which"):
        vitriton.patch(model)
    assert type(model.model.vision_tower) is not CLIPVisionTransformer


def test_patch_llava_next_keeps_the_image_features():
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config={**models.CLIP_VISION, "model_type": "clip_vision_model"},
        text_config=TINY_LLAMA,
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[40, 80], [80, 40]],
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    pixels = models.pixels(3, 40, seed=8).unsqueeze(0)  # one 40 x 80 image: the base view and two crops
    sizes = torch.tensor([[40, 80]])
    with torch.no_grad():
        (expected,) = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    vitriton.patch(model)
    assert isinstance(model.model.vision_tower, CLIPVisionTransformer)
    with torch.no_grad():
        (ours,) = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    close(ours, expected)


def test_patch_twice_changes_nothing():
    model = models.siglip_model()
    vitriton.patch(model)
    towers = model.vision_model, model.text_model
    pointers = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    assert vitriton.patch(model) is model
    assert (model.vision_model, model.text_model) == towers
    assert {name: tensor.data_ptr() for name, tensor in model.state_dict().items()} == pointers


def test_patch_keeps_gradient_checkpointing():
    # transformers' gradient_checkpointing_enable on a patched model switches vitriton's encoder layers (it raised
    # "CLIPModel is not compatible with gradient checkpointing" when the towers held no layer with the switch), and
    # pixel gradients through the checkpointed layers are transformers'
    hf, model = models.clip_model(), vitriton.patch(models.clip_model())
    grads = []
    for each in (hf, model):
        each.train().gradient_checkpointing_enable(every_n_layers=2)
        x = models.pixels(2, 40, seed=7).requires_grad_()
        each.get_image_features(x).pooler_output.square().sum().backward()
        grads.append(x.grad)
    assert model.is_gradient_checkpointing
    assert [layer.gradient_checkpointing for layer in model.vision_model.encoder.layers] == [True, False]
    close(grads[1], grads[0])
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_patch_keeps_training_mode():
    # a tower patched in training mode stays in it (it came out in eval mode, so attention dropout stopped), and
    # one in eval mode stays in eval mode
    model = models.clip_model()
    model.text_model.train()
    vitriton.patch(model)
    assert all(module.training for module in model.text_model.modules())
    assert not any(module.training for module in model.vision_model.modules())


def test_patch_an_unsupported_model_says_what_it_looked_for():
    with pytest.raises(ValueError, match="no CLIP or SigLIP tower in Sequential.*modeling_clip.CLIPVisionModel"):
        vitriton.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_patch_checks_its_arguments_before_touching_the_model():
    model = SiglipVisionModel(models.siglip_model().config.vision_config)
    with pytest.raises(ValueError, match="parallel='pipeline'; expected one of"):
        vitriton.patch(model, parallel="pipeline")
    with pytest.raises(RuntimeError, match="cuda_graphs=True needs the model on a CUDA device; it is on cpu"):
        vitriton.patch(model, cuda_graphs=True)
    assert type(model) is SiglipVisionModel


@pytest.mark.gpu
def test_patch_with_cuda_graphs_on_the_gpu():
    model = models.clip_model().cuda()
    inputs = {key: value.cuda() for key, value in dual_inputs(40).items()}
    expected = run_dual(model, inputs)
    vitriton.patch(model, cuda_graphs=(4,))
    assert len(cuda_graph_runners(model)) == 2
    for key, value in run_dual(model, inputs).items():
        close(value, expected[key])
    assert all(runner.captured for runner in cuda_graph_runners(model))


def _parallel_worker(rank: int, world: int, port: int, root: str, parallel: str) -> None:
    os.environ["VITRITON_EAGER"] = "1"  # the parallel plumbing is under test here, not the kernels
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = models.clip_model()
    full_fc1 = model.vision_model.encoder.layers[0].mlp.fc1.weight.detach().clone()
    inputs = dual_inputs(40)
    vitriton.patch(model, parallel=parallel)
    tower = model.vision_model.module if parallel == "data" else model.vision_model
    fc1 = tower.encoder.layers[0].mlp.fc1
    result = {
        "outputs": run_dual(model, inputs),
        "fc1": fc1.weight.detach().clone(),
        "full_fc1": full_fc1,
        "fc1_storage": fc1.weight.untyped_storage().nbytes(),
        "wrapper": type(model.vision_model).__name__,
    }
    torch.save(result, Path(root) / f"{parallel}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["tensor", "data"])
def test_patch_under_two_ranks(tmp_path, parallel):
    """Each rank patches the same in-memory model: tensor mode keeps the rank's shard (its own memory, not a view
    of the full tensor), data mode the whole tower in a DataParallel wrapper; outputs match one process."""
    reference = run_dual(models.clip_model(), dual_inputs(40))
    mp.spawn(_parallel_worker, args=(2, free_port(), str(tmp_path), parallel), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"{parallel}-rank{rank}.pt")
        for key, value in result["outputs"].items():
            close(value, reference[key])
        full, fc1 = result["full_fc1"], result["fc1"]
        if parallel == "tensor":
            rows = full.shape[0] // 2  # the rank's block, padded with zero rows to whole 16 bytes
            assert torch.equal(fc1, pad_shard(full[rank * rows : (rank + 1) * rows], 0, SHARD_MULTIPLE))
            assert result["fc1_storage"] == fc1.numel() * fc1.element_size()
            assert result["wrapper"] == "CLIPVisionTransformer"
        else:
            assert torch.equal(fc1, full)
            assert result["wrapper"] == "DataParallel"
