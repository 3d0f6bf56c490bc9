"""The outer model classes around the towers, as transformers 5.17 names them: a tower alone (``*VisionModel``,
``*TextModel``), a tower with its projection (``CLIP*ModelWithProjection``) and both towers with the image-text
logits (``CLIPModel``, ``SiglipModel``). Each takes transformers' arguments in its positional order and returns
its output types; ``return_dict=False`` gives ``ModelOutput.to_tuple()``, as transformers' ``can_return_tuple``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vitriton.encoders.pretrained import PretrainedMixin
from vitriton.encoders.trunk import (
    TextTransformer,
    VisionTransformer,
    compute_dtype,
    config_flag,
    interpreter_guard,
    normalize,
    returned,
)
from vitriton.parallel import ReplicatedLinear, Weights, join
from vitriton.parallel.data import nest_hooks


def default_return_dict(config, return_dict: bool | None) -> bool:
    return config_flag(config, "return_dict", True) if return_dict is None else return_dict


def project(projection: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """``projection(pooled)`` under the towers' interpreter guard: a bf16 projection on CPU under
    TRITON_INTERPRET=1 takes the eager reference, as the towers' linears do."""
    with interpreter_guard(compute_dtype(pooled, projection.weight.dtype), pooled.device):
        return projection(pooled)


class NestedTower:
    """An outer model whose tower is its child ``nested``, and whose tower's parts read and write as its own.
    transformers 5.17's ``*VisionModel`` / ``*TextModel`` hold the tower's parts themselves, so code written for
    them reads ``model.encoder.layers[i]`` (to hook a layer), ``model.embeddings`` or ``model.post_layernorm``, and
    assigns ``model.head = nn.Identity()`` to take features; here those names are the tower's submodules (the same
    objects), read from it, assigned and deleted in it, as its state dict's keys are the tower's."""

    nested: str
    # Plain attributes of the tower that transformers' class holds itself (CLIP's eos_token_id, which its forward
    # reads when called), read and assigned in the tower as its submodules are.
    tower_attributes: tuple[str, ...] = ()

    def _tower_holding(self, name: str) -> nn.Module | None:
        """The tower, when it holds a submodule ``name`` (or ``name`` is one of ``tower_attributes``) and this model
        holds nothing of that name; else None."""
        modules = self.__dict__.get("_modules", {})
        tower = modules.get(self.nested)
        if tower is None or name in modules or name in self.__dict__:
            return None
        return tower if name in tower._modules or name in self.tower_attributes else None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            tower = self._tower_holding(name)
            if tower is None:
                raise
            return getattr(tower, name)

    def __setattr__(self, name: str, value) -> None:
        tower = self._tower_holding(name)
        if tower is None:
            super().__setattr__(name, value)
        else:
            setattr(tower, name, value)

    def __delattr__(self, name: str) -> None:
        tower = self._tower_holding(name)
        if tower is None:
            super().__delattr__(name)
        else:
            delattr(tower, name)


class VisionModel(NestedTower, PretrainedMixin, nn.Module):
    """A vision tower as transformers' ``*VisionModel``; the tower itself is ``.vision_model``, whose parts read
    as the model's own (``model.encoder``: :class:`NestedTower`). Its state dict's keys are the tower's
    (``embeddings...``), as transformers 5 lays out the class; keys under ``vision_model.`` load too."""

    tower = "vision"
    nested = "vision_model"
    transformer_cls: type[VisionTransformer]

    def __init__(self, prefix: str, config, weights: Weights, num_layers: int | None = None):
        super().__init__()
        self.config = config
        self.vision_model = self.transformer_cls(prefix, config, weights, num_layers)
        nest_hooks(self)

    def forward(self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False, **kwargs):
        return self.vision_model(pixel_values, interpolate_pos_encoding, **kwargs)


class TextModel(NestedTower, PretrainedMixin, nn.Module):
    """A text tower as transformers' ``*TextModel``; the tower itself is ``.text_model``, and its parts and state
    dict's keys read as the model's own, as for :class:`VisionModel`."""

    tower = "text"
    nested = "text_model"
    transformer_cls: type[TextTransformer]

    def __init__(self, prefix: str, config, weights: Weights, num_layers: int | None = None):
        super().__init__()
        self.config = config
        self.text_model = self.transformer_cls(prefix, config, weights, num_layers)
        nest_hooks(self)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        return self.text_model(input_ids, attention_mask, position_ids, **kwargs)


