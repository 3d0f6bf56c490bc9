"""Patch embedding, pixel_values to the tokens fed to the first LayerNorm: transformers' module (strided conv,
``torch.cat`` of the class token, position add) against vitriton's (patch copy, one GEMM, position add).

    python3 -m benchmarks.bench_patch [--batch 128] [--dtype bf16] [--pixels fp32] [--json PATH]

Both modules hold the same random weights in ``--dtype``; ``--pixels`` is the dtype the pixel values arrive in
(fp32 from an image processor; both modules cast them). vitriton's two parts are also timed alone (the patch copy,
the GEMM with its TFLOP/s), so a miss of the target (<= 0.7 ms at ViT-L/14-336 batch 128 bf16) shows where the
time goes. Without CUDA it is a smoke run of the tiny presets through the Triton interpreter: timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from transformers import CLIPVisionModel, SiglipVisionModel  # noqa: E402
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings as HFCLIPVisionEmbeddings  # noqa: E402
from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings as HFSiglipVisionEmbeddings  # noqa: E402

from benchmarks.common import median_ms, relative_error, write_rows  # noqa: E402
from benchmarks.models import PRESETS  # noqa: E402
from vitriton.encoders.clip import CLIPVisionEmbeddings  # noqa: E402
from vitriton.encoders.siglip import SiglipVisionEmbeddings  # noqa: E402
from vitriton.kernels.linear import linear  # noqa: E402
from vitriton.parallel import Weights  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
MODELS = (
    ("clip-vit-l14-336", "siglip-so400m-384", "clip-vit-b16-224") if ON_CUDA else ("tiny-clip-vit", "tiny-siglip-vit")
)
TARGET_MS = {"clip-vit-l14-336": 0.7}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# tower class of a preset -> (transformers' embeddings, vitriton's)
EMBEDDINGS = {
    CLIPVisionModel: (HFCLIPVisionEmbeddings, CLIPVisionEmbeddings),
    SiglipVisionModel: (HFSiglipVisionEmbeddings, SiglipVisionEmbeddings),
}
COLUMNS = ("model", "batch", "conv_ms", "ours_ms", "speedup", "copy_ms", "gemm_ms", "gemm_tflops", "rel_err")


def cell(column: str, value: object) -> str:
    if column == "model":
        return f"{value:>17}"
    if column == "rel_err":
        return f"{value:>11.2e}"
    return f"{value:>11.3f}" if isinstance(value, float) else f"{value:>11}"


def time_ms(fn) -> float:
    return median_ms(fn) if ON_CUDA else median_ms(fn, warmup=1, reps=2)


@torch.inference_mode()
def measure(name: str, batch: int, dtype: torch.dtype, pixel_dtype: torch.dtype) -> dict[str, object]:
    spec = PRESETS[name]
    config = spec.make_config()
    theirs_cls, ours_cls = EMBEDDINGS[spec.model_class]
    torch.manual_seed(0)
    with torch.device(DEVICE):
        theirs = theirs_cls(config).eval().to(dtype)
    ours = ours_cls("", config, Weights.from_state_dict(theirs.state_dict(), dtype=dtype, device=DEVICE))
    size = config.image_size
    px = torch.randn(batch, config.num_channels, size, size, device=DEVICE).to(pixel_dtype)
    rows, _, _ = ours.patches(px, dtype)
    weight, bias = ours.gemm_weight(), ours.patch_bias
    gemm_ms = time_ms(lambda: linear(rows, weight, bias))
    conv_ms, ours_ms = time_ms(lambda: theirs(px)), time_ms(lambda: ours(px))
    return {
        "model": name,
        "batch": batch,
        "conv_ms": conv_ms,
        "ours_ms": ours_ms,
        "speedup": conv_ms / ours_ms,
        "copy_ms": time_ms(lambda: ours.patches(px, dtype)),
        "gemm_ms": gemm_ms,
        "gemm_tflops": 2 * rows.shape[0] * rows.shape[1] * weight.numel() / gemm_ms / 1e9,
        "rel_err": relative_error(ours(px), theirs(px)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128 if ON_CUDA else 2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if ON_CUDA else "fp32")
    parser.add_argument("--pixels", choices=sorted(DTYPES), default="fp32", help="dtype of the input pixel values")
    vision = sorted(name for name, spec in PRESETS.items() if spec.tower == "vision")
    parser.add_argument("--models", nargs="+", choices=vision, default=MODELS)
    parser.add_argument("--json", type=Path, help="write the rows and versions here")
    args = parser.parse_args()
    if not ON_CUDA:
        print("CPU smoke run (Triton interpreter): timings mean nothing")
    rows = [measure(name, args.batch, DTYPES[args.dtype], DTYPES[args.pixels]) for name in args.models]
    print(f"patch embedding, {args.dtype} weights, {args.pixels} pixels; speedup = conv_ms / ours_ms")
    print("  ".join(f"{c:>17}" if c == "model" else f"{c:>11}" for c in COLUMNS))
    for row in rows:
        print("  ".join(cell(column, row[column]) for column in COLUMNS))
        target = TARGET_MS.get(row["model"])
        if ON_CUDA and target is not None and row["batch"] == 128:
            verdict = "met" if row["ours_ms"] <= target else "missed"
            print(f"  target <= {target} ms at batch 128: {verdict}")
    if args.json:
        write_rows(args.json, "patch_embedding", rows, dtype=args.dtype, pixels=args.pixels)


if __name__ == "__main__":
    main()
