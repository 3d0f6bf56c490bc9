"""``benchmarks.report --parallel all`` under torchrun with four gloo ranks on a toy tower: one run measures TP1,
TP2, TP4, DP2 and DP4 (ranks 2 and 3 wait through the 2-rank configurations), every cell matches the fp32
reference, and the JSON carries each configuration's rank count and speedup over TP1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_one_run_measures_every_configuration(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "4",
        "--standalone",
        "-m",
        "benchmarks.report",
        "--parallel",
        "all",
        "--device",
        "cpu",
        "--models",
        "tiny-clip-vit",
        "--batch-sizes",
        "1",
        "6",
        "--seconds",
        "0.01",
        "--min-reps",
        "2",
        "--matmul-size",
        "64",
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "speedup over TP1" in done.stdout

    payload = json.loads((tmp_path / "encoders_fp32_parallel4.json").read_text())
    assert payload["meta"]["parallel"] == {
        "mode": "all",
        "world_size": 4,
        "configs": ["tp1", "tp2", "tp4", "dp2", "dp4"],
    }
    rows = {(row["provider"], row["batch"]): row for row in payload["results"]}
    assert len(rows) == 10
    for config, ranks in (("tp1", 1), ("tp2", 2), ("tp4", 4), ("dp2", 2), ("dp4", 4)):
        for batch in (1, 6):
            row = rows[(f"vitriton@{config}", batch)]
            assert row["status"] == "ok", row
            assert row["ranks"] == ranks and row["parallel"] == config
            assert row["rel_err_hidden"] < 1e-5 and row["rel_err_pooled"] < 1e-5
            assert row["vs_tp1"] > 0
    assert rows[("vitriton@tp1", 6)]["vs_tp1"] == 1.0
    # Sharded layers sum in another order than the whole model: TP2's error differs from TP1's if it sharded.
    assert rows[("vitriton@tp2", 6)]["rel_err_hidden"] != rows[("vitriton@tp1", 6)]["rel_err_hidden"]
