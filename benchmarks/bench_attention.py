"""Flash attention kernel against torch's scaled_dot_product_attention on the same (B, H, S, D) inputs.

    python3 benchmarks/bench_attention.py [--dtype bf16] [--json PATH] [--sweep] [--cases b128]
    pytest benchmarks/bench_attention.py --benchmark-only

Columns: ours = ``vitriton.kernels.attention`` (writes (B, S, H * D), the layout the out projection reads);
packed = ours reading q, k and v as strided views of one (B, S, 3, H, D) buffer (a packed projection's output);
sdpa = F.scaled_dot_product_attention with its default backend choice, cudnn / flash = the same call pinned
to that backend with ``torch.nn.attention.sdpa_kernel`` (n/a where the backend refuses the shape). The SDPA
calls write (B, H, S, D) and skip the transpose a model then pays, so they are the stricter baseline.
ratio = their time / ours (above 1: ours is faster); the target is ours >= cuDNN at S577 hd64 and S729 hd72.
TFLOP/s counts 4 * B * H * S * S * D (two matmuls, 2 FLOPs per multiply-add), causal rows included.
``--sweep`` also times every candidate tile configuration per shape and prints the fastest, to retune
``pick_config`` in ``vitriton/kernels/attention.py``.
Without CUDA it is a smoke run at a tiny shape through the Triton interpreter: the timings then mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import gpu_name, median_ms, versions  # noqa: E402
from vitriton.kernels.attention import AttentionConfig, attention, attention_triton  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (name, batch, heads, seq, head_dim, causal_with_padding)
GPU_CASES = [
    ("L/14-336 b128", 128, 16, 577, 64, False),
    ("so400m b128", 128, 16, 729, 72, False),
    ("B/16 b128", 128, 12, 197, 64, False),
    ("H/14 b128", 128, 16, 257, 80, False),
    ("bigG/14 b128", 128, 16, 257, 104, False),
    ("L/14-336 b1", 1, 16, 577, 64, False),
    ("so400m b1", 1, 16, 729, 72, False),
    ("text L/14 b128", 128, 12, 77, 64, True),
]
CPU_CASES = [("cpu smoke", 1, 2, 33, 72, False)]
CASES = GPU_CASES if ON_GPU else CPU_CASES
PEERS = ["sdpa", "cudnn", "flash"] if ON_GPU else ["sdpa"]

# Candidates for --sweep: (block_m, block_n, num_warps, num_stages), each with and without the tail split.
SWEEP_TILES = [
    (128, 64, 4, 3),
    (128, 64, 4, 4),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 32, 4, 3),
]


def make_inputs(case, dtype: torch.dtype):
    _, batch, heads, seq, head_dim, masked = case
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, seq, head_dim, generator=generator, device=DEVICE, dtype=dtype) for _ in range(3)
    )
    mask = None
    if masked:
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=generator, device=DEVICE)
        mask = torch.arange(seq, device=DEVICE)[None, :] >= seq - lengths[:, None]  # left padding
    return q, k, v, mask


def backend_context(peer: str):
    """The sdpa_kernel context pinning ``peer``'s backend; a null context for the default choice."""
    if peer == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[peer]
    return sdpa_kernel(backend)


def implementations(case, dtype: torch.dtype) -> dict[str, object]:
    q, k, v, mask = make_inputs(case, dtype)
    causal = mask is not None
    sdpa_mask = None
    if causal:
        seq = q.shape[2]
        sdpa_mask = torch.ones(seq, seq, dtype=torch.bool, device=DEVICE).tril() & mask[:, None, None, :]

    # q, k and v as strided views of one (B, S, 3, H, D) buffer: the layout of a cuBLAS packed QKV projection
    # whose head split is only a view (``vitriton.kernels.qkv``'s large-M path).
    packed = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).contiguous().permute(2, 0, 3, 1, 4)
    impls = {
        "ours": lambda: attention(q, k, v, causal=causal, key_padding_mask=mask),
        "ours-packed": lambda: attention(*packed.unbind(0), causal=causal, key_padding_mask=mask),
    }
    for peer in PEERS:
        impls[peer] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
    return impls


def time_impl(name: str, fn, *, reps: int) -> float:
    """Median ms of ``fn`` (inside its SDPA backend context); NaN where the backend refuses the shape."""
    try:
        with backend_context(name) if name in PEERS else contextlib.nullcontext():
            return median_ms(fn, warmup=5 if ON_GPU else 1, reps=reps)
    except RuntimeError as error:
        print(f"  {name}: n/a ({str(error).splitlines()[0][:100]})")
        return math.nan


def flop(case) -> int:
    _, batch, heads, seq, head_dim, _ = case
    return 4 * batch * heads * seq * seq * head_dim


