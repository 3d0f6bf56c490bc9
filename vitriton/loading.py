"""``vitriton.from_pretrained`` / ``vitriton.from_transformers``: pick the vitriton class a checkpoint or model
names, then load it with that class's ``from_pretrained`` / ``from_transformers`` (encoders/pretrained.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from torch import nn

from vitriton.encoders import clip, siglip
from vitriton.encoders.pretrained import hub_options, resolve_checkpoint
from vitriton.encoders.trunk import TextTransformer, VisionTransformer
from vitriton.parallel import CheckpointError

# transformers class name (config.json's ``architectures``) -> vitriton class.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        clip.CLIPModel,
        clip.CLIPVisionModel,
        clip.CLIPTextModel,
        clip.CLIPVisionModelWithProjection,
        clip.CLIPTextModelWithProjection,
        siglip.SiglipModel,
        siglip.SiglipVisionModel,
        siglip.SiglipTextModel,
    )
}
# model_type -> {tower: vitriton class}; tower None is the whole checkpoint.
MODEL_TYPES: dict[str, dict[str | None, type[nn.Module]]] = {
    "clip": {None: clip.CLIPModel, "vision": clip.CLIPVisionModel, "text": clip.CLIPTextModel},
    "siglip": {None: siglip.SiglipModel, "vision": siglip.SiglipVisionModel, "text": siglip.SiglipTextModel},
    "clip_vision_model": {None: clip.CLIPVisionModel, "vision": clip.CLIPVisionModel},
    "clip_text_model": {None: clip.CLIPTextModel, "text": clip.CLIPTextModel},
    "siglip_vision_model": {None: siglip.SiglipVisionModel, "vision": siglip.SiglipVisionModel},
    "siglip_text_model": {None: siglip.SiglipTextModel, "text": siglip.SiglipTextModel},
}
# Classes a CLIP/SigLIP checkpoint may name that vitriton does not implement: their towers load with tower=.
UNSUPPORTED = {
    "CLIPForImageClassification": "vision",
    "SiglipForImageClassification": "vision",
}


def composite_towers(config: Mapping) -> dict[str, list[str]]:
    """The CLIP/SigLIP towers a checkpoint of another model holds, read from its config.json's sub-configs (LLaVA's
    and PaliGemma's ``vision_config``, a VisionEncoderDecoderModel's ``encoder``): {tower: [their model_types]}."""
    held: dict[str, list[str]] = {}
    for sub in config.values():
        if isinstance(sub, Mapping) and sub.get("model_type") in MODEL_TYPES:
            tower = getattr(MODEL_TYPES[sub["model_type"]][None], "tower", None)
            if tower is not None:  # a full clip/siglip config nested in another model is not a tower config
                held.setdefault(tower, []).append(sub["model_type"])
    return held


def pick_class(
    model_type: str | None,
    architectures: Sequence[str] | None,
    tower: str | None,
    held: Mapping[str, Sequence[str]] | None = None,
) -> type[nn.Module]:
    """The vitriton class for a checkpoint: ``architectures`` first (so *WithProjection loads as itself), then
    ``model_type``; ``tower`` picks one tower of a full model, or of another model that holds CLIP/SigLIP towers
    (``held``, from :func:`composite_towers`)."""
    if tower not in (None, "vision", "text"):
        raise ValueError(f"tower={tower!r}; expected None, 'vision' or 'text'")
    if model_type not in MODEL_TYPES:
        # A config naming a CLIP/SigLIP class under another model_type is broken, not a model holding towers.
        if not held or any(name in ARCHITECTURES or name in UNSUPPORTED for name in architectures or ()):
            raise ValueError(f"unknown model_type {model_type!r}; vitriton loads {', '.join(MODEL_TYPES)}")
        if tower is not None and len(held.get(tower, ())) == 1:
            return MODEL_TYPES[held[tower][0]][tower]
        name = architectures[0] if architectures else f"model_type {model_type!r}"
        towers = ", ".join(f"a {t} tower ({' and '.join(types)})" for t, types in held.items())
        if tower is not None and tower in held:
            raise ValueError(
                f"the {name} checkpoint holds {towers}; vitriton.from_pretrained cannot tell which one tower={tower!r} "
                f"means: load it with its class, naming it with prefix="
            )
        raise ValueError(
            f"vitriton does not implement {name}; it holds {towers}: pass "
            + " or ".join(f"tower={t!r}" for t in held)
            + " to load one, or accelerate the transformers model with vitriton.patch"
        )
    for name in architectures or ():
        if name in ARCHITECTURES and tower in (None, getattr(ARCHITECTURES[name], "tower", None)):
            return ARCHITECTURES[name]
        if name in UNSUPPORTED and tower is None:
            raise ValueError(
                f"the checkpoint is a {name}, which vitriton does not implement; load its {UNSUPPORTED[name]} tower "
                f"with tower={UNSUPPORTED[name]!r}"
            )
    classes = MODEL_TYPES[model_type]
    if tower not in classes:
        only = next(t for t in classes if t is not None)
        raise ValueError(f"tower={tower!r} asked of a {model_type} checkpoint, which holds only the {only} tower")
    return classes[tower]


def from_pretrained(
    path: str | os.PathLike,
    *,
    tower: str | None = None,
    dtype=None,
    torch_dtype=None,
    device=None,
    process_group=None,
    parallel: str = "tensor",
    prefix: str | None = None,
    feature_layers: int | Sequence[int] | None = None,
    num_layers: int | None = None,
    check_inputs: bool | None = None,
    cuda_graphs: str | bool | Sequence[int] = "auto",
    **options,
) -> nn.Module:
    """Loads the model a checkpoint's config.json names (``architectures``, else ``model_type``: clip, siglip and
    their towers, CLIP's *WithProjection classes) from a local directory or a Hub repo id already in the local
    Hugging Face cache; ``tower="vision"``/``"text"`` picks one tower of a full checkpoint, or of a checkpoint of
    another model whose config holds a CLIP/SigLIP tower's (LLaVA, PaliGemma, VisionTextDualEncoderModel, ...).

    - ``dtype``: a torch dtype, its name, or "auto"; default the config's, else the stored weights' (``torch_dtype``
      is the deprecated alias).
    - ``device``: default the current CUDA device, else CPU.
    - ``process_group`` / ``parallel``: default the default group when torch.distributed is initialised.
      ``parallel="tensor"`` shards heads and MLP columns over the group's ranks (each reads only its slices) and
      needs every rank to pass the same batch; ``parallel="data"`` gives every rank the full weights, splits each
      batch and gathers the outputs, and needs every rank to pass the same full batch (a batch smaller than the
      world size runs whole on every rank). ``parallel="auto"`` picks at load time: data when the full weights
      fit every rank's budget (a quarter of the device's memory, of the host's memory over its ranks on the CPU,
      or ``VITRITON_WEIGHT_BUDGET_GIB``), tensor otherwise. ``model.parallel_mode`` (and its repr) says which
      ran: "data", "tensor", or "none" for a single rank.
    - ``check_inputs``: check on each call that all ranks passed the same inputs (default: the
      ``VITRITON_CHECK_INPUTS`` environment variable).
    - ``prefix``: where the model sits in the checkpoint, when not found on its own.
    - ``feature_layers`` / ``num_layers`` (one tower only): build only the layers those calls can reach.
    - ``cuda_graphs``: "auto" (default): small calls replay from CUDA graphs captured on their second call;
      ``True`` or batch-size buckets: every call up to the largest bucket replays; ``False``: none
      (vitriton.graphs, :func:`vitriton.enable_cuda_graphs`).
    - transformers' own loading keywords, so that its calls run unchanged (``TRANSFORMERS_OPTIONS``):
      ``revision``, ``cache_dir``, ``token`` and ``subfolder`` find the checkpoint, ``variant`` its variant
      files (``model.fp16.safetensors``), ``config=`` (a config or
      its path) replaces its config.json, ``device_map`` names one device, and ``attn_implementation``,
      ``local_files_only``, ``low_cpu_mem_usage``, ``trust_remote_code`` and ``use_safetensors`` change nothing.
    """
    lookup, given, _ = hub_options(dict(options))
    directory = resolve_checkpoint(path, **lookup)
    if given is not None:
        config = given.to_dict()
    else:
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{directory} has no config.json")
        try:
            config = json.loads(config_file.read_text())
        except ValueError as err:
            raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    cls = pick_class(config.get("model_type"), config.get("architectures"), tower, composite_towers(config))
    return cls.from_pretrained(
        path,
        dtype=dtype,
        torch_dtype=torch_dtype,
        device=device,
        process_group=process_group,
        parallel=parallel,
        prefix=prefix,
        feature_layers=feature_layers,
        num_layers=num_layers,
        check_inputs=check_inputs,
        cuda_graphs=cuda_graphs,
        **options,
    )


def from_transformers(model: nn.Module, *, tower: str | None = None, **kwargs) -> nn.Module:
    """The vitriton model matching an in-memory transformers CLIP/SigLIP model (its class, else its config's
    model_type), built from its config and ``state_dict()``; keyword arguments as :func:`from_pretrained`.
    Weights in the requested dtype and device are shared with ``model``, not copied, except the packed q/k/v
    weights, a patch-embedding weight whose row (channels * patch * patch) is not whole 16 bytes (it is kept
    padded), and, under tensor parallelism, the row-parallel column slices and MLP shards padded to 16 bytes."""
    if any(isinstance(m, VisionTransformer | TextTransformer) for m in model.modules()):
        raise ValueError(
            f"this {type(model).__name__} already runs vitriton's towers (vitriton.patch): use it as it is, or "
            f"call from_transformers on a model that was not patched"
        )
    cls = pick_class(model.config.model_type, [type(model).__name__], tower, composite_towers(model.config.to_dict()))
    return cls.from_transformers(model, **kwargs)
