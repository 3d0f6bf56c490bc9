"""``parallel="auto"`` over gloo with two spawned ranks: data parallelism when the full weights fit the budget,
tensor parallelism when ``VITRITON_WEIGHT_BUDGET_GIB`` is too small (on any one rank), the choice visible on the
model, and outputs equal to the single-process model's, down to a batch smaller than the world size; a rank that
fails while choosing raises, and so does the other, instead of waiting for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import CLIPVisionConfig, CLIPVisionModel

import vitriton
from tests.encoders import models
from tests.parallel.test_tensor_parallel import _free_port
from vitriton.parallel import DataParallel

pytestmark = pytest.mark.slow

# The CLIP test tower in fp32 is about 0.3 MB: any default budget holds it, 1e-4 GiB (107 kB) does not.
TOO_SMALL_GIB = "1e-4"


def _load(path: Path, budget: str | None):
    if budget is None:
        os.environ.pop("VITRITON_WEIGHT_BUDGET_GIB", None)
    else:
        os.environ["VITRITON_WEIGHT_BUDGET_GIB"] = budget
    return vitriton.from_pretrained(path, parallel="auto")


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ["VITRITON_EAGER"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    path = Path(root) / "clip"
    px = models.pixels(3, 40, seed=5)
    result = {}
    with torch.no_grad():
        cases = {"default": None, "small": TOO_SMALL_GIB, "small_on_rank1": TOO_SMALL_GIB if rank == 1 else "100"}
        for case, budget in cases.items():
            model = _load(path, budget)
            result[case] = {
                "mode": model.parallel_mode,
                "repr": repr(model).splitlines()[1],
                "wrapped": isinstance(model.vision_model, DataParallel),
                "b3": model(px).last_hidden_state,
                "b1": model(px[:1]).pooler_output,
            }
        try:  # 3 heads over 2 ranks: auto's tensor choice cannot shard it, and the error says why auto chose it
            _load(Path(root) / "three_heads", TOO_SMALL_GIB)
            result["three_heads"] = None
        except ValueError as error:
            result["three_heads"] = str(error)
        try:  # a malformed budget on rank 1 alone: rank 1 raises its own error, rank 0 one naming rank 1 (no hang)
            _load(path, "lots" if rank == 1 else None)
            result["bad_budget_on_rank1"] = None
        except (ValueError, RuntimeError) as error:
            result["bad_budget_on_rank1"] = f"{type(error).__name__}: {error}"
        os.environ.pop("VITRITON_WEIGHT_BUDGET_GIB", None)
        hf = CLIPVisionModel.from_pretrained(path).eval()
        vitriton.patch(hf, parallel="auto")
        result["patched_wrapped"] = isinstance(hf, DataParallel)  # the patched tower is the same object
    torch.save(result, Path(root) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_auto_picks_data_when_weights_fit_else_tensor(tmp_path):
    hf = models.perturb_vectors(models.clip_model().vision_model)
    models.save(hf, tmp_path / "clip")
    models.save(
        CLIPVisionModel(CLIPVisionConfig(**{**models.CLIP_VISION, "num_attention_heads": 3})), tmp_path / "three_heads"
    )
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    px = models.pixels(3, 40, seed=5)
    with vitriton.eager_mode(), torch.no_grad():
        single = vitriton.from_pretrained(tmp_path / "clip", parallel="auto")
        want_b3, want_b1 = single(px).last_hidden_state, single(px[:1]).pooler_output
    assert single.parallel_mode == "none"
    expected = {"default": "data", "small": "tensor", "small_on_rank1": "tensor"}
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["patched_wrapped"], f"rank {rank}: patch(parallel='auto') did not pick data parallelism"
        error = result["three_heads"]
        assert error and "does not divide" in error and "parallel='auto' chose tensor parallelism" in error, error
        error = result["bad_budget_on_rank1"]
        if rank == 1:
            assert error and error.startswith("ValueError") and "VITRITON_WEIGHT_BUDGET_GIB='lots'" in error, error
        else:
            assert error and error.startswith("RuntimeError") and "rank(s) [1] of the process group" in error, error
        for case, mode in expected.items():
            got = result[case]
            assert got["mode"] == mode, f"rank {rank} {case}: parallel_mode {got['mode']!r}, expected {mode!r}"
            assert got["repr"].strip() == f"parallel_mode={mode!r}"
            assert got["wrapped"] == (mode == "data")
            torch.testing.assert_close(got["b3"], want_b3, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got["b1"], want_b1, rtol=1e-4, atol=1e-4)
