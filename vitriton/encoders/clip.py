"""CLIP (Radford et al. 2021, arXiv:2103.00020) as presets on the shared trunk, under transformers' names so
``from vitriton.encoders.clip import CLIPVisionModel`` replaces the transformers (or LoRAX) import.

Every constructor takes ``(prefix, config, weights)``: ``prefix`` is where the module's own tensors live in
the checkpoint (``vision_model``, ``text_model``, ``vision_tower`` in a LLaVA checkpoint, or ``""`` for a tower
saved on its own by transformers 5), ``config`` is transformers' config class; towers also take ``num_layers``,
how many of the config's layers to build.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from transformers.models.clip.modeling_clip import (
    CLIPOutput,
    CLIPTextModelOutput,
    CLIPVisionModelOutput,
    image_text_contrastive_loss,
)

from vitriton.encoders.models import (
    DualEncoder,
    TextModel,
    TextModelWithProjection,
    VisionModel,
    VisionModelWithProjection,
    project,
)
from vitriton.encoders.trunk import (
    MLP,
    Attention,
    Encoder,
    EncoderLayer,
    PatchEmbeddings,
    TextEmbeddings,
    TextTransformer,
    VisionTransformer,
)
from vitriton.parallel import ReplicatedLinear, Weights, join


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

    def __init__(self, prefix: str, config: CLIPTextConfig, weights: Weights, num_layers: int | None = None):
        super().__init__(prefix, config, weights, num_layers)
        self.eos_token_id = config.eos_token_id

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The EOS token's state. Checkpoints whose config says eos_token_id == 2 predate transformers PR
        #24773 and take the highest token id (the original CLIP's EOT id); the others take the first
        position holding eos_token_id."""
        if self.eos_token_id is None:
            raise ValueError(
                "the text config's eos_token_id is None: CLIP pools the text at its eos token; set eos_token_id to "
                "the tokenizer's eos id"
            )
        if self.eos_token_id == 2:
            position = input_ids.to(torch.int).argmax(dim=-1)
        else:
            position = (input_ids == self.eos_token_id).to(torch.int).argmax(dim=-1)
        rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
        return last_hidden_state[rows, position]


class CLIPVisionModel(VisionModel):
    config_class = CLIPVisionConfig
    transformer_cls = CLIPVisionTransformer


class CLIPTextModel(TextModel):
    config_class = CLIPTextConfig
    transformer_cls = CLIPTextTransformer
    tower_attributes = ("eos_token_id",)


class CLIPVisionModelWithProjection(VisionModelWithProjection):
    config_class = CLIPVisionConfig
    transformer_cls = CLIPVisionTransformer
    output_cls = CLIPVisionModelOutput


class CLIPTextModelWithProjection(TextModelWithProjection):
    config_class = CLIPTextConfig
    transformer_cls = CLIPTextTransformer
    output_cls = CLIPTextModelOutput


class CLIPModel(DualEncoder):
    """Both towers, the two projections and ``logit_scale``: CLIP's image-text similarity."""

    config_class = CLIPConfig
    vision_cls = CLIPVisionTransformer
    text_cls = CLIPTextTransformer
    output_cls = CLIPOutput

    def __init__(self, prefix: str, config: CLIPConfig, weights: Weights):
        super().__init__(prefix, config, weights)
        text, vision, dim = config.text_config, config.vision_config, config.projection_dim
        # As transformers' CLIPModel holds them.
        self.projection_dim, self.text_embed_dim, self.vision_embed_dim = dim, text.hidden_size, vision.hidden_size
        self.visual_projection = ReplicatedLinear.load(
            join(prefix, "visual_projection"), weights, in_features=vision.hidden_size, out_features=dim, bias=False
        )
        self.text_projection = ReplicatedLinear.load(
            join(prefix, "text_projection"), weights, in_features=text.hidden_size, out_features=dim, bias=False
        )
        self.logit_scale = nn.Parameter(weights.get_tensor(join(prefix, "logit_scale"), shape=()), requires_grad=False)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return project(self.visual_projection, pooled)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return project(self.text_projection, pooled)

    def logits(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return (text_embeds @ image_embeds.t()) * self.logit_scale.exp()

    def loss(self, logits_per_text: torch.Tensor) -> torch.Tensor:
        return image_text_contrastive_loss(logits_per_text)
