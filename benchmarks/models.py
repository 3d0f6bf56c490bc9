"""What the encoder benchmarks measure: model presets, their inputs and FLOPs, and the providers compared.

Every provider of one model is built from the same random fp32 weights (``build_master``), so their
outputs can all be checked against transformers run in fp32 on those weights (``reference_outputs``).
Full-size presets are the towers of ANCHORS.md; the ``tiny-*`` presets are toy configs for CPU smoke runs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

Encoder = Callable[[torch.Tensor], Any]  # inputs (batch first) -> a ModelOutput with last_hidden_state


@dataclass(frozen=True)
class ModelSpec:
    name: str
    tower: str  # "vision" or "text"
    model_class: type[PreTrainedModel]
    make_config: Callable[[], PretrainedConfig]
    anchor_gflop: float | None = None  # ANCHORS.md's count per sample, checked against flops_per_sample

    @property
    def unit(self) -> str:
        return "images" if self.tower == "vision" else "texts"

    @property
    def has_class_token(self) -> bool:
        return self.model_class is CLIPVisionModel

    @property
    def has_attention_pool(self) -> bool:
        return self.model_class is SiglipVisionModel


def _preset(name: str, model_class: type[PreTrainedModel], config_class: type, anchor_gflop=None, **config):
    tower = "text" if model_class is CLIPTextModel else "vision"
    return ModelSpec(name, tower, model_class, functools.partial(config_class, **config), anchor_gflop)


_CLIP_TEXT_SPECIAL = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}

PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _preset(
            "clip-vit-b16-224", CLIPVisionModel, CLIPVisionConfig, 35.1,
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
        _preset(
            "clip-vit-l14-336", CLIPVisionModel, CLIPVisionConfig, 381.9,
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
        _preset(
            "siglip-so400m-384", SiglipVisionModel, SiglipVisionConfig, 670.3,
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
            image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        ),
        _preset(
            "clip-vit-h14-224", CLIPVisionModel, CLIPVisionConfig,
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
            image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
        ),
        _preset(
            "clip-vit-bigg14-224", CLIPVisionModel, CLIPVisionConfig,
            hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
            image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
        ),
        _preset(
            "clip-text-l14", CLIPTextModel, CLIPTextConfig,
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            **_CLIP_TEXT_SPECIAL,
        ),
        _preset(
            "tiny-clip-vit", CLIPVisionModel, CLIPVisionConfig,
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
        _preset(
            "tiny-siglip-vit", SiglipVisionModel, SiglipVisionConfig,
            hidden_size=72, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        ),
        _preset(
            "tiny-clip-text", CLIPTextModel, CLIPTextConfig,
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, vocab_size=1000, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=998, eos_token_id=999, pad_token_id=1,
        ),
    )
}  # fmt: skip

GPU_MODELS = ("clip-vit-b16-224", "clip-vit-l14-336", "siglip-so400m-384", "clip-text-l14")
CPU_MODELS = ("tiny-clip-vit", "tiny-siglip-vit", "tiny-clip-text")


def tokens_per_sample(config: PretrainedConfig, spec: ModelSpec) -> int:
    if spec.tower == "text":
        return config.max_position_embeddings
    return (config.image_size // config.patch_size) ** 2 + int(spec.has_class_token)


def flops_per_sample(spec: ModelSpec) -> int:
    """FLOPs of one sample's forward, 2 per multiply-add, over the patch conv, the linears, QK^T and PV.

    Layer norms, softmax and activations are left out (a fraction of a percent). The text tower counts the
    full S x S score matrix that dense kernels compute under a causal mask. SigLIP's pooling head counts its
    one-query attention: q from the probe, k and v from every token.
    """
    config = spec.make_config()
    d, m, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    s = tokens_per_sample(config, spec)
    macs = layers * (s * (4 * d * d + 2 * d * m) + 2 * s * s * d)
    if spec.tower == "vision":
        patches = (config.image_size // config.patch_size) ** 2
        macs += patches * config.num_channels * config.patch_size**2 * d
    if spec.has_attention_pool:
        macs += (2 * s + 2) * d * d + 2 * s * d + 2 * d * m
    return 2 * macs


def build_master(spec: ModelSpec, device: torch.device | str, *, seed: int = 0) -> PreTrainedModel:
    """The preset at random fp32 weights on ``device``, eager attention: the reference every provider copies."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = spec.model_class(spec.make_config(attn_implementation="eager"))
    return model.eval()


