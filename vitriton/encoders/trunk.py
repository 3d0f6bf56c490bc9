"""One pre-norm transformer trunk; CLIP and SigLIP (clip.py, siglip.py) are presets on it.

The residual stream is carried as a pair ``(delta, residual)``: each sub-block returns only its delta, and the
next LayerNorm adds it to the residual in the same pass that normalises (``kernels.layer_norm``), so no layer
spends a separate pass on ``hidden = residual + delta``. The full hidden state is materialised only where it
is returned (``output_hidden_states``, ``feature_layers``, the last layer).

Tensor parallelism follows Megatron-LM: heads and MLP columns split across ranks, two all-reduces per layer
(in ``RowParallelLinear.forward``). Modules read local head counts off their weights, never off the config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vitriton.encoders.pretrained import PretrainedMixin
from vitriton.kernels.attention import attention
from vitriton.kernels.layernorm import layer_norm
from vitriton.kernels.linear import check_activation
from vitriton.parallel import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    Weights,
    frozen,
    get_rank,
    get_world_size,
    join,
)
from vitriton.parallel.group import ProcessGroup


class LayerNorm(nn.Module):
    """LayerNorm that optionally adds a residual first: ``forward(x, residual) -> (normed, x + residual)``."""

    def __init__(self, prefix: str, weights: Weights, hidden_size: int, eps: float):
        super().__init__()
        self.weight = frozen(weights.get_tensor(join(prefix, "weight"), shape=(hidden_size,)))
        self.bias = frozen(weights.get_tensor(join(prefix, "bias"), shape=(hidden_size,)))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return layer_norm(x, self.weight, self.bias, self.eps, residual)


class Attention(nn.Module):
    """Self-attention: packed column-parallel QKV -> flash attention -> row-parallel out projection."""

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        hidden = config.hidden_size
        self.qkv = QKVParallelLinear.load_separate(
            prefix, weights, hidden_size=hidden, num_heads=config.num_attention_heads
        )
        self.head_dim = self.qkv.head_dim
        self.scale = self.head_dim**-0.5
        self.out_proj = RowParallelLinear.load(
            join(prefix, "out_proj"),
            weights,
            in_features=hidden,
            out_features=hidden,
            unit=self.head_dim,
            what="attention heads",
        )

    def forward(
        self, x: torch.Tensor, *, causal: bool = False, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, k, v = self.qkv(x)
        out = attention(q, k, v, scale=self.scale, causal=causal, key_padding_mask=key_padding_mask)
        return self.out_proj(out)


class MLP(nn.Module):
    """fc1 (column-parallel, activation fused into its epilogue) -> fc2 (row-parallel)."""

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        check_activation(config.hidden_act)
        self.activation = config.hidden_act
        hidden, inner = config.hidden_size, config.intermediate_size
        self.fc1 = ColumnParallelLinear.load(
            join(prefix, "fc1"), weights, in_features=hidden, out_features=inner, what="intermediate_size"
        )
        self.fc2 = RowParallelLinear.load(
            join(prefix, "fc2"), weights, in_features=inner, out_features=hidden, what="intermediate_size"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, self.activation))


class EncoderLayer(nn.Module):
    """Pre-norm block on the ``(delta, residual)`` stream: LN1 -> attention -> LN2 -> MLP."""

    attention_cls: type[Attention] = Attention
    mlp_cls: type[MLP] = MLP

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = LayerNorm(join(prefix, "layer_norm1"), weights, hidden, eps)
        self.self_attn = self.attention_cls(join(prefix, "self_attn"), config, weights)
        self.layer_norm2 = LayerNorm(join(prefix, "layer_norm2"), weights, hidden, eps)
        self.mlp = self.mlp_cls(join(prefix, "mlp"), config, weights)

    def forward(
        self,
        delta: torch.Tensor,
        residual: torch.Tensor | None,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual = self.layer_norm1(delta, residual)
        delta = self.self_attn(normed, causal=causal, key_padding_mask=key_padding_mask)
        normed, residual = self.layer_norm2(delta, residual)
        return self.mlp(normed), residual


class Encoder(nn.Module):
    """The stack of layers. ``forward`` runs the first ``num_layers`` and records the hidden states whose
    indices are in ``record`` (0 = the input, i = the output of layer i), as transformers numbers them."""

    layer_cls: type[EncoderLayer] = EncoderLayer

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        self.layers = nn.ModuleList(
            self.layer_cls(join(prefix, f"layers.{i}"), config, weights) for i in range(config.num_hidden_layers)
        )

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        num_layers: int | None = None,
        record: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]:
        """Returns ``(delta, residual, states)``; the output hidden state is ``delta + residual``."""
        states = {0: hidden} if 0 in record else {}
        delta, residual = hidden, None
        for index, layer in enumerate(self.layers[:num_layers], start=1):
            delta, residual = layer(delta, residual, causal=causal, key_padding_mask=key_padding_mask)
            if index in record:
                states[index] = delta + residual
        return delta, residual, states


def resolve_feature_layers(feature_layers: int | Sequence[int], num_layers: int) -> list[int]:
    """Maps feature layer indices (negative allowed, as LLaVA's ``vision_feature_layer = -2``) to 0..num_layers."""
    requested = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    if not requested:
        raise ValueError("feature_layers is empty; give an int or a non-empty list of ints")
    resolved = []
    for index in requested:
        if not -(num_layers + 1) <= index <= num_layers:
            raise ValueError(
                f"feature layer {index} is out of range: the encoder has {num_layers} layers, so hidden states are "
                f"indexed {-(num_layers + 1)}..{num_layers}"
            )
        resolved.append(index % (num_layers + 1))
    return resolved


class Tower(nn.Module):
    """Shared plumbing of the vision and text towers: running the encoder with recording and
    feature-layer truncation, and the data-parallel mode (each rank runs its share of the batch)."""

    encoder: Encoder

    def __init__(self) -> None:
        super().__init__()
        self.data_group: ProcessGroup | None = None

    def run_encoder(
        self,
        hidden: torch.Tensor,
        finish: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]],
        *,
        output_hidden_states: bool,
        feature_layers: int | Sequence[int] | None,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPooling:
        """Runs the encoder and ``finish(delta, residual) -> (last_hidden_state, pooler_output)``.

        With ``feature_layers``, hidden_states holds the requested layers in the order asked, and the layers
        after the deepest one are not run; unless that is the last layer, last_hidden_state is the deepest
        requested state (un-normalised) and pooler_output is None.
        """
        total = len(self.encoder.layers)
        if feature_layers is not None:
            wanted = resolve_feature_layers(feature_layers, total)
            depth = max(wanted)
        else:
            wanted = list(range(total + 1)) if output_hidden_states else []
            depth = total
        delta, residual, states = self.encoder(
            hidden, causal=causal, key_padding_mask=key_padding_mask, num_layers=depth, record=wanted
        )
        hidden_states = tuple(states[i] for i in wanted) if wanted else None
        if depth < total:
            return BaseModelOutputWithPooling(last_hidden_state=states[depth], hidden_states=hidden_states)
        last_hidden_state, pooler_output = finish(delta, residual)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooler_output, hidden_states=hidden_states
        )

    def data_parallel(
        self, run: Callable[..., BaseModelOutputWithPooling], batch: int, **inputs
    ) -> BaseModelOutputWithPooling:
        """In data mode, runs ``run`` on this rank's rows of every input whose first dimension is the batch
        and all-gathers the outputs, so every rank returns the whole batch. Otherwise runs ``run`` as is."""
        world = get_world_size(self.data_group)
        if world == 1:
            return run(**inputs)
        sizes = [batch // world + (1 if r < batch % world else 0) for r in range(world)]
        start = sum(sizes[: get_rank(self.data_group)])
        mine = sizes[get_rank(self.data_group)]
        local = {
            k: t[start : start + mine] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch else t
            for k, t in inputs.items()
        }
        out = run(**local)
        return BaseModelOutputWithPooling(
            last_hidden_state=_gather(out.last_hidden_state, sizes, self.data_group),
            pooler_output=_gather(out.pooler_output, sizes, self.data_group),
            hidden_states=None
            if out.hidden_states is None
            else tuple(_gather(h, sizes, self.data_group) for h in out.hidden_states),
        )


def _gather(tensor: torch.Tensor | None, sizes: list[int], group: ProcessGroup) -> torch.Tensor | None:
    """All-gathers rows of uneven per-rank batches (padded to the largest share on the wire)."""
    if tensor is None:
        return None
    largest = max(sizes)
    padded = tensor.new_zeros(largest, *tensor.shape[1:])
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)