def measure(case, dtype: torch.dtype) -> dict[str, object]:
    name, batch, heads, seq, head_dim, masked = case
    reps = 30 if ON_GPU else 2
    times = {impl: time_impl(impl, fn, reps=reps) for impl, fn in implementations(case, dtype).items()}
    row = {
        "case": name,
        "batch": batch,
        "heads": heads,
        "seq": seq,
        "head_dim": head_dim,
        "causal_padded": masked,
        "dtype": str(dtype).removeprefix("torch."),
        "ours_ms": times["ours"],
        "ours_tflops": flop(case) / times["ours"] * 1e-9,
        "ours_packed_ms": times["ours-packed"],
    }
    for peer in PEERS:
        row[f"{peer}_ms"] = times[peer]
        row[f"ratio_vs_{peer}"] = times[peer] / times["ours"]
        row[f"{peer}_tflops"] = flop(case) / times[peer] * 1e-9
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    header = f"{'case':<15} {'B':>4} {'H':>3} {'S':>5} {'hd':>4} {'dtype':<9} {'ours ms':>8}"
    header += "".join(f" {peer + ' ms':>9}" for peer in PEERS)
    header += "".join(f" {'vs ' + peer:>9}" for peer in PEERS)
    header += f" {'ours TF/s':>9}" + "".join(f" {peer + ' TF/s':>10}" for peer in PEERS)
    header += f" {'packed ms':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        line = (
            f"{row['case']:<15} {row['batch']:>4} {row['heads']:>3} {row['seq']:>5} {row['head_dim']:>4} "
            f"{row['dtype']:<9} {row['ours_ms']:>8.3f}"
        )
        line += "".join(f" {row[peer + '_ms']:>9.3f}" for peer in PEERS)
        line += "".join(f" {row['ratio_vs_' + peer]:>8.2f}x" for peer in PEERS)
        line += f" {row['ours_tflops']:>9.1f}" + "".join(f" {row[peer + '_tflops']:>10.1f}" for peer in PEERS)
        line += f" {row['ours_packed_ms']:>9.3f}"
        print(line)


def sweep(case, dtype: torch.dtype) -> list[dict[str, object]]:
    """Times every candidate configuration on ``case``; configurations that fail to compile are reported."""
    name, batch, heads, seq, head_dim, masked = case
    q, k, v, mask = make_inputs(case, dtype)
    out = torch.empty(batch, seq, heads * head_dim, dtype=dtype, device=DEVICE)
    configs = [AttentionConfig(*tile, split_tail=split) for tile in SWEEP_TILES for split in (True, False)]
    # Without a ragged tail of at most half a tile, split_tail changes nothing: time those once.
    configs = [c for c in configs if c.split_tail or 0 < seq % c.block_m <= c.block_m // 2]
    rows = []
    for config in configs:
        label = f"{config.block_m}x{config.block_n} w{config.num_warps} s{config.num_stages}"
        label += " split" if config.split_tail and 0 < seq % config.block_m <= config.block_m // 2 else ""
        fn = functools.partial(attention_triton, q, k, v, causal=masked, key_padding_mask=mask, out=out, config=config)
        try:
            ms = median_ms(fn, warmup=3 if ON_GPU else 1, reps=20 if ON_GPU else 1)
        except Exception as error:  # out of shared memory or registers on this chip: report it and go on
            print(f"  {label}: failed ({type(error).__name__}: {str(error).splitlines()[0][:80]})")
            continue
        dtype_name = str(dtype).removeprefix("torch.")
        rows.append(
            {"case": name, "dtype": dtype_name, "config": label, "ms": ms, "tflops": flop(case) / ms * 1e-9}
            | vars(config)
        )
    rows.sort(key=lambda row: row["ms"])
    print(f"\n{name} ({str(dtype).removeprefix('torch.')}): {len(rows)} configurations")
    for rank, row in enumerate(rows):
        print(f"  {'*' if rank == 0 else ' '} {row['config']:<24} {row['ms']:>8.3f} ms {row['tflops']:>7.1f} TF/s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="repeatable; default bf16 (GPU)")
    parser.add_argument("--json", type=Path, help="write the rows and the versions here")
    parser.add_argument("--sweep", action="store_true", help="also time every candidate tile configuration")
    parser.add_argument("--cases", help="only the cases whose name contains this text, e.g. 'b128'")
    args = parser.parse_args()
    names = args.dtype or (["bf16"] if ON_GPU else ["fp32", "fp16"])
    cases = [case for case in CASES if args.cases is None or args.cases in case[0]]
    if not ON_GPU:
        print("CPU smoke run through the Triton interpreter: the timings are not performance numbers.")
    print(f"device: {gpu_name()}")
    rows = [measure(case, DTYPES[name]) for name in names for case in cases]
    print_table(rows)
    sweep_rows = []
    if args.sweep:
        for name in names:
            for case in cases:
                sweep_rows += sweep(case, DTYPES[name])
        print("\nfastest configuration per case (compare with pick_config):")
        for name in names:
            for case in cases:
                dtype_name = str(DTYPES[name]).removeprefix("torch.")
                best = [row for row in sweep_rows if row["case"] == case[0] and row["dtype"] == dtype_name][:1]
                if best:
                    row = best[0]
                    print(f"  {case[0]:<15} {dtype_name:<9} {row['config']:<24} {row['tflops']:>7.1f} TF/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"benchmark": "attention", "versions": versions(), "rows": rows, "sweep": sweep_rows}
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


@pytest.mark.parametrize("impl", ["ours", "ours-packed", *PEERS])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_attention(benchmark, case, impl):
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    fn = implementations(case, dtype)[impl]
    with backend_context(impl) if impl in PEERS else contextlib.nullcontext():
        try:
            fn()  # compiles outside the timing
        except RuntimeError as error:
            pytest.skip(f"{impl} refuses this shape: {str(error).splitlines()[0][:100]}")

        def run():
            fn()
            if ON_GPU:
                torch.cuda.synchronize()

        benchmark.group = case[0]
        benchmark(run)


if __name__ == "__main__":
    main()
