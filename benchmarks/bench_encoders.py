"""The encoder report's measurements as a pytest-benchmark suite: one benchmark per model, provider and batch.

    pytest benchmarks/bench_encoders.py --benchmark-only
    VITRITON_BENCH_MODELS=clip-vit-l14-336,siglip-so400m-384 VITRITON_BENCH_PROVIDERS=vitriton,hf-compile \\
        VITRITON_BENCH_BATCH_SIZES=1,128 pytest benchmarks/bench_encoders.py --benchmark-only

The default set is small: on a GPU, CLIP ViT-B/16-224 and ViT-L/14-336 at batch 1 and 32 for vitriton,
vitriton-graphs and transformers sdpa, in bf16; without one, the toy CLIP tower on the eager path. The
environment variables above and VITRITON_BENCH_DTYPE (bf16, fp16, fp32) widen it; ``python3 -m
benchmarks.report`` is the full run. Each benchmark stores items/s, TFLOP/s, the first call, peak memory and
the error against transformers in fp32 in ``extra_info``, and fails if that error is out of bounds.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest
import torch

from benchmarks.common import first_call, median_ms, relative_error, reps_for, synchronize
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
    outputs_of,
    reference_outputs,
    unavailable,
)

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", torch.cuda.current_device()) if ON_CUDA else torch.device("cpu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# ||out - ref_fp32|| / ||ref_fp32|| bounds: loose enough for 27 layers of rounding, far below a broken kernel's ~1.
MAX_REL_ERR = {torch.bfloat16: 0.1, torch.float16: 0.05, torch.float32: 1e-3}


def _env_list(name: str, default: tuple[str, ...]) -> list[str]:
    value = os.environ.get(name)
    return [item for item in value.split(",") if item] if value else list(default)


MODELS = _env_list("VITRITON_BENCH_MODELS", ("clip-vit-b16-224", "clip-vit-l14-336") if ON_CUDA else ("tiny-clip-vit",))
PROVIDER_NAMES = _env_list(
    "VITRITON_BENCH_PROVIDERS", ("vitriton", "vitriton-graphs", "hf-sdpa") if ON_CUDA else ("vitriton", "hf-sdpa")
)
BATCH_SIZES = [int(b) for b in _env_list("VITRITON_BENCH_BATCH_SIZES", ("1", "32") if ON_CUDA else ("1", "8"))]
DTYPE = DTYPES[os.environ.get("VITRITON_BENCH_DTYPE", "bf16" if ON_CUDA else "fp32")]
SECONDS = 0.5 if ON_CUDA else 0.05
CASES = [(model, provider, batch) for model in MODELS for provider in PROVIDER_NAMES for batch in BATCH_SIZES]


class Workspace:
    """One model's weights, inputs and fp32 reference, and one provider built from them, kept across batch sizes.

    The cases run model by model and provider by provider, so holding one of each bounds memory.
    """

    def __init__(self) -> None:
        self.spec: ModelSpec | None = None
        self.provider: Provider | None = None
        self.encoder: Any = None

    def use_model(self, spec: ModelSpec) -> None:
        if spec is self.spec:
            return
        self.release()
        self.spec = spec
        self.master = build_master(spec, DEVICE)
        self.inputs = make_inputs(spec, max(BATCH_SIZES))
        self.reference = reference_outputs(self.master, self.inputs)

    def use_provider(self, provider: Provider) -> Any:
        if provider is not self.provider:
            self.encoder = self.provider = None
            gc.collect()
            if ON_CUDA:
                torch.cuda.empty_cache()
            context = BuildContext(self.spec, self.master, DTYPE, DEVICE, tuple(BATCH_SIZES))
            self.encoder, self.provider = provider.build(context), provider
        return self.encoder

    def release(self) -> None:
        self.spec = self.provider = self.encoder = None
        self.master = self.inputs = self.reference = None
        torch._dynamo.reset()
        gc.collect()
        if ON_CUDA:
            torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def workspace():
    space = Workspace()
    yield space
    space.release()


@pytest.mark.parametrize(("model", "provider", "batch"), CASES, ids=[f"{m}-{p}-b{b}" for m, p, b in CASES])
def test_encoder(benchmark, workspace: Workspace, model: str, provider: str, batch: int) -> None:
    spec, chosen = PRESETS[model], PROVIDERS[provider]
    reason = unavailable(chosen, DEVICE, "none")
    if reason is not None:
        pytest.skip(reason)
    workspace.use_model(spec)
    base_bytes = torch.cuda.memory_allocated(DEVICE) if ON_CUDA else 0
    encoder = workspace.use_provider(chosen)
    inputs = cast_inputs(workspace.inputs[:batch], DTYPE, DEVICE)
    ref_pooled, ref_hidden = workspace.reference

    def step() -> None:
        encoder(inputs)
        synchronize()

    with torch.inference_mode():
        if ON_CUDA:
            torch.cuda.reset_peak_memory_stats(DEVICE)
        first_s, output = first_call(lambda: encoder(inputs))
        pooled, hidden = outputs_of(output)
        errors = {"rel_err_hidden": relative_error(hidden, ref_hidden[:batch])}
        if pooled is not None and ref_pooled is not None:
            errors["rel_err_pooled"] = relative_error(pooled, ref_pooled[:batch])
        del output, pooled, hidden
        estimate_ms = median_ms(lambda: encoder(inputs), warmup=0, reps=2)
        rounds = reps_for(estimate_ms, SECONDS, at_least=5, at_most=100)
        warmup = reps_for(estimate_ms, SECONDS / 4, at_least=1, at_most=20)
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)

    benchmark.extra_info.update(
        model=model,
        provider=provider,
        batch=batch,
        dtype=str(DTYPE).removeprefix("torch."),
        first_call_s=first_s,
        peak_mem_gib=(torch.cuda.max_memory_allocated(DEVICE) - base_bytes) / 2**30 if ON_CUDA else None,
        **errors,
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        seconds = stats.stats.median
        benchmark.extra_info.update(items_per_s=batch / seconds, tflops=flops_per_sample(spec) * batch / seconds / 1e12)
    bound = MAX_REL_ERR[DTYPE]
    for name, error in errors.items():
        assert error <= bound, f"{model} {provider} b{batch}: {name} {error:.3e} exceeds {bound:.0e}"