class PatchEmbeddings(nn.Module):
    """Patch convolution, optional class token, learned position table (interpolated for other sizes)."""

    def __init__(self, prefix: str, config, weights: Weights, *, class_token: bool, conv_bias: bool):
        super().__init__()
        hidden, patch, channels = config.hidden_size, config.patch_size, config.num_channels
        self.image_size, self.patch_size, self.num_channels = config.image_size, patch, channels
        self.class_embedding = (
            frozen(weights.get_tensor(join(prefix, "class_embedding"), shape=(hidden,))) if class_token else None
        )
        self.patch_weight = frozen(
            weights.get_tensor(join(prefix, "patch_embedding.weight"), shape=(hidden, channels, patch, patch))
        )
        self.patch_bias = (
            frozen(weights.get_tensor(join(prefix, "patch_embedding.bias"), shape=(hidden,))) if conv_bias else None
        )
        positions = (config.image_size // patch) ** 2 + (1 if class_token else 0)
        self.position_embedding = frozen(
            weights.get_tensor(join(prefix, "position_embedding.weight"), shape=(positions, hidden))
        )

    def check(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be 4-d (batch, channels, height, width); got shape {tuple(pixel_values.shape)}"
            )
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(f"pixel_values has {channels} channels; the config expects {self.num_channels}")
        if interpolate_pos_encoding:
            if height < self.patch_size or width < self.patch_size:
                raise ValueError(f"image size {height}x{width} is smaller than one {self.patch_size}-pixel patch")
        elif (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"image size {height}x{width} does not match the config's {self.image_size}x{self.image_size}; "
                f"pass interpolate_pos_encoding=True to run other sizes"
            )

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position table for a grid_h x grid_w patch grid: bicubic resampling of the square table
        (align_corners=False, as DINO and transformers do), computed in fp32."""
        table = self.position_embedding
        lead = 1 if self.class_embedding is not None else 0
        side = int(round((table.shape[0] - lead) ** 0.5))
        if (grid_h, grid_w) == (side, side):
            return table
        grid = table[lead:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1).to(table.dtype)
        return torch.cat([table[:lead], grid], dim=0)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        self.check(pixel_values, interpolate_pos_encoding)
        patches = F.conv2d(
            pixel_values.to(self.patch_weight.dtype), self.patch_weight, self.patch_bias, stride=self.patch_size
        )
        grid_h, grid_w = patches.shape[-2:]
        tokens = patches.flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(tokens.shape[0], 1, -1)
            tokens = torch.cat([cls, tokens], dim=1)
        return tokens + self.positions(grid_h, grid_w)


class TextEmbeddings(nn.Module):
    """Vocabulary-parallel token embedding plus a replicated learned position table."""

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        self.vocab_size, self.max_positions = config.vocab_size, config.max_position_embeddings
        self.token_embedding = VocabParallelEmbedding.load(
            join(prefix, "token_embedding"), weights, vocab_size=config.vocab_size, hidden_size=config.hidden_size
        )
        self.position_embedding = frozen(
            weights.get_tensor(
                join(prefix, "position_embedding.weight"), shape=(config.max_position_embeddings, config.hidden_size)
            )
        )

    def check(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor; got {input_ids.dtype}")
        seq = input_ids.shape[-1]
        if seq > self.max_positions:
            raise ValueError(f"text has {seq} tokens; the position table holds {self.max_positions}")
        # Value checks read the ids on the host; inside CUDA-graph capture (replays of checked shapes) skip them.
        capturing = input_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        if input_ids.numel() and not capturing:
            low, high = input_ids.min().item(), input_ids.max().item()
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is outside the vocabulary of {self.vocab_size} tokens")
        if position_ids is not None and position_ids.numel() and not capturing:
            low, high = position_ids.min().item(), position_ids.max().item()
            if low < 0 or high >= self.max_positions:
                raise ValueError(f"position id {high if high >= 0 else low} is outside 0..{self.max_positions - 1}")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.check(input_ids, position_ids)
        tokens = self.token_embedding(input_ids)
        if position_ids is None:
            return tokens + self.position_embedding[: input_ids.shape[-1]]
        return tokens + F.embedding(position_ids, self.position_embedding)


class VisionTransformer(Tower):
    """The ViT trunk. Presets choose: a class token and a pre-encoder LayerNorm (CLIP), which LayerNorm is
    applied to what after the encoder, and the pooling (CLS token, or SigLIP's attention-pooling head)."""

    class_token: bool = True
    conv_bias: bool = False
    pre_norm: bool = True
    # True: post_layernorm normalises the whole last hidden state (SigLIP); False: only the pooled CLS (CLIP).
    norm_all_tokens: bool = False
    encoder_cls: type[Encoder] = Encoder

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        self.config = config
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = PatchEmbeddings(
            join(prefix, "embeddings"), config, weights, class_token=self.class_token, conv_bias=self.conv_bias
        )
        self.pre_layrnorm = LayerNorm(join(prefix, "pre_layrnorm"), weights, hidden, eps) if self.pre_norm else None
        self.encoder = self.encoder_cls(join(prefix, "encoder"), config, weights)
        self.post_layernorm = LayerNorm(join(prefix, "post_layernorm"), weights, hidden, eps)
        self.head = self.build_head(join(prefix, "head"), config, weights)

    def build_head(self, prefix: str, config, weights: Weights) -> nn.Module | None:
        return None

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        feature_layers: int | Sequence[int] | None = None,
    ) -> BaseModelOutputWithPooling:
        self.embeddings.check(pixel_values, interpolate_pos_encoding)
        run = self._forward_local
        return self.data_parallel(
            run,
            pixel_values.shape[0],
            pixel_values=pixel_values,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            feature_layers=feature_layers,
        )

    def _forward_local(
        self, pixel_values, output_hidden_states, interpolate_pos_encoding, feature_layers
    ) -> BaseModelOutputWithPooling:
        hidden = self.embeddings(pixel_values, interpolate_pos_encoding)
        if self.pre_layrnorm is not None:
            hidden, _ = self.pre_layrnorm(hidden)
        return self.run_encoder(
            hidden, self.finish, output_hidden_states=output_hidden_states, feature_layers=feature_layers
        )

    def finish(self, delta: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.norm_all_tokens:
            last, _ = self.post_layernorm(delta, residual)
            return last, None if self.head is None else self.head(last)
        last = delta if residual is None else delta + residual
        pooled, _ = self.post_layernorm(last[:, 0])
        return last, pooled


class TextTransformer(Tower):
    """The text trunk: token + position embeddings, encoder, final LayerNorm, and a pooling preset."""

    causal: bool = False
    encoder_cls: type[Encoder] = Encoder

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(join(prefix, "embeddings"), config, weights)
        self.encoder = self.encoder_cls(join(prefix, "encoder"), config, weights)
        self.final_layer_norm = LayerNorm(
            join(prefix, "final_layer_norm"), weights, config.hidden_size, config.layer_norm_eps
        )

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        feature_layers: int | Sequence[int] | None = None,
    ) -> BaseModelOutputWithPooling:
        if input_ids is None:
            raise ValueError("input_ids is required")
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1])
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; input_ids has {tuple(input_ids.shape)}"
                )
        if position_ids is not None:
            position_ids = position_ids.reshape(-1, position_ids.shape[-1])
        self.embeddings.check(input_ids, position_ids)
        return self.data_parallel(
            self._forward_local,
            input_ids.shape[0],
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
            feature_layers=feature_layers,
        )

    def _forward_local(
        self, input_ids, attention_mask, position_ids, output_hidden_states, feature_layers
    ) -> BaseModelOutputWithPooling:
        hidden = self.embeddings(input_ids, position_ids)
        key_padding_mask = None if attention_mask is None else attention_mask.to(torch.bool)

        def finish(delta, residual):
            last, _ = self.final_layer_norm(delta, residual)
            return last, self.pool(last, input_ids)

        return self.run_encoder(
            hidden,
            finish,
            output_hidden_states=output_hidden_states,
            feature_layers=feature_layers,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
        )


