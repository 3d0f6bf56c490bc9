"""SigLIP (Zhai et al. 2023, arXiv:2303.15343) as presets on the shared trunk, under transformers' names.

Differences from CLIP: no class token and no pre-encoder LayerNorm, a biased patch convolution,
post_layernorm over every token, pooling by a multihead-attention head with a learned probe (timm's
``global_pool='map'``), a bidirectional text encoder pooled at its last token through a linear head, and a
sigmoid loss whose logits carry a learned bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipConfig, SiglipTextConfig, SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipOutput

from vitriton.encoders.models import DualEncoder, TextModel, VisionModel
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
    rank_rows,
)
from vitriton.kernels.attention import attention_reference
from vitriton.kernels.linear import linear
from vitriton.parallel import (
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    Weights,
    autocast_args,
    get_world_size,
    join,
)
from vitriton.parallel.layers import full_shape, rank_slice, shard_hooks, size_mismatch


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


def load_in_proj(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, errors
) -> None:
    """``load_state_dict`` pre-hook of :class:`PoolingAttention` under tensor parallelism: transformers' full
    ``in_proj_weight`` / ``in_proj_bias`` become this rank's rows of each of q, k and v, as ``load`` reads them."""
    group = module.out_proj.process_group
    for name in ("in_proj_weight", "in_proj_bias"):
        key, local = prefix + name, getattr(module, name).detach()
        if key not in state_dict:
            continue
        shard = rank_rows(local.shape[0] // 3, group)
        expected = full_shape(local, 0, 3 * shard.total)
        full = state_dict[key]
        if tuple(full.shape) != expected:
            errors.append(size_mismatch(key, full.shape, expected))
            state_dict[key] = local
        else:
            blocks = zip(full.chunk(3), local.chunk(3), strict=True)
            state_dict[key] = torch.cat([rank_slice(block, part, 0, shard) for block, part in blocks])


class PoolingAttention(nn.Module):
    """The pooling head's attention under ``nn.MultiheadAttention``'s names: ``in_proj_weight`` packs the q, k and
    v rows (this rank's heads of each under tensor parallelism, as ``QKVParallelLinear`` packs them), and
    ``out_proj`` is row-parallel."""

    def __init__(self, prefix: str, config: SiglipVisionConfig, weights: Weights):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        in_proj, in_bias = join(prefix, "in_proj_weight"), join(prefix, "in_proj_bias")
        weights.check_shape(in_proj, (3 * hidden, hidden))
        weights.check_shape(in_bias, (3 * hidden,))
        packed = QKVParallelLinear.load(
            [(in_proj, row) for row in (0, hidden, 2 * hidden)],
            weights,
            hidden_size=hidden,
            num_heads=heads,
            bias_sources=[(in_bias, row) for row in (0, hidden, 2 * hidden)],
        )
        self.num_heads, self.head_dim = packed.num_heads, packed.head_dim
        self.in_proj_weight, self.in_proj_bias = packed.weight, packed.bias
        self.out_proj = RowParallelLinear.load(
            join(prefix, "out_proj"),
            weights,
            in_features=hidden,
            out_features=hidden,
            unit=self.head_dim,
            what="attention heads",
        )
        self.process_group = self.out_proj.process_group
        shard_hooks(self)  # under tensor parallelism: state_dict() refuses the shard
        if get_world_size(self.process_group) > 1:
            self.register_load_state_dict_pre_hook(load_in_proj)

    def forward(self, probe: torch.Tensor, hidden_state: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = hidden_state.shape
        heads, head_dim = self.num_heads, self.head_dim
        width = heads * head_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        # The probe is one query and the tokens give keys and values, so q and kv are separate GEMMs.
        q = linear(*autocast_args(probe, weight[:width], bias[:width])).view(1, 1, heads, head_dim)
        q = q.transpose(1, 2).expand(batch, heads, 1, head_dim)
        kv = linear(*autocast_args(hidden_state, weight[width:], bias[width:]))
        kv = kv.view(batch, seq, 2, heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        # One query row per image: the eager fp32-softmax reference costs nothing next to the encoder.
        return self.out_proj(attention_reference(q, k, v))


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    """A learned probe attends over the final tokens (nn.MultiheadAttention's packed ``in_proj``), then
    LayerNorm and MLP with a residual. Heads and MLP columns are tensor-parallel like the encoder's."""

    def __init__(self, prefix: str, config: SiglipVisionConfig, weights: Weights):
        super().__init__()
        hidden = config.hidden_size
        self.probe = nn.Parameter(weights.get_tensor(join(prefix, "probe"), shape=(1, 1, hidden)), requires_grad=False)
        self.attention = PoolingAttention(join(prefix, "attention"), config, weights)
        self.layernorm = LayerNorm(join(prefix, "layernorm"), weights, hidden, config.layer_norm_eps)
        self.mlp = SiglipMLP(join(prefix, "mlp"), config, weights)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        pooled = self.attention(self.probe, hidden_state)
        normed, residual = self.layernorm(pooled)
        return (self.mlp(normed) + residual)[:, 0]


class SiglipVisionTransformer(VisionTransformer):
    class_token = False
    conv_bias = True
    pre_norm = False
    norm_all_tokens = True
    encoder_cls = SiglipEncoder

    @property
    def use_head(self) -> bool:
        """Whether the config has the pooling head, as transformers' ``SiglipVisionModel.use_head``."""
        return getattr(self.config, "vision_use_head", True)

    def build_head(self, prefix: str, config, weights: Weights) -> nn.Module | None:
        if not getattr(config, "vision_use_head", True):
            return None
        return SiglipMultiheadAttentionPoolingHead(prefix, config, weights)


class SiglipTextTransformer(TextTransformer):
    causal = False
    encoder_cls = SiglipEncoder

    def __init__(self, prefix: str, config: SiglipTextConfig, weights: Weights, num_layers: int | None = None):
        super().__init__(prefix, config, weights, num_layers)
        out = getattr(config, "projection_size", None)
        out = config.hidden_size if out is None else out  # as transformers: None only, not 0, means hidden_size
        self.head = ReplicatedLinear.load(
            join(prefix, "head"), weights, in_features=config.hidden_size, out_features=out, bias=True
        )

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The last position's state, padding or not (SigLIP is trained with max-length padding)."""
        return self.head(last_hidden_state[:, -1])


class SiglipVisionModel(VisionModel):
    config_class = SiglipVisionConfig
    transformer_cls = SiglipVisionTransformer
    tower_attributes = ("use_head",)


class SiglipTextModel(TextModel):
    config_class = SiglipTextConfig
    transformer_cls = SiglipTextTransformer


class SiglipModel(DualEncoder):
    """Both towers with ``logit_scale`` and ``logit_bias``: SigLIP's image-text logits (no projections: the
    towers' pooled outputs are the embeddings)."""

    config_class = SiglipConfig
    vision_cls = SiglipVisionTransformer
    text_cls = SiglipTextTransformer
    output_cls = SiglipOutput
    text_input_embeddings = True

    def __init__(self, prefix: str, config: SiglipConfig, weights: Weights):
        super().__init__(prefix, config, weights)
        self.logit_scale = nn.Parameter(
            weights.get_tensor(join(prefix, "logit_scale"), shape=(1,)), requires_grad=False
        )
        self.logit_bias = nn.Parameter(weights.get_tensor(join(prefix, "logit_bias"), shape=(1,)), requires_grad=False)

    def logits(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return (text_embeds @ image_embeds.t()) * self.logit_scale.exp() + self.logit_bias

    def loss(self, logits_per_text: torch.Tensor) -> torch.Tensor:
        """The sigmoid loss (Zhai et al. 2023, eq. 1): +1 labels on the diagonal, -1 elsewhere, summed over
        images and averaged over texts, as transformers computes it."""
        labels = 2 * torch.eye(logits_per_text.shape[0], device=logits_per_text.device) - 1
        return -F.logsigmoid(labels * logits_per_text).sum(dim=-1).mean()
