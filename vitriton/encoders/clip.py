"""CLIP (Radford et al. 2021, arXiv:2103.00020) as presets on the shared trunk, under transformers' names so
``from vitriton.encoders.clip import CLIPVisionModel`` replaces the transformers (or LoRAX) import.

Every constructor takes ``(prefix, config, weights)``: ``prefix`` is where the module's own tensors live in
the checkpoint (``vision_model``, ``text_model``, ``vision_tower.vision_model`` in a LLaVA checkpoint, or
``""`` for a tower saved on its own by transformers 5), ``config`` is transformers' config class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPOutput

from vitriton.encoders.pretrained import PretrainedMixin
from vitriton.encoders.trunk import (
    MLP,
    Attention,
    Encoder,
    EncoderLayer,
    PatchEmbeddings,
    TextEmbeddings,
    TextTransformer,
    VisionTransformer,
    projection,
)
from vitriton.parallel import Weights, join


class CLIPVisionEmbeddings(PatchEmbeddings):
    def __init__(self, prefix: str, config: CLIPVisionConfig, weights: Weights):
        super().__init__(prefix, config, weights, class_token=True, conv_bias=False)


class CLIPTextEmbeddings(TextEmbeddings):
    pass


class CLIPAttention(Attention):
    pass


class CLIPMLP(MLP):
    pass


class CLIPEncoderLayer(EncoderLayer):
    attention_cls = CLIPAttention
    mlp_cls = CLIPMLP


class CLIPEncoder(Encoder):
    layer_cls = CLIPEncoderLayer


class CLIPVisionTransformer(VisionTransformer):
    class_token = True
    conv_bias = False
    pre_norm = True
    norm_all_tokens = False
    encoder_cls = CLIPEncoder


class CLIPTextTransformer(TextTransformer):
    causal = True
    encoder_cls = CLIPEncoder

    def __init__(self, prefix: str, config: CLIPTextConfig, weights: Weights):
        super().__init__(prefix, config, weights)
        self.eos_token_id = config.eos_token_id

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The EOS token's state. Checkpoints whose config says eos_token_id == 2 predate transformers PR
        #24773 and take the highest token id (the original CLIP's EOT id); the others take the first
        position holding eos_token_id."""
        if self.eos_token_id == 2:
            position = input_ids.to(torch.int).argmax(dim=-1)
        else:
            position = (input_ids == self.eos_token_id).to(torch.int).argmax(dim=-1)
        rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
        return last_hidden_state[rows, position]


class CLIPVisionModel(PretrainedMixin, nn.Module):
    config_class = CLIPVisionConfig
    tower = "vision"

    def __init__(self, prefix: str, config: CLIPVisionConfig, weights: Weights):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(prefix, config, weights)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        feature_layers: int | Sequence[int] | None = None,
    ) -> BaseModelOutputWithPooling:
        return self.vision_model(pixel_values, output_hidden_states, interpolate_pos_encoding, feature_layers)


class CLIPTextModel(PretrainedMixin, nn.Module):
    config_class = CLIPTextConfig
    tower = "text"

    def __init__(self, prefix: str, config: CLIPTextConfig, weights: Weights):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(prefix, config, weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        feature_layers: int | Sequence[int] | None = None,
    ) -> BaseModelOutputWithPooling:
        return self.text_model(input_ids, attention_mask, position_ids, output_hidden_states, feature_layers)


def normalize(embeds: torch.Tensor) -> torch.Tensor:
    return embeds / embeds.norm(p=2, dim=-1, keepdim=True)


class CLIPModel(PretrainedMixin, nn.Module):
    """Both towers, the two projections and ``logit_scale``: CLIP's image-text similarity."""

    config_class = CLIPConfig
    tower = None

    def __init__(self, prefix: str, config: CLIPConfig, weights: Weights):
        super().__init__()
        self.config = config
        text, vision = config.text_config, config.vision_config
        self.text_model = CLIPTextTransformer(join(prefix, "text_model"), text, weights)
        self.vision_model = CLIPVisionTransformer(join(prefix, "vision_model"), vision, weights)
        dim = config.projection_dim
        self.visual_projection = projection(join(prefix, "visual_projection"), weights, vision.hidden_size, dim, False)
        self.text_projection = projection(join(prefix, "text_projection"), weights, text.hidden_size, dim, False)
        self.logit_scale = nn.Parameter(weights.get_tensor(join(prefix, "logit_scale"), shape=()), requires_grad=False)

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, output_hidden_states: bool = False
    ) -> BaseModelOutputWithPooling:
        """The vision tower's output with ``pooler_output`` replaced by the projected image embedding."""
        out = self.vision_model(pixel_values, output_hidden_states, interpolate_pos_encoding)
        out.pooler_output = self.visual_projection(out.pooler_output)
        return out

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPooling:
        out = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)
        out.pooler_output = self.text_projection(out.pooler_output)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ) -> CLIPOutput:
        vision = self.get_image_features(pixel_values, interpolate_pos_encoding, output_hidden_states)
        text = self.get_text_features(input_ids, attention_mask, position_ids, output_hidden_states)
        image_embeds, text_embeds = normalize(vision.pooler_output), normalize(text.pooler_output)
        logits_per_text = (text_embeds @ image_embeds.t()) * self.logit_scale.exp()
        return CLIPOutput(
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text,
            vision_model_output=vision,
        )
