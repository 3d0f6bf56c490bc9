"""``vitriton.patch(model)``: accelerate a transformers model in memory, in place.

Every CLIP/SigLIP tower in the module tree (transformers 5.17's ``CLIPVisionModel``, ``CLIPTextModel``,
``SiglipVisionModel``, ``SiglipTextModel``: the towers that ``CLIPModel``, ``SiglipModel``, the
``*WithProjection`` classes, LLaVA and LLaVA-NeXT hold) is replaced by vitriton's tower built from its own
tensors, and the model around it keeps calling it as before: transformers' outer classes pass their keyword
arguments (``return_dict``, ``output_hidden_states``, ``interpolate_pos_encoding``, LLaVA's ``image_sizes``)
and read the same outputs.

Weights are shared, not copied: vitriton's parameters are the transformers tensors themselves (same storage),
so patching adds only the packed ``[q; k; v]`` weight of each layer (a concatenation has to be new memory); the
separate q/k/v tensors go with the replaced transformers tower. A tensor that is a slice of a larger one (a rank's
shard under tensor parallelism, the query rows of SigLIP's pooling head) is copied, so the larger one can go too.
The patched model's ``state_dict`` keeps transformers' keys and shapes (vitriton's modules convert theirs in
state-dict hooks), so a checkpoint saved after patching loads into the unpatched model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.models.clip import modeling_clip
from transformers.models.siglip import modeling_siglip

from vitriton.encoders import clip, siglip
from vitriton.encoders.pretrained import PARALLEL_MODES
from vitriton.encoders.trunk import TextTransformer, VisionTransformer
from vitriton.graphs import HOOK_NAMES, check_cuda_graphs, enable_cuda_graphs
from vitriton.parallel.data import TowerWrapper
from vitriton.parallel.group import ProcessGroup

# transformers' tower class -> (vitriton model class that loads it, the attribute holding vitriton's tower)
TOWERS: dict[type[nn.Module], tuple[type[nn.Module], str]] = {
    modeling_clip.CLIPVisionModel: (clip.CLIPVisionModel, "vision_model"),
    modeling_clip.CLIPTextModel: (clip.CLIPTextModel, "text_model"),
    modeling_siglip.SiglipVisionModel: (siglip.SiglipVisionModel, "vision_model"),
    modeling_siglip.SiglipTextModel: (siglip.SiglipTextModel, "text_model"),
}


def patch(
    model: nn.Module,
    *,
    process_group: ProcessGroup | None = None,
    parallel: str = "tensor",
    cuda_graphs: str | bool | Sequence[int] = "auto",
) -> nn.Module:
    """Replaces every transformers CLIP/SigLIP tower in ``model`` by vitriton's, in place, and returns ``model``.

    The towers keep the dtype and device of their parameters, and their training mode. ``process_group`` (default:
    the default group when torch.distributed is initialised) and ``parallel`` are those of
    :func:`vitriton.from_pretrained`: in tensor mode each rank keeps its shard of the full in-memory weights, in
    data mode the whole tower and its share of each batch; ``"auto"`` picks one per tower by its size, as
    :func:`vitriton.from_pretrained` does. ``cuda_graphs`` as :func:`vitriton.enable_cuda_graphs`. A model whose
    towers are vitriton's already is left as it is (patching twice changes nothing). When ``model`` is itself a
    tower (``CLIPVisionModel``, ...), the object becomes vitriton's tower (its class changes; the identity, the
    children's layout and ``model.config`` stay), with transformers' model attributes (``device``, ``dtype``,
    ``get_input_embeddings()``, ...).
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r}; expected one of {PARALLEL_MODES}")
    check_cuda_graphs(model, cuda_graphs)
    found = [(name, module) for name, module in model.named_modules() if type(module) in TOWERS]
    if not found:
        if not any(isinstance(m, (VisionTransformer, TextTransformer)) for m in model.modules()):
            searched = ", ".join(f"{cls.__module__.split('.')[-1]}.{cls.__name__}" for cls in TOWERS)
            raise ValueError(
                f"vitriton.patch found no CLIP or SigLIP tower in {type(model).__name__}; it looks for "
                f"transformers' {searched} among the model's submodules"
            )
        return enable_cuda_graphs(model, cuda_graphs)
    towers = [accelerate(module, process_group=process_group, parallel=parallel) for _, module in found]
    for (name, module), tower in zip(found, towers, strict=True):
        check_hooks_have_a_place(module, tower, f"{type(model).__name__}.{name}" if name else type(model).__name__)
    for (name, module), tower in zip(found, towers, strict=True):
        move_hooks(module, tower)
        if name:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, tower)
        else:
            # The model is the tower: the same object becomes vitriton's tower, which keeps transformers 5.17's
            # layout of these classes (embeddings, encoder, ... as children) and its model attributes (device,
            # dtype, get_input_embeddings, ...), so the caller's reference works.
            model.__class__ = type(tower)
            model.__dict__ = tower.__dict__
    return enable_cuda_graphs(model, cuda_graphs)


