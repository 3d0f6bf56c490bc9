"""The encoder report's measurements as a pytest-benchmark suite: one benchmark per model, provider and batch.

    pytest benchmarks/bench_encoders.py --benchmark-only
    VITRITON_BENCH_MODELS=clip-vit-l14-336,siglip-so400m-384 VITRITON_BENCH_PROVIDERS=vitriton,hf-compile \\
        VITRITON_BENCH_BATCH_SIZES=1,128 pytest benchmarks/bench_encoders.py --benchmark-only

The default set is small: on a GPU, CLIP ViT-B/16-224 and ViT-L/14-336 at batch 1 and 32 for vitriton,
vitriton-graphs and transformers sdpa, in bf16; without one, the toy CLIP tower on the eager path. The
environment variables above and VITRITON_BENCH_DTYPE (bf16, fp16, fp32) widen it; ``python3 -m
benchmarks.report`` is the full run. Each benchmark first measures its cell with the report's own code
(``report.measure``: first call, error against transformers in fp32, timed median, peak memory), stores that row in
``extra_info`` and fails if the error is out of bounds; pytest-benchmark then times as many calls as the report did.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from rich.console import Console
from rich.progress import Progress

from benchmarks import report
from benchmarks.common import synchronize
from benchmarks.models import (
    PRESETS,
    PROVIDERS,
    BuildContext,
    ModelSpec,
    Provider,
    build_master,
    cast_inputs,
    flops_per_sample,
    make_inputs,
    reference_outputs,
    unavailable,
)

ON_CUDA = torch.cuda.is_available()
# ||out - ref_fp32|| / ||ref_fp32|| bounds: loose enough for 27 layers of rounding, far below a broken kernel's ~1.
MAX_REL_ERR = {torch.bfloat16: 0.1, torch.float16: 0.05, torch.float32: 1e-3}


def _env_list(name: str, default: tuple[str, ...]) -> list[str]:
    value = os.environ.get(name)
    return [item for item in value.split(",") if item] if value else list(default)


# The report's own options, so names are checked as it checks them and the timing budget is its own.
ARGS = report.parse_args(
    [
        "--models",
        *_env_list(
            "VITRITON_BENCH_MODELS", ("clip-vit-b16-224", "clip-vit-l14-336") if ON_CUDA else ("tiny-clip-vit",)
        ),
        "--providers",
        *_env_list(
            "VITRITON_BENCH_PROVIDERS",
            ("vitriton", "vitriton-graphs", "hf-sdpa") if ON_CUDA else ("vitriton", "hf-sdpa"),
        ),
        "--batch-sizes",
        *_env_list("VITRITON_BENCH_BATCH_SIZES", ("1", "32") if ON_CUDA else ("1", "8")),
        "--dtype",
        os.environ.get("VITRITON_BENCH_DTYPE", "bf16" if ON_CUDA else "fp32"),
        "--seconds",
        "0.5" if ON_CUDA else "0.05",
    ]
)
CASES = [(model, provider, batch) for model in ARGS.models for provider in ARGS.providers for batch in ARGS.batch_sizes]


class Workspace:
    """One model's weights, inputs and fp32 reference, and one provider built from them, kept across batch sizes.

    The cases run model by model and provider by provider, so holding one of each bounds memory.
    """

    def __init__(self) -> None:
        progress = Progress(disable=True)
        par = report.Parallel.start("none", "auto")
        dtype = report.DTYPES[ARGS.dtype]
        self.run = report.Run(ARGS, par, dtype, None, None, Console(quiet=True), progress, progress.add_task(""))
        self.spec: ModelSpec | None = None
        self.provider: Provider | None = None
        self.encoder: Any = None

    def use_model(self, spec: ModelSpec) -> None:
        if spec is self.spec:
            return
        self.release()
        self.spec = spec
        self.master = build_master(spec, self.run.device)
        inputs = make_inputs(spec, max(ARGS.batch_sizes))
        self.reference = reference_outputs(self.master, inputs)
        self.inputs = cast_inputs(inputs, self.run.dtype, self.run.device)

    def use_provider(self, provider: Provider) -> Any:
        if provider is not self.provider:
            self.release_provider()
            self.base_bytes = self.run.allocated()
            context = BuildContext(self.spec, self.master, self.run.dtype, self.run.device, tuple(ARGS.batch_sizes))
            self.encoder, self.provider, self.first_call_kind = provider.build(context), provider, "build"
        return self.encoder

    def release_provider(self) -> None:
        provider, self.provider, self.encoder = self.provider, None, None
        if provider is not None:
            report._release(provider)

    def release(self) -> None:
        self.release_provider()
        self.spec = self.master = self.inputs = self.reference = None


@pytest.fixture(scope="module")
def workspace():
    space = Workspace()
    yield space
    space.release()


@pytest.mark.parametrize(("model", "provider", "batch"), CASES, ids=[f"{m}-{p}-b{b}" for m, p, b in CASES])
def test_encoder(benchmark, workspace: Workspace, model: str, provider: str, batch: int) -> None:
    spec, chosen = PRESETS[model], PROVIDERS[provider]
    reason = unavailable(chosen, workspace.run.device, "none")
    if reason is not None:
        pytest.skip(reason)
    workspace.use_model(spec)
    encoder = workspace.use_provider(chosen)
    inputs = workspace.inputs[:batch]
    with torch.inference_mode():
        row = report.measure(
            workspace.run,
            encoder,
            inputs,
            workspace.reference,
            spec=spec,
            provider=provider,
            flops=flops_per_sample(spec),
            base_bytes=workspace.base_bytes,
            first_call_kind=workspace.first_call_kind,
        )
        workspace.first_call_kind = "new batch size"
        benchmark.extra_info.update(row, dtype=ARGS.dtype)

        def step() -> None:
            encoder(inputs)
            synchronize()

        benchmark.pedantic(step, rounds=row["reps"], warmup_rounds=0, iterations=1)

    bound = MAX_REL_ERR[workspace.run.dtype]
    for name in ("rel_err_pooled", "rel_err_hidden"):
        error = row[name]
        assert error is None or error <= bound, f"{model} {provider} b{batch}: {name} {error:.3e} exceeds {bound:.0e}"