class TowerWithProjection(PretrainedMixin, nn.Module):
    """A tower (``vision_model`` / ``text_model``) and its projection (``visual_projection`` / ``text_projection``);
    the output's ``image_embeds`` / ``text_embeds`` is the projected pooled output. ``prefix`` is the root that
    holds both."""

    projected = True
    tower: str
    transformer_cls: type
    output_cls: type

    def __init__(self, prefix: str, config, weights: Weights, num_layers: int | None = None):
        super().__init__()
        self.config = config
        tower = self.transformer_cls(join(prefix, f"{self.tower}_model"), config, weights, num_layers)
        projection = ReplicatedLinear.load(
            join(prefix, self.projection_name),
            weights,
            in_features=config.hidden_size,
            out_features=config.projection_dim,
            bias=False,
        )
        setattr(self, f"{self.tower}_model", tower)
        setattr(self, self.projection_name, projection)

    @property
    def projection_name(self) -> str:
        return "visual_projection" if self.tower == "vision" else "text_projection"

    def project(self, out: BaseModelOutputWithPooling, return_dict: bool | None):
        projection = getattr(self, self.projection_name)
        embeds = None if out.pooler_output is None else project(projection, out.pooler_output)
        output = self.output_cls(
            embeds, last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return returned(output, default_return_dict(self.config, return_dict))


class VisionModelWithProjection(TowerWithProjection):
    tower = "vision"

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        *,
        return_dict: bool | None = None,
        **kwargs,
    ):
        out = self.vision_model(pixel_values, interpolate_pos_encoding, return_dict=True, **kwargs)
        return self.project(out, return_dict)


class TextModelWithProjection(TowerWithProjection):
    tower = "text"

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        return_dict: bool | None = None,
        **kwargs,
    ):
        out = self.text_model(input_ids, attention_mask, position_ids, return_dict=True, **kwargs)
        return self.project(out, return_dict)


class DualEncoder(PretrainedMixin, nn.Module):
    """Both towers and the image-text logits. Presets add their projections (``project_image``,
    ``project_text``), the logit formula (``logits``) and the loss (``loss``)."""

    tower = None
    vision_cls: type[VisionTransformer]
    text_cls: type[TextTransformer]
    output_cls: type

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        self.config = config
        self.text_model = self.text_cls(join(prefix, "text_model"), config.text_config, weights)
        self.vision_model = self.vision_cls(join(prefix, "vision_model"), config.vision_config, weights)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def logits(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define its logits")

    def loss(self, logits_per_text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define its loss")

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        *,
        return_dict: bool | None = None,
        feature_layers: int | Sequence[int] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """The vision tower's output with ``pooler_output`` replaced by the image embedding (projected where the
        model has a projection), as transformers 5 returns it; None when ``feature_layers`` stops the tower early."""
        out = self.vision_model(
            pixel_values, interpolate_pos_encoding, return_dict=True, feature_layers=feature_layers, **kwargs
        )
        if out.pooler_output is not None:
            out.pooler_output = self.project_image(out.pooler_output)
        return returned(out, default_return_dict(self.config, return_dict))

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        return_dict: bool | None = None,
        feature_layers: int | Sequence[int] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        out = self.text_model(
            input_ids, attention_mask, position_ids, return_dict=True, feature_layers=feature_layers, **kwargs
        )
        if out.pooler_output is not None:
            out.pooler_output = self.project_text(out.pooler_output)
        return returned(out, default_return_dict(self.config, return_dict))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        *,
        return_dict: bool | None = None,
        feature_layers: int | Sequence[int] | None = None,
        **kwargs,
    ):
        """``feature_layers`` applies to both towers, as on each: layers after the deepest asked for do not run,
        so unless it includes the last layer the embeddings, logits and loss are None."""
        if feature_layers is None and not getattr(self.vision_model.config, "vision_use_head", True):
            raise ValueError(
                f"{type(self).__name__}'s logits need the image embedding, which the vision tower's pooling head "
                f"makes; this vision config has vision_use_head=False (get_image_features gives the tower's hidden "
                f"states)"
            )
        vision = self.get_image_features(
            pixel_values, interpolate_pos_encoding, return_dict=True, feature_layers=feature_layers, **kwargs
        )
        text = self.get_text_features(
            input_ids, attention_mask, position_ids, return_dict=True, feature_layers=feature_layers, **kwargs
        )
        image_embeds = text_embeds = logits_per_text = logits_per_image = loss = None
        if vision.pooler_output is not None and text.pooler_output is not None:
            image_embeds, text_embeds = normalize(vision.pooler_output), normalize(text.pooler_output)
            logits_per_text = self.logits(text_embeds, image_embeds)
            logits_per_image = logits_per_text.t()
            if return_loss:
                loss = self.loss(logits_per_text)
        output = self.output_cls(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text,
            vision_model_output=vision,
        )
        return returned(output, default_return_dict(self.config, return_dict))