def accelerate(module: nn.Module, *, process_group: ProcessGroup | None, parallel: str) -> nn.Module:
    """vitriton's tower for one transformers tower, sharing its tensors (wrapped for data parallelism when asked),
    in the training mode the transformers tower was in."""
    model_cls, attribute = TOWERS[type(module)]
    parameter = next(module.parameters())
    built = model_cls.from_transformers(
        module, dtype=parameter.dtype, device=parameter.device, process_group=process_group, parallel=parallel
    )
    tower = getattr(built, attribute).train(module.training)  # built in eval mode; dropout follows the mode
    with torch.no_grad():
        for tensor in tower.parameters():
            if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
                tensor.data = tensor.data.clone()
    return tower


# The dicts of nn.Module that hold its forward and backward hooks (graphs.HOOK_NAMES) and their flags, keyed by the
# hooks' ids; a hook's handle points at them.
HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
# transformers 5 puts forward hooks of its own on its layers at their first call, to collect hidden states and
# attentions for output_hidden_states / output_attentions; they belong to transformers' modules and stay with them.
TRANSFORMERS_CAPTURE = "transformers.utils.output_capturing"


def users_hooks(part: nn.Module) -> dict[str, list[int]]:
    """The ids of ``part``'s forward and backward hooks in each hook dict, transformers' own capture hooks left out."""
    return {
        attribute: [
            key
            for key, hook in getattr(part, attribute).items()
            if getattr(hook, "__module__", None) != TRANSFORMERS_CAPTURE
        ]
        for attribute in HOOK_NAMES
    }


def hooked_parts(module: nn.Module) -> list[str]:
    """The names of ``module``'s submodules (itself as "") that hold hooks a user registered."""
    return [name for name, part in module.named_modules() if any(users_hooks(part).values())]


def find_part(tower: nn.Module, name: str) -> nn.Module | None:
    """The submodule ``name`` of vitriton's tower (inside its data-parallel wrapper, if any), or None."""
    if not name:
        return tower
    inner = tower.module if isinstance(tower, TowerWrapper) else tower
    try:
        return inner.get_submodule(name)
    except AttributeError:
        return None


def check_hooks_have_a_place(module: nn.Module, tower: nn.Module, where: str) -> None:
    """Raises, before the model is changed, when a hook sits on a part of the transformers tower that vitriton's
    tower lacks (``q_proj``, ``k_proj`` and ``v_proj`` are one packed weight, ``patch_embedding`` a GEMM weight)."""
    lost = [name for name in hooked_parts(module) if find_part(tower, name) is None]
    if lost:
        raise ValueError(
            f"vitriton.patch: {where} has hooks on {', '.join(lost)}, which vitriton's tower does not hold as "
            f"modules; remove those hooks before patching (hooks on the tower and on the parts it shares with "
            f"transformers' layout, such as encoder.layers[i] and their mlp, self_attn and layer norms, move over)"
        )


def move_hooks(module: nn.Module, tower: nn.Module) -> None:
    """Moves the hooks registered on the transformers tower and its submodules to the parts of vitriton's tower of
    the same names (its layout is transformers 5.17's), so they keep running. The hook dicts themselves move, so
    the hooks' handles still remove them; transformers' capture hooks are dropped from them first."""
    for name in hooked_parts(module):
        old, new = module.get_submodule(name), find_part(tower, name)
        kept = users_hooks(old)
        for attribute in HOOK_NAMES:
            hooks = getattr(old, attribute)
            for key in [key for key in hooks if key not in kept[attribute]]:
                del hooks[key]
                for flags in HOOK_FLAGS:
                    getattr(old, flags).pop(key, None)
        for attribute in HOOK_NAMES + HOOK_FLAGS:
            hooks = getattr(old, attribute)
            hooks.update(getattr(new, attribute))
            setattr(new, attribute, hooks)
        if old._backward_hooks:
            new._is_full_backward_hook = old._is_full_backward_hook
