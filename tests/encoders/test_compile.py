"""torch.compile(fullgraph=True) traces every model without a graph break: no host synchronisation (the text
embeddings' id checks become async asserts when compiling), no data-dependent Python branches."""

from __future__ import annotations

import pytest
import torch

import vitriton
from tests.encoders import models


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
