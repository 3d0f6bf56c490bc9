"""Which reduces of a tensor-parallel encoder may use symmetric memory (vitriton.parallel.symmetric), decided on
the host: these rules run on the CPU; the reduces themselves are GPU-only (tests/parallel/test_nccl.py)."""

from __future__ import annotations

import pytest
import torch

import vitriton
from tests.encoders import models
from vitriton.encoders.trunk import Encoder
from vitriton.parallel import symmetric


@pytest.fixture
def encoder():
    model = vitriton.from_transformers(models.clip_model().vision_model, dtype=torch.float32)
    return next(m for m in model.modules() if isinstance(m, Encoder))


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.setattr(symmetric, "ENABLED", True)


def test_off_by_default_and_when_disabled(encoder, monkeypatch):
    monkeypatch.setattr(symmetric, "ENABLED", False)
    depth = len(encoder.layers)
    assert encoder.symmetric_results(depth, 1) == [(None, None)] * depth


def test_borrowed_except_what_leaves_the_encoder(encoder, enabled):
    depth = len(encoder.layers)
    results = encoder.symmetric_results(depth, 2)
    assert results[:-1] == [("borrow", "borrow")] * (depth - 1)
    assert results[-1] == ("borrow", "copy")  # the last MLP's sum is the encoder's output
    assert encoder.symmetric_results(depth, symmetric.MAX_CHUNKS + 1) == [(None, None)] * depth
    assert encoder.symmetric_results(0, 1) == []


@pytest.mark.parametrize("where", ["layer_norm", "layer", "encoder", "global"])
def test_hooks_anywhere_make_every_result_a_copy(encoder, enabled, where):
    layer = encoder.layers[0]
    if where == "global":
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: None)
    else:
        module = {"layer_norm": layer.layer_norm2, "layer": layer, "encoder": encoder}[where]
        handle = module.register_forward_hook(lambda *_: None)
    try:
        depth = len(encoder.layers)
        assert encoder.symmetric_results(depth, 1) == [("copy", "copy")] * depth
    finally:
        handle.remove()
    assert encoder.symmetric_results(depth, 1)[0] == ("borrow", "borrow")


def test_cpu_and_unsupported_reduces_stay_on_the_process_group(enabled):
    cpu = torch.device("cpu")
    assert symmetric.buffers_for(None, (2, 8, 64), torch.bfloat16, cpu) is None
    cuda = torch.device("cuda", 0)
    # single rank (no group), fp16 (no two-shot kernel), too large: decided before any CUDA call
    assert symmetric.buffers_for(None, (2, 8, 64), torch.bfloat16, cuda) is None
    assert symmetric.buffers_for(None, (2, 8, 64), torch.float16, cuda) is None
    assert symmetric.buffers_for(None, (symmetric.CAPACITY,), torch.float32, cuda) is None
    assert not symmetric._BUFFERS
