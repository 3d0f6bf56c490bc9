"""Low precision: under torch.autocast the towers and projections compute in the autocast dtype as transformers
does, and a bf16 model runs correctly under TRITON_INTERPRET=1 (on the eager references: the interpreter has no
bf16 dot). Both within flash-attention's bound against transformers' fp32 output."""

from __future__ import annotations

import copy

import pytest
import torch

import vitriton
from tests.encoders import models
from tests.helpers import assert_lowp_bound


@pytest.fixture(scope="module")
def clip():
    return models.clip_model()


def vision_and_text(model, px, ids, mask):
    """The towers' outputs and the full model's projected embeddings."""
    out = model(ids, px, mask)
    return (
        model.vision_model(px).pooler_output,
        model.text_model(ids, mask).last_hidden_state,
        out.image_embeds,
        out.text_embeds,
    )


@torch.no_grad()
def test_autocast_bf16(clip):
    ours = vitriton.from_transformers(clip)
    px, (ids, mask) = models.pixels(2, 40, seed=21), models.text(2, 7, seed=21)
    refs = vision_and_text(clip, px, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = vision_and_text(clip, px, ids, mask)
        out = vision_and_text(ours, px, ids, mask)
    for got, ref, lowp in zip(out, refs, theirs, strict=True):
        assert got.dtype == lowp.dtype, f"{got.dtype}: transformers gives {lowp.dtype} under autocast"
        assert_lowp_bound(got, ref, lowp, atol=1e-2)


@torch.no_grad()
def test_bf16_model_under_the_interpreter(clip):
    ours = vitriton.from_transformers(clip, dtype=torch.bfloat16)
    px, (ids, mask) = models.pixels(2, 40, seed=22), models.text(2, 7, seed=22)
    refs = vision_and_text(clip, px, ids, mask)
    theirs = vision_and_text(copy.deepcopy(clip).to(torch.bfloat16), px.bfloat16(), ids, mask)
    out = vision_and_text(ours, px, ids, mask)
    for got, ref, lowp in zip(out, refs, theirs, strict=True):
        assert got.dtype == torch.bfloat16
        assert_lowp_bound(got, ref, lowp, atol=1e-2)
