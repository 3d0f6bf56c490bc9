"""Patch embeddings (patch copy + one GEMM, class token, positions) against transformers' strided-conv embeddings.

CPU: fp32 within 1e-4 relative and fp16 within flash-attention's bound, at odd hidden sizes and at image sizes
that are not a multiple of the patch (interpolated positions). GPU: bf16 at full size against transformers in fp32.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, SiglipVisionConfig
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings as HFCLIPVisionEmbeddings
from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings as HFSiglipVisionEmbeddings

from tests.encoders import models
from tests.helpers import DEVICE, TOLERANCES, assert_lowp_bound, relative_error, triton_calls
from vitriton.encoders.clip import CLIPVisionEmbeddings
from vitriton.encoders.siglip import SiglipVisionEmbeddings
from vitriton.kernels._dispatch import interpreting
from vitriton.parallel import Weights

# family -> (transformers config, transformers embeddings, vitriton embeddings)
FAMILIES = {
    "clip": (CLIPVisionConfig, HFCLIPVisionEmbeddings, CLIPVisionEmbeddings),
    "siglip": (SiglipVisionConfig, HFSiglipVisionEmbeddings, SiglipVisionEmbeddings),
}
# (family, hidden, image, patch, sizes run with interpolate_pos_encoding=True); hidden sizes odd on purpose.
SMALL = [
    ("clip", 45, 40, 8, [(45, 37), (8, 8)]),
    ("siglip", 77, 35, 7, [(30, 50), (41, 20)]),
]
# ANCHORS.md sizes: CLIP ViT-L/14-336 (class token, no conv bias), SigLIP so400m-14-384 (conv bias, no class token).
FULL = [("clip", 1024, 336, 14, [(350, 300)]), ("siglip", 1152, 384, 14, [(400, 390)])]


def build(family: str, hidden: int, image: int, patch: int, device: str = "cpu"):
    """transformers' embeddings in fp32 with random tensors (none left at zero), and its config."""
    config_cls, hf_cls, _ = FAMILIES[family]
    config = config_cls(hidden_size=hidden, image_size=image, patch_size=patch, num_attention_heads=1)
    torch.manual_seed(hidden)
    with torch.device(device):
        hf = hf_cls(config).eval()
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.copy_(torch.randn_like(parameter) * parameter.std().clamp_min(0.02))
    return hf, config


def ours_from(family: str, hf: nn.Module, config, dtype: torch.dtype) -> nn.Module:
    _, _, ours_cls = FAMILIES[family]
    device = next(hf.parameters()).device
    return ours_cls("", config, Weights.from_state_dict(hf.state_dict(), dtype=dtype, device=device))


