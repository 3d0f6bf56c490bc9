"""Building vitriton models from a local Hugging Face checkpoint directory or an in-memory transformers model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    SiglipConfig,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from vitriton.encoders import clip, siglip
from vitriton.encoders.trunk import Tower
from vitriton.parallel import CheckpointError, Weights, default_group
from vitriton.parallel.group import ProcessGroup

# model_type -> (config class, {tower: (model class, checkpoint prefix)}); tower None is the whole checkpoint.
FULL_MODELS = {
    "clip": (
        CLIPConfig,
        {None: clip.CLIPModel, "vision": clip.CLIPVisionModel, "text": clip.CLIPTextModel},
    ),
    "siglip": (
        SiglipConfig,
        {None: siglip.SiglipModel, "vision": siglip.SiglipVisionModel, "text": siglip.SiglipTextModel},
    ),
}
TOWER_MODELS = {
    "clip_vision_model": (CLIPVisionConfig, clip.CLIPVisionModel, "vision"),
    "clip_text_model": (CLIPTextConfig, clip.CLIPTextModel, "text"),
    "siglip_vision_model": (SiglipVisionConfig, siglip.SiglipVisionModel, "vision"),
    "siglip_text_model": (SiglipTextConfig, siglip.SiglipTextModel, "text"),
}
SUPPORTED = tuple(FULL_MODELS) + tuple(TOWER_MODELS)
PARALLEL_MODES = ("tensor", "data")


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _build(
    model_type: str,
    load_config: Callable[[type], object],
    make_weights: Callable[[torch.dtype, ProcessGroup | None, torch.device], Weights],
    *,
    tower: str | None,
    expect: type | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    process_group: ProcessGroup | None,
    parallel: str,
) -> nn.Module:
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r}; expected one of {PARALLEL_MODES}")
    if tower not in (None, "vision", "text"):
        raise ValueError(f"tower={tower!r}; expected None, 'vision' or 'text'")
    if expect is not None and tower is None:
        tower = getattr(expect, "tower", None)
    if process_group is None:
        process_group = default_group()

    if model_type in FULL_MODELS:
        config_cls, classes = FULL_MODELS[model_type]
        config = load_config(config_cls)
        model_cls = classes[tower]
        prefix = {None: "", "vision": "vision_model", "text": "text_model"}[tower]
        sub_config = {
            None: config,
            "vision": getattr(config, "vision_config", None),
            "text": getattr(config, "text_config", None),
        }[tower]
    elif model_type in TOWER_MODELS:
        config_cls, model_cls, own_tower = TOWER_MODELS[model_type]
        if tower not in (None, own_tower):
            raise ValueError(
                f"tower={tower!r} asked of a {model_type} checkpoint, which holds only the {own_tower} tower"
            )
        sub_config = load_config(config_cls)
        prefix = None
    else:
        raise ValueError(f"unknown model_type {model_type!r}; vitriton loads {', '.join(SUPPORTED)}")
    if expect is not None and model_cls is not expect:
        raise TypeError(f"this checkpoint holds a {model_cls.__name__}, not a {expect.__name__}")

    if dtype is None:
        dtype = _config_dtype(sub_config)
    device = torch.device(device) if device is not None else _default_device()
    weights = make_weights(dtype, process_group if parallel == "tensor" else None, device)
    if prefix is None:
        # A tower saved on its own: older checkpoints nest it under vision_model./text_model., transformers 5 does not.
        nested = f"{own_tower}_model"
        prefix = nested if weights.has_prefix(nested) else ""
    model = model_cls(prefix, sub_config, weights)
    if parallel == "data":
        for module in model.modules():
            if isinstance(module, Tower):
                module.data_group = process_group
    return model.eval()


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    process_group: ProcessGroup | None = None,
    parallel: str = "tensor",
    tower: str | None = None,
    expect: type | None = None,
) -> nn.Module:
    """Loads the model a local checkpoint's config.json names (clip, clip_vision_model, clip_text_model,
    siglip, siglip_vision_model, siglip_text_model); ``tower="vision"``/``"text"`` picks one tower of a full
    checkpoint. ``dtype`` defaults to the config's, ``device`` to the current CUDA device (else CPU), and
    ``process_group`` to the default group when torch.distributed is initialised.

    ``parallel="tensor"`` shards heads and MLP columns over the group's ranks (each reads only its slices);
    ``parallel="data"`` gives every rank the full weights and splits each batch, gathering the outputs.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except ValueError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    return _build(
        model_type,
        lambda config_cls: config_cls.from_pretrained(path),
        lambda dtype, group, device: Weights(path, dtype=dtype, device=device, process_group=group),
        tower=tower,
        expect=expect,
        dtype=dtype,
        device=device,
        process_group=process_group,
        parallel=parallel,
    )


def from_transformers(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    process_group: ProcessGroup | None = None,
    parallel: str = "tensor",
    tower: str | None = None,
) -> nn.Module:
    """Builds the vitriton model matching an in-memory transformers CLIP/SigLIP model from its config and
    state dict (weights are copied, in ``dtype``; default the model's own parameter dtype)."""
    config = model.config
    if dtype is None:
        dtype = next(model.parameters()).dtype
    state_dict = model.state_dict()
    return _build(
        config.model_type,
        lambda config_cls: config,
        lambda dtype, group, device: Weights.from_state_dict(
            state_dict, dtype=dtype, device=device, process_group=group
        ),
        tower=tower,
        expect=None,
        dtype=dtype,
        device=device,
        process_group=process_group,
        parallel=parallel,
    )
