"""The DataParallel wrapper and the opt-in rank-consistency check, over gloo with two spawned ranks.

Each rank loads one CLIP vision tower checkpoint (eager ops, to keep it fast); rank 1 passes different pixels
where the test asks for it, and the check must name it on both ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vitriton
from tests.encoders import models
from tests.parallel.test_tensor_parallel import _free_port
from vitriton.parallel import DataParallel, SameInputs

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ["VITRITON_EAGER"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    path = Path(root) / "clip"
    px = models.pixels(3, 40, seed=31)
    result = {}
    with torch.no_grad():
        model = vitriton.from_pretrained(path, parallel="data", check_inputs=True)
        result["wrapped"] = isinstance(model.vision_model, DataParallel)
        out = model.vision_model(px, return_dict=False, output_hidden_states=True, output_attentions=True)
        result["tuple"] = out
        mine = px if rank == 0 else px + 1
        try:
            model.vision_model(mine)
            result["data_error"] = None
        except ValueError as err:
            result["data_error"] = str(err)
        os.environ["VITRITON_CHECK_INPUTS"] = "1"
        tensor = vitriton.from_pretrained(path, parallel="tensor")
        result["tensor_wrapped"] = isinstance(tensor.vision_model, SameInputs)
        try:
            tensor.vision_model(mine)
            result["tensor_error"] = None
        except ValueError as err:
            result["tensor_error"] = str(err)
    torch.save(result, Path(root) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_data_parallel_wrapper_and_input_check(tmp_path):
    hf = models.clip_model().vision_model
    hf.set_attn_implementation("eager")
    path = models.save(hf, tmp_path / "clip")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    px = models.pixels(3, 40, seed=31)
    with torch.no_grad():
        ref = hf(px, return_dict=False, output_hidden_states=True, output_attentions=True)
    assert path.is_dir()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["wrapped"] and result["tensor_wrapped"]
        out = result["tuple"]
        assert isinstance(out, tuple) and len(out) == len(ref)
        for got, want in zip(out[:2], ref[:2], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for got, want in zip(out[3], ref[3], strict=True):  # attention weights, gathered over the batch
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for key in ("data_error", "tensor_error"):
            assert result[key] is not None and "ranks [1] passed inputs" in result[key], f"rank {rank} {key}"


def _bad_id_worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ["VITRITON_EAGER"] = "1"
    torch.set_num_threads(1)
    # A short timeout: before the whole-batch check, rank 0 waited here for rank 1's outputs until it expired.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    model = vitriton.from_pretrained(Path(root) / "text", parallel="data")
    ids, mask = models.text(4, 7, seed=5)
    ids[3, 2] = 99  # outside the vocabulary of 99, in rank 1's rows (2 and 3)
    try:
        with torch.no_grad():
            model(ids, mask)
        error = None
    except ValueError as err:
        error = str(err)
    # Gradients cannot cross the collectives: tensor parallelism with unfrozen weights says so on every rank.
    tensor = vitriton.from_pretrained(Path(root) / "text", parallel="tensor").requires_grad_(True)
    try:
        tensor(*models.text(4, 7, seed=6))
        grad_error = None
    except NotImplementedError as err:
        grad_error = str(err)
    torch.save({"error": error, "grad_error": grad_error}, Path(root) / f"bad{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_data_parallel_bad_id_in_one_ranks_rows_raises_on_every_rank(tmp_path):
    models.save(models.clip_model().text_model, tmp_path / "text")
    mp.spawn(_bad_id_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"bad{rank}.pt")
        error, grad_error = result["error"], result["grad_error"]
        assert error is not None and "token id 99 is outside the vocabulary" in error, f"rank {rank}: {error}"
        assert grad_error is not None and "gradients through a tensor-parallel" in grad_error, f"rank {rank}"


def _options_worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ["VITRITON_EAGER"] = "1"
    torch.set_num_threads(1)
    # A short timeout: before options joined the check, ranks that differed in one waited here on each other.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=20)
    )
    px = models.pixels(2, 40, seed=3)
    errors = {}
    with torch.no_grad():
        for mode, option in (("tensor", "output_attentions"), ("data", "feature_layers")):
            model = vitriton.from_pretrained(Path(root) / "clip", parallel=mode, check_inputs=True)
            value = {"output_attentions": rank == 1, "feature_layers": [0] if rank == 1 else None}[option]
            try:
                model(px, **{option: value})
                errors[mode] = None
            except ValueError as err:
                errors[mode] = str(err)
    torch.save(errors, Path(root) / f"options{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_input_check_covers_options_that_change_the_collectives(tmp_path):
    # output_attentions all-gathers the heads' weights and feature_layers stops the encoder early: a rank that
    # differs in one makes other collectives, so the check compares options as well as tensors.
    models.save(models.clip_model().vision_model, tmp_path / "clip")
    # forked, not spawned: the children need nothing set up again, so the test takes a second or two
    mp.start_processes(_options_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        for mode, error in torch.load(tmp_path / f"options{rank}.pt").items():
            assert error is not None and "ranks [1] passed inputs" in error, f"rank {rank} {mode}: {error}"