@contextlib.contextmanager
def exact_fp32():
    """fp32 references without TF32: cuDNN's convolutions default to it on the GPU."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def image_sizes(image: int, interpolated: list[tuple[int, int]]) -> list[tuple[tuple[int, int], bool]]:
    return [((image, image), False)] + [(size, True) for size in interpolated]


@torch.no_grad()
@pytest.mark.parametrize("family, hidden, image, patch, interpolated", SMALL, ids=[s[0] for s in SMALL])
def test_fp32_parity(family, hidden, image, patch, interpolated):
    hf, config = build(family, hidden, image, patch)
    ours = ours_from(family, hf, config, torch.float32)
    for (height, width), interpolate in image_sizes(image, interpolated):
        px = models.pixels(3, (height, width), seed=height)
        ref = hf(px, interpolate_pos_encoding=interpolate)
        before = triton_calls()["linear"]
        out = ours(px, interpolate)
        if interpreting():
            assert triton_calls()["linear"] > before, "the patch GEMM did not run the Triton linear kernel"
        assert out.shape == ref.shape and out.dtype == ref.dtype
        err = relative_error(out, ref)
        assert err <= 1e-4, f"{family} {height}x{width}: relative error {err:.2e}"


def test_padded_weight_follows_the_parameter():
    """Patch 7's K = 147 runs padded to 152, and the weight is a view of the padded GEMM operand: in-place changes
    (through the parameter or its .data) reach the GEMM, a replaced tensor is re-padded, and weights built and
    changed under inference_mode work too."""
    hf, config = build("siglip", 77, 35, 7)
    px = models.pixels(2, 35, seed=3)
    with torch.inference_mode():
        ours = ours_from("siglip", hf, config, torch.float32)
        assert relative_error(ours(px), hf(px)) <= 1e-4
        ours.patch_weight.mul_(2)
        with torch.no_grad():
            hf.patch_embedding.weight.mul_(2)
        assert relative_error(ours(px), hf(px)) <= 1e-4
    ours = ours_from("siglip", hf, config, torch.float32)
    with torch.no_grad():
        assert ours.gemm_weight().shape == (77, 152)
        changes = (
            lambda w: w.mul_(-1),
            lambda w: w.data.copy_(w.data * 3),  # bumps no version counter of the parameter
            lambda w: setattr(w, "data", w.data * 2),
            lambda w: w.data.copy_(w.data * -1),  # again, after the storage was replaced
        )
        for change in changes:
            change(ours.patch_weight)
            hf.patch_embedding.weight.copy_(ours.patch_weight)
            assert relative_error(ours(px), hf(px)) <= 1e-4
    with torch.inference_mode():  # every tensor an inference tensor, as under a GPU test's decorator
        hf, config = build("siglip", 77, 35, 7)
        ours = ours_from("siglip", hf, config, torch.float32)
        for _ in range(2):  # the second call meets the parameter re-pointed at the padded storage
            assert relative_error(ours(px), hf(px)) <= 1e-4


@torch.no_grad()
def test_strided_pixels_and_empty_batch():
    hf, config = build("clip", 45, 40, 8)
    ours = ours_from("clip", hf, config, torch.float32)
    px = models.pixels(2, 40, seed=5).to(memory_format=torch.channels_last)
    assert relative_error(ours(px), hf(px)) <= 1e-4
    assert ours(models.pixels(0, 40)).shape == (0, 26, 45)


@torch.no_grad()
@pytest.mark.parametrize("family, hidden, image, patch, interpolated", SMALL, ids=[s[0] for s in SMALL])
def test_fp16_within_bound(family, hidden, image, patch, interpolated):
    hf, config = build(family, hidden, image, patch)
    ours = ours_from(family, hf, config, torch.float16)
    hf16 = copy.deepcopy(hf).half()
    for (height, width), interpolate in image_sizes(image, interpolated):
        px = models.pixels(2, (height, width), seed=height + 1)
        ref = hf(px, interpolate_pos_encoding=interpolate)
        out = ours(px.half(), interpolate)
        assert out.dtype == torch.float16
        assert_lowp_bound(out, ref, hf16(px.half(), interpolate_pos_encoding=interpolate), TOLERANCES[torch.float16][1])


@pytest.mark.gpu
@torch.inference_mode()
@pytest.mark.parametrize("family, hidden, image, patch, interpolated", FULL, ids=[s[0] for s in FULL])
def test_full_size_bf16(family, hidden, image, patch, interpolated):
    hf, config = build(family, hidden, image, patch, device=DEVICE)
    ours = ours_from(family, hf, config, torch.bfloat16)
    hf16 = copy.deepcopy(hf).bfloat16()
    for (height, width), interpolate in image_sizes(image, interpolated):
        px = models.pixels(2, (height, width), seed=height).to(DEVICE)
        with exact_fp32():
            ref = hf(px, interpolate_pos_encoding=interpolate)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            out = ours(px, interpolate)
        ops = {event.name for event in profile.events()}
        assert not any("convolution" in op for op in ops), sorted(ops)
        assert out.dtype == torch.bfloat16
        theirs = hf16(px.bfloat16(), interpolate_pos_encoding=interpolate)
        assert_lowp_bound(out, ref, theirs, TOLERANCES[torch.bfloat16][1])