def make_inputs(spec: ModelSpec, batch: int, *, seed: int = 0) -> torch.Tensor:
    """Seeded inputs on the CPU: pixels for a vision tower, full-length token ids (BOS ... EOS) for text."""
    config = spec.make_config()
    generator = torch.Generator().manual_seed(seed)
    if spec.tower == "vision":
        shape = (batch, config.num_channels, config.image_size, config.image_size)
        return torch.randn(shape, generator=generator)
    length = config.max_position_embeddings
    ordinary = min(config.bos_token_id, config.eos_token_id)  # the presets keep special tokens at the top
    ids = torch.randint(0, ordinary, (batch, length), generator=generator)
    ids[:, 0] = config.bos_token_id
    ids[:, -1] = config.eos_token_id
    return ids


def cast_inputs(inputs: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Pixels take the model's dtype; token ids stay integers."""
    if inputs.is_floating_point():
        return inputs.to(device=device, dtype=dtype)
    return inputs.to(device)


def outputs_of(output: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(pooler_output, last_hidden_state) of a ModelOutput or of the tuple a model returns."""
    if isinstance(output, tuple):
        return (output[1] if len(output) > 1 else None), output[0]
    return output.get("pooler_output"), output["last_hidden_state"]


@torch.inference_mode()
def reference_outputs(master: PreTrainedModel, inputs: torch.Tensor, *, chunk: int = 32):
    """(pooler_output, last_hidden_state) of the fp32 eager model, TF32 off, run ``chunk`` rows at a time."""
    pooled, hidden = [], []
    device = next(master.parameters()).device
    with _exact_fp32():
        for rows in inputs.split(chunk):
            p, h = outputs_of(master(rows.to(device)))
            pooled.append(p)
            hidden.append(h)
    return (torch.cat(pooled) if pooled[0] is not None else None), torch.cat(hidden)


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (the patch embedding), through the settings torch.compile reads."""
    matmul, conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = conv


# ---------------------------------------------------------------------------------------------------------
# Providers: ways to run one model. Each builds an Encoder from the fp32 master weights.


@dataclass
class BuildContext:
    spec: ModelSpec
    master: PreTrainedModel  # fp32 weights on ``device``
    dtype: torch.dtype
    device: torch.device
    batch_sizes: tuple[int, ...]  # the batch sizes the run will call with (CUDA-graph buckets)
    parallel: str = "none"  # "tensor": shard the weights over process_group; "data": split each batch over it
    process_group: Any = None  # with parallel "none": None, or a 1-rank group under torchrun
    compile_dynamic: bool | None = None  # torch.compile's ``dynamic``; None lets it recompile once, dynamic
    compile_mode: str | None = None


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    build: Callable[[BuildContext], Encoder]
    uses_vitriton: bool = False
    needs_cuda: bool = False
    compiles: bool = False  # its first call compiles: the report starts it from empty caches
    shards: bool = False  # can run tensor parallel over a process group


def vitriton_missing() -> str | None:
    """Why vitriton cannot be benchmarked here, or None when it can."""
    try:
        import vitriton
    except ImportError as error:
        return f"vitriton does not import: {error}"
    if not hasattr(vitriton, "from_transformers"):
        return "vitriton.from_transformers does not exist yet"
    return None


def _hf_model(ctx: BuildContext, attention: str) -> PreTrainedModel:
    model = copy.deepcopy(ctx.master).to(ctx.dtype)
    model.set_attn_implementation(attention)
    return model


def _split_batch(encoder: Encoder, group: Any) -> Encoder:
    """Data parallelism for a transformers model, as vitriton's ``parallel="data"`` does it: each rank runs
    its equal share of the batch, then the outputs are all-gathered, so every rank returns the whole batch."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)

    def gather(part: torch.Tensor | None) -> torch.Tensor | None:
        if part is None:
            return None
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part.contiguous(), group=group)
        return torch.cat(parts)

    def run(inputs: torch.Tensor) -> BaseModelOutputWithPooling:
        if inputs.shape[0] % world:
            raise ValueError(f"batch {inputs.shape[0]} does not split evenly over {world} ranks")
        pooled, hidden = outputs_of(encoder(inputs.chunk(world)[rank]))
        return BaseModelOutputWithPooling(last_hidden_state=gather(hidden), pooler_output=gather(pooled))

    return run


def _transformers(build: Callable[[BuildContext], Encoder]) -> Callable[[BuildContext], Encoder]:
    def build_parallel(ctx: BuildContext) -> Encoder:
        encoder = build(ctx)
        return _split_batch(encoder, ctx.process_group) if ctx.parallel == "data" else encoder

    return build_parallel


def _vitriton_model(ctx: BuildContext, cuda_graphs: Any = "auto") -> torch.nn.Module:
    import vitriton

    # "none" is a whole model: tensor parallelism over no group (a lone process) or a 1-rank group (torchrun).
    parallel = "tensor" if ctx.parallel == "none" else ctx.parallel
    return vitriton.from_transformers(
        ctx.master,
        dtype=ctx.dtype,
        device=ctx.device,
        process_group=ctx.process_group,
        parallel=parallel,
        cuda_graphs=cuda_graphs,
    )


def _eager(model: torch.nn.Module) -> Encoder:
    from vitriton.kernels import eager_mode

    def run(inputs: torch.Tensor) -> Any:
        with eager_mode():
            return model(inputs)

    return run


def build_vitriton(ctx: BuildContext) -> Encoder:
    model = _vitriton_model(ctx)
    # Without CUDA the report is a smoke run of the eager path, even when TRITON_INTERPRET is set.
    return model if ctx.device.type == "cuda" else _eager(model)


def build_vitriton_pair(ctx: BuildContext) -> Encoder:
    """vitriton as loaded with its single-rank residual stream off: the (delta, residual) pair path (A/B of
    ``Encoder.forward_accumulated``)."""
    from vitriton.encoders import trunk

    model = _vitriton_model(ctx)

    def run(inputs: torch.Tensor) -> Any:
        saved, trunk.ACCUMULATE_RESIDUAL = trunk.ACCUMULATE_RESIDUAL, False
        try:
            return model(inputs)
        finally:
            trunk.ACCUMULATE_RESIDUAL = saved

    return run


def build_vitriton_nographs(ctx: BuildContext) -> Encoder:
    return _vitriton_model(ctx, cuda_graphs=False)


def build_vitriton_graphs(ctx: BuildContext) -> Encoder:
    from vitriton.graphs import CUDAGraphRunner

    return CUDAGraphRunner(_vitriton_model(ctx, cuda_graphs=False), batch_sizes=ctx.batch_sizes)


def build_vitriton_eager(ctx: BuildContext) -> Encoder:
    return _eager(_vitriton_model(ctx))


def build_hf_compile(ctx: BuildContext) -> Encoder:
    return torch.compile(_hf_model(ctx, "sdpa"), dynamic=ctx.compile_dynamic, mode=ctx.compile_mode)


def _hf_compile_mode(mode: str) -> Callable[[BuildContext], Encoder]:
    def build(ctx: BuildContext) -> Encoder:
        return torch.compile(_hf_model(ctx, "sdpa"), dynamic=ctx.compile_dynamic, mode=mode)

    return build


def _vitriton_compile_mode(mode: str, cuda_graphs: Any = "auto") -> Callable[[BuildContext], Encoder]:
    """torch.compile(fullgraph=True) of vitriton as loaded (its towers then run as one op each, replaying their
    automatic graphs where the plain call would), or with ``cuda_graphs=False`` (traced through the kernels)."""

    def build(ctx: BuildContext) -> Encoder:
        model = _vitriton_model(ctx, cuda_graphs=cuda_graphs)
        return torch.compile(model, fullgraph=True, dynamic=ctx.compile_dynamic, mode=mode)

    return build


PROVIDERS: dict[str, Provider] = {
    provider.name: provider
    for provider in (
        Provider("vitriton", "vitriton as loaded: Triton kernels, automatic CUDA graphs for small calls (eager torch "
                 "ops without CUDA)", build_vitriton, uses_vitriton=True, compiles=True, shards=True),
        Provider("vitriton-nographs", "vitriton with cuda_graphs=False: every call launched from Python",
                 build_vitriton_nographs, uses_vitriton=True, shards=True),
        Provider("vitriton-graphs", "vitriton replayed from CUDA graphs, one per batch size",
                 build_vitriton_graphs, uses_vitriton=True, needs_cuda=True, shards=True),
        Provider("vitriton-pair", "vitriton as loaded, the residual stream carried as a (delta, residual) pair as "
                 "under tensor parallelism (A/B of the single-rank stream)", build_vitriton_pair, uses_vitriton=True),
        Provider("vitriton-eager", "vitriton's module graph on eager torch ops (A/B of the kernels)",
                 build_vitriton_eager, uses_vitriton=True, shards=True),
        Provider("hf-eager", "transformers, attn_implementation='eager'",
                 _transformers(lambda ctx: _hf_model(ctx, "eager"))),
        Provider("hf-sdpa", "transformers, attn_implementation='sdpa'",
                 _transformers(lambda ctx: _hf_model(ctx, "sdpa"))),
        Provider("vitriton-compile", "torch.compile(fullgraph=True) of vitriton as loaded",
                 _vitriton_compile_mode("default"), uses_vitriton=True, needs_cuda=True, compiles=True),
        Provider("vitriton-compile-ro", "torch.compile(fullgraph=True, mode='reduce-overhead') of vitriton as loaded",
                 _vitriton_compile_mode("reduce-overhead"), uses_vitriton=True, needs_cuda=True, compiles=True),
        Provider("vitriton-compile-nographs", "torch.compile(fullgraph=True) of vitriton with cuda_graphs=False",
                 _vitriton_compile_mode("default", cuda_graphs=False), uses_vitriton=True, needs_cuda=True,
                 compiles=True),
        Provider("hf-compile", "torch.compile of transformers sdpa", _transformers(build_hf_compile),
                 compiles=True),
        Provider("hf-compile-ro", "torch.compile(mode='reduce-overhead') of transformers sdpa",
                 _transformers(_hf_compile_mode("reduce-overhead")), needs_cuda=True, compiles=True),
        Provider("hf-compile-max", "torch.compile(mode='max-autotune-no-cudagraphs') of transformers sdpa",
                 _transformers(_hf_compile_mode("max-autotune-no-cudagraphs")), needs_cuda=True, compiles=True),
    )
}  # fmt: skip

GPU_PROVIDERS = ("vitriton", "vitriton-nographs", "vitriton-graphs", "hf-eager", "hf-sdpa", "hf-compile")
CPU_PROVIDERS = ("vitriton", "hf-eager", "hf-sdpa")  # torch.compile on CPU needs a C++ toolchain; opt in
BASELINE = "hf-compile"


def unavailable(provider: Provider, device: torch.device, parallel: str) -> str | None:
    """Why ``provider`` cannot run in this set-up, or None when it can."""
    if provider.needs_cuda and device.type != "cuda":
        return f"{provider.name} needs a CUDA device"
    if parallel == "tensor" and not provider.shards:
        return f"{provider.name} has no tensor-parallel form; run it with --parallel none or data"
    if provider.uses_vitriton:
        return vitriton_missing()
    return None


def batch_unsupported(provider: Provider, batch: int, parallel: str, world: int) -> str | None:
    """Why ``provider`` cannot run ``batch`` in this set-up (transformers data parallelism needs even shares)."""
    if parallel == "data" and not provider.uses_vitriton and batch % world:
        return f"batch {batch} does not split evenly over {world} ranks"
    return None
