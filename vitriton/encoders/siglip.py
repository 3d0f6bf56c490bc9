"""SigLIP (Zhai et al. 2023, arXiv:2303.15343) as presets on the shared trunk, under transformers' names.

Differences from CLIP: no class token and no pre-encoder LayerNorm, a biased patch convolution,
post_layernorm over every token, pooling by a multihead-attention head with a learned probe (timm's
``global_pool='map'``), a bidirectional text encoder pooled at its last token through a linear head, and a
sigmoid loss whose logits carry a learned bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import SiglipConfig, SiglipTextConfig, SiglipVisionConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.siglip.modeling_siglip import SiglipOutput

from vitriton.encoders.clip import normalize
from vitriton.encoders.pretrained import PretrainedMixin
from vitriton.encoders.trunk import (
    MLP,
    Attention,
    Encoder,
    EncoderLayer,
    LayerNorm,
    PatchEmbeddings,
    TextEmbeddings,
    TextTransformer,
    VisionTransformer,
    projection,
)
from vitriton.kernels import attention_reference, linear
from vitriton.parallel import QKVParallelLinear, RowParallelLinear, Weights, join


class SiglipVisionEmbeddings(PatchEmbeddings):
    def __init__(self, prefix: str, config: SiglipVisionConfig, weights: Weights):
        super().__init__(prefix, config, weights, class_token=False, conv_bias=True)


class SiglipTextEmbeddings(TextEmbeddings):
    pass


class SiglipAttention(Attention):
    pass


class SiglipMLP(MLP):
    pass


class SiglipEncoderLayer(EncoderLayer):
    attention_cls = SiglipAttention
    mlp_cls = SiglipMLP


class SiglipEncoder(Encoder):
    layer_cls = SiglipEncoderLayer


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    """A learned probe attends over the final tokens (nn.MultiheadAttention's packed ``in_proj``), then
    LayerNorm and MLP with a residual. Heads and MLP columns are tensor-parallel like the encoder's."""

    def __init__(self, prefix: str, config: SiglipVisionConfig, weights: Weights):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.probe = nn.Parameter(weights.get_tensor(join(prefix, "probe"), shape=(1, 1, hidden)), requires_grad=False)
        in_proj = join(prefix, "attention.in_proj_weight")
        in_bias = join(prefix, "attention.in_proj_bias")
        weights._check_shape(in_proj, (3 * hidden, hidden))
        weights._check_shape(in_bias, (3 * hidden,))
        # The probe is one query and the tokens give keys and values, so q and kv are separate projections.
        self.q_proj = QKVParallelLinear.load(
            [(in_proj, 0)], weights, hidden_size=hidden, num_heads=heads, bias_sources=[(in_bias, 0)]
        )
        self.kv_proj = QKVParallelLinear.load(
            [(in_proj, hidden), (in_proj, 2 * hidden)],
            weights,
            hidden_size=hidden,
            num_heads=heads,
            bias_sources=[(in_bias, hidden), (in_bias, 2 * hidden)],
        )
        self.head_dim = hidden // heads
        self.out_proj = RowParallelLinear.load(
            join(prefix, "attention.out_proj"),
            weights,
            in_features=hidden,
            out_features=hidden,
            unit=self.head_dim,
            what="attention heads",
        )
        self.layernorm = LayerNorm(join(prefix, "layernorm"), weights, hidden, config.layer_norm_eps)
        self.mlp = SiglipMLP(join(prefix, "mlp"), config, weights)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = hidden_state.shape
        heads = self.q_proj.num_heads
        q = linear(self.probe, self.q_proj.weight, self.q_proj.bias).view(1, 1, heads, self.head_dim)
        q = q.transpose(1, 2).expand(batch, heads, 1, self.head_dim)
        kv = linear(hidden_state, self.kv_proj.weight, self.kv_proj.bias).view(batch, seq, 2, heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        # One query row per image: the eager fp32-softmax reference costs nothing next to the encoder.
        pooled = self.out_proj(attention_reference(q, k, v))
        normed, residual = self.layernorm(pooled)
        return (self.mlp(normed) + residual)[:, 0]


class SiglipVisionTransformer(VisionTransformer):
    class_token = False
    conv_bias = True
    pre_norm = False
    norm_all_tokens = True
    encoder_cls = SiglipEncoder

    def build_head(self, prefix: str, config, weights: Weights) -> nn.Module | None:
        if not getattr(config, "vision_use_head", True):
            return None
        return SiglipMultiheadAttentionPoolingHead(prefix, config, weights)


class SiglipTextTransformer(TextTransformer):
    causal = False
    encoder_cls = SiglipEncoder

    def __init__(self, prefix: str, config: SiglipTextConfig, weights: Weights):
        super().__init__(prefix, config, weights)
        out = getattr(config, "projection_size", None) or config.hidden_size
        self.head = projection(join(prefix, "head"), weights, config.hidden_size, out, True)

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The last position's state, padding or not (SigLIP is trained with max-length padding)."""
        return self.head(last_hidden_state[:, -1])


class SiglipVisionModel(PretrainedMixin, nn.Module):
    config_class = SiglipVisionConfig
    tower = "vision"

    def __init__(self, prefix: str, config: SiglipVisionConfig, weights: Weights):
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionTransformer(prefix, config, weights)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        feature_layers: int | Sequence[int] | None = None,
    ) -> BaseModelOutputWithPooling:
        return self.vision_model(pixel_values, output_hidden_states, interpolate_pos_encoding, feature_layers)


class SiglipTextModel(PretrainedMixin, nn.Module):
    config_class = SiglipTextConfig
    tower = "text"

    def __init__(self, prefix: str, config: SiglipTextConfig, weights: Weights):
        super().__init__()
        self.config = config
        self.text_model = SiglipTextTransformer(prefix, config, weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        feature_layers: int | Sequence[int] | None = None,
    ) -> BaseModelOutputWithPooling:
        return self.text_model(input_ids, attention_mask, position_ids, output_hidden_states, feature_layers)


class SiglipModel(PretrainedMixin, nn.Module):
    """Both towers with ``logit_scale`` and ``logit_bias``: SigLIP's image-text logits."""

    config_class = SiglipConfig
    tower = None

    def __init__(self, prefix: str, config: SiglipConfig, weights: Weights):
        super().__init__()
        self.config = config
        self.text_model = SiglipTextTransformer(join(prefix, "text_model"), config.text_config, weights)
        self.vision_model = SiglipVisionTransformer(join(prefix, "vision_model"), config.vision_config, weights)
        self.logit_scale = nn.Parameter(
            weights.get_tensor(join(prefix, "logit_scale"), shape=(1,)), requires_grad=False
        )
        self.logit_bias = nn.Parameter(weights.get_tensor(join(prefix, "logit_bias"), shape=(1,)), requires_grad=False)

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, output_hidden_states: bool = False
    ) -> BaseModelOutputWithPooling:
        return self.vision_model(pixel_values, output_hidden_states, interpolate_pos_encoding)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPooling:
        return self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ) -> SiglipOutput:
        vision = self.get_image_features(pixel_values, interpolate_pos_encoding, output_hidden_states)
        text = self.get_text_features(input_ids, attention_mask, position_ids, output_hidden_states)
        image_embeds, text_embeds = normalize(vision.pooler_output), normalize(text.pooler_output)
        logits_per_text = (text_embeds @ image_embeds.t()) * self.logit_scale.exp() + self.logit_bias
        return SiglipOutput(
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text,
            vision_model_output=vision,
        )