def normalize(embeds: torch.Tensor) -> torch.Tensor:
    return embeds / embeds.norm(p=2, dim=-1, keepdim=True)


class VisionModel(PretrainedMixin, nn.Module):
    """A vision tower as transformers' ``*VisionModel``: the transformer under ``.vision_model``."""

    tower = "vision"
    transformer_cls: type[VisionTransformer]

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        self.config = config
        self.vision_model = self.transformer_cls(prefix, config, weights)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        feature_layers: int | Sequence[int] | None = None,
    ) -> BaseModelOutputWithPooling:
        return self.vision_model(pixel_values, output_hidden_states, interpolate_pos_encoding, feature_layers)


class TextModel(PretrainedMixin, nn.Module):
    """A text tower as transformers' ``*TextModel``: the transformer under ``.text_model``."""

    tower = "text"
    transformer_cls: type[TextTransformer]

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        self.config = config
        self.text_model = self.transformer_cls(prefix, config, weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        feature_layers: int | Sequence[int] | None = None,
    ) -> BaseModelOutputWithPooling:
        return self.text_model(input_ids, attention_mask, position_ids, output_hidden_states, feature_layers)


class DualEncoder(PretrainedMixin, nn.Module):
    """Both towers and the image-text logits. Presets add their projections (``project_image``,
    ``project_text``) and the logit formula (``logits``)."""

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
        raise NotImplementedError

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, output_hidden_states: bool = False
    ) -> BaseModelOutputWithPooling:
        """The vision tower's output with ``pooler_output`` replaced by the image embedding (projected where
        the model has a projection), as transformers 5 returns it."""
        out = self.vision_model(pixel_values, output_hidden_states, interpolate_pos_encoding)
        out.pooler_output = self.project_image(out.pooler_output)
        return out

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPooling:
        out = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)
        out.pooler_output = self.project_text(out.pooler_output)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
    ):
        vision = self.get_image_features(pixel_values, interpolate_pos_encoding, output_hidden_states)
        text = self.get_text_features(input_ids, attention_mask, position_ids, output_hidden_states)
        image_embeds, text_embeds = normalize(vision.pooler_output), normalize(text.pooler_output)
        logits_per_text = self.logits(text_embeds, image_embeds)
        return self.output_cls(
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text,
            vision_model_output=vision,
        )
