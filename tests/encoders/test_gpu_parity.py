"""Every reference architecture of ANCHORS.md at full size on the GPU, random weights, in bf16 and fp16,
against transformers in fp32: our error must stay within 2x of transformers' own error in that dtype."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import vitriton
from tests.helpers import relative_error, triton_calls

pytestmark = pytest.mark.gpu


def vision(hidden, mlp, layers, heads, image, patch, act, eps=1e-5):
    return dict(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image,
        patch_size=patch,
        hidden_act=act,
        layer_norm_eps=eps,
    )


def text(hidden, mlp, layers, heads, positions, vocab, act, eps=1e-5):
    return dict(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=positions,
        vocab_size=vocab,
        hidden_act=act,
        layer_norm_eps=eps,
    )


ARCHITECTURES = {
    "clip-vit-base-patch32": (CLIPVisionConfig, CLIPVisionModel, vision(768, 3072, 12, 12, 224, 32, "quick_gelu")),
    "clip-vit-base-patch16": (CLIPVisionConfig, CLIPVisionModel, vision(768, 3072, 12, 12, 224, 16, "quick_gelu")),
    "clip-vit-large-patch14": (CLIPVisionConfig, CLIPVisionModel, vision(1024, 4096, 24, 16, 224, 14, "quick_gelu")),
    "clip-vit-large-patch14-336": (
        CLIPVisionConfig,
        CLIPVisionModel,
        vision(1024, 4096, 24, 16, 336, 14, "quick_gelu"),
    ),
    "CLIP-ViT-H-14": (CLIPVisionConfig, CLIPVisionModel, vision(1280, 5120, 32, 16, 224, 14, "gelu")),
    "CLIP-ViT-bigG-14": (CLIPVisionConfig, CLIPVisionModel, vision(1664, 8192, 48, 16, 224, 14, "gelu")),
    "clip-text-B": (CLIPTextConfig, CLIPTextModel, text(512, 2048, 12, 8, 77, 49408, "quick_gelu")),
    "clip-text-L": (CLIPTextConfig, CLIPTextModel, text(768, 3072, 12, 12, 77, 49408, "quick_gelu")),
    "siglip-base-patch16-224": (
        SiglipVisionConfig,
        SiglipVisionModel,
        vision(768, 3072, 12, 12, 224, 16, "gelu_pytorch_tanh", 1e-6),
    ),
    "siglip-so400m-patch14-384": (
        SiglipVisionConfig,
        SiglipVisionModel,
        vision(1152, 4304, 27, 16, 384, 14, "gelu_pytorch_tanh", 1e-6),
    ),
    "siglip-text-so400m": (
        SiglipTextConfig,
        SiglipTextModel,
        text(1152, 4304, 27, 16, 64, 32000, "gelu_pytorch_tanh", 1e-6),
    ),
}


def make_inputs(config, batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    if hasattr(config, "image_size"):
        size = config.image_size
        return {"pixel_values": torch.randn(batch, 3, size, size, device="cuda", generator=generator)}
    seq = config.max_position_embeddings
    ids = torch.randint(1, config.vocab_size - 1, (batch, seq), device="cuda", generator=generator)
    ids[:, -1] = config.vocab_size - 1  # the eos / highest id: both pooling conventions pick the last position
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, seq // 2 :] = 0  # a padded row exercises the key-padding path
    return {"input_ids": ids, "attention_mask": mask}


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_full_size_parity(name, dtype):
    config_cls, model_cls, sizes = ARCHITECTURES[name]
    config = config_cls(**sizes)
    if "eos_token_id" in config.to_dict():
        config.eos_token_id = config.vocab_size - 1
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf32 = model_cls(config).eval()
    inputs = make_inputs(config)
    ref = hf32(**inputs)
    ours = vitriton.from_transformers(hf32, dtype=dtype)
    hf_low = hf32.to(dtype)
    low_inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    theirs = hf_low(**low_inputs)
    before = triton_calls()
    out = ours(**low_inputs)
    after = triton_calls()
    assert all(after[op] > before[op] for op in ("attention", "layer_norm", "qkv_projection")), (before, after)
    for field in ("last_hidden_state", "pooler_output"):
        reference = getattr(ref, field).float()
        if "attention_mask" in inputs and field == "last_hidden_state":
            keep = inputs["attention_mask"].bool()  # padded query rows are not meaningful outputs
            reference = reference[keep]
            ours_err = relative_error(getattr(out, field)[keep], reference)
            theirs_err = relative_error(getattr(theirs, field)[keep], reference)
        else:
            ours_err = relative_error(getattr(out, field), reference)
            theirs_err = relative_error(getattr(theirs, field), reference)
        print(f"{name} {dtype} {field}: ours {ours_err:.2e} transformers {theirs_err:.2e}")
        assert ours_err <= 2 * theirs_err + 1e-3, f"{field}: {ours_err:.3e} > 2 * {theirs_err:.3e} + 1e-3"
