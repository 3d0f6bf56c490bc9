"""The parallel layer over NCCL on 2 and 4 GPUs: torchrun starts tests/parallel/nccl_worker.py, one process per GPU,
and every check of every rank must pass (TP=N against TP=1 and transformers fp32 for the full models and both
towers of CLIP and SigLIP, ranks bitwise identical, each rank's weights its slice only, data mode, CUDA graphs,
the overlapped forward, and the symmetric-memory all-reduce against NCCL).

NVLink multicast stays off in these runs: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

WORKER = Path(__file__).with_name("nccl_worker.py")
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Generous: each rank compiles and autotunes every kernel variant it meets (TP=N, TP=1, data, graphs) first.
TIMEOUT_S = 420


def expected_checks() -> set[str]:
    checks = set()
    for family in ("clip", "siglip"):
        checks |= {f"weights/{family}", f"cuda_graphs/{family}/vision", f"cuda_graphs/{family}/text"}
        checks |= {f"{check}/{family}/{tower}" for check in ("overlap", "symmetric") for tower in ("vision", "text")}
        for tower in ("full", "vision", "text"):
            for mode in ("tensor", "data"):
                checks |= {f"{mode}/{family}/{tower}", f"ranks_identical/{mode}/{family}/{tower}"}
    return checks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("ranks", [2, 4], ids=["ranks2", "ranks4"])
def test_parallel_layer_over_nccl(ranks, tmp_path):
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} GPUs; {torch.cuda.device_count()} visible")
    out = tmp_path / "checks"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-port",
        str(free_port()),
        str(WORKER),
        "--out",
        str(out),
    ]
    run = subprocess.run(
        command, env={**os.environ, **NVLS_OFF}, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    log = (run.stdout + run.stderr)[-6000:]
    print(run.stdout)  # the worker's summary, shown with -s or -rP

    records = [json.loads(line) for path in sorted(out.glob("rank*.jsonl")) for line in path.read_text().splitlines()]
    failed = [r for r in records if not r["passed"]]
    detail = "\n".join(
        f"rank {r['rank']} {r['check']}: {r['summary']}\n  {json.dumps(r['numbers'])[:1500]}" for r in failed
    )
    assert run.returncode == 0, f"worker exited {run.returncode}\n{detail}\n--- output tail ---\n{log}"
    assert not failed, detail
    for rank in range(ranks):
        checked = {r["check"] for r in records if r["rank"] == rank}
        missing = expected_checks() - checked
        assert not missing, f"rank {rank} did not run {sorted(missing)}\n--- output tail ---\n{log}"


def test_symmetric_memory_over_two_groups():
    """A subgroup's symmetric buffers, then the world group's reduces: no hang, right sums, one symmetric group
    per process (tests/parallel/symmetric_groups_worker.py)."""
    if torch.cuda.device_count() < 4:
        pytest.skip(f"needs 4 GPUs; {torch.cuda.device_count()} visible")
    worker = Path(__file__).with_name("symmetric_groups_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4"]
    command += ["--master-port", str(free_port()), str(worker)]
    run = subprocess.run(command, env={**os.environ, **NVLS_OFF}, capture_output=True, text=True, timeout=180)
    log = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, log
    assert run.stdout.count("all sums right, paths as wanted") == 4, log
