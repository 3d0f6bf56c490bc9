"""One pre-norm transformer trunk; CLIP and SigLIP (clip.py, siglip.py) are presets on it.

On one rank the residual stream is one tensor that the out projection and fc2 add into through cuBLAS's C operand
(``RowParallelLinear.accumulate``), without their biases: cuBLAS adds a residual or a bias vector, not both. The
biases' running sums travel as per-column shifts to the next LayerNorm (``layer_norm(shift=)``), which reads the
stream once and writes the normalised copy once (``Encoder.forward_accumulated``). Under tensor parallelism the
stream is carried as a pair ``(delta, residual)``: each sub-block returns its delta, reduced over the ranks, and
the next LayerNorm adds it to the residual in the same pass that normalises, which reads two tensors and writes
two. Either way the full hidden state is materialised only where it is returned (``output_hidden_states``,
``feature_layers``, the last layer).

The vision tower's patch embedding is one GEMM over the image's non-overlapping patches (``PatchEmbeddings``) rather
than transformers' strided convolution, which cuDNN runs several times slower at these shapes.

Tensor parallelism follows Megatron-LM: heads and MLP columns split across ranks, two all-reduces per layer
(in ``RowParallelLinear.forward``). Modules read local head counts off their weights, never off the config. The
embeddings (patch weight, class token, position tables) are replicated on every rank.

``state_dict()`` and ``load_state_dict()`` speak transformers' key names and shapes: each module whose tensors
vitriton holds under other names (the packed ``qkv``, the patch projection as ``patch_weight``, the position tables
as plain parameters) converts them in its own state-dict hooks, so every prefix an outer model puts in front of it
works. A key missing from a ``load_state_dict(strict=False)`` is reported under transformers' name, and the
tensor it names keeps its value.

The towers take transformers 5.17's arguments in its positional order, with its config defaults
(``output_hidden_states``, ``output_attentions``, ``return_dict``), and tolerate the extra keyword arguments its
outer models pass down (LLaVA's ``image_sizes``, ``is_causal``). Under ``torch.autocast`` the trunk runs in the
autocast dtype where transformers' does (every linear and the attention, with the weights cast per call), while
the residual stream and the LayerNorms stay in the weights' dtype, as autocast leaves them. The Triton
interpreter cannot run bf16 ``tl.dot``, so a bf16 forward under ``TRITON_INTERPRET=1`` runs every op on its eager
reference instead.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vitriton.graphs import AutoGraphs, called_as_module, called_inside, global_hooks, replayable
from vitriton.kernels._dispatch import autograd_records, eager_mode, eager_override, interpreting
from vitriton.kernels.attention import allowed_keys, attention
from vitriton.kernels.layernorm import layer_norm
from vitriton.kernels.linear import ACTIVATIONS, linear
from vitriton.parallel import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    Weights,
    autocast_args,
    default_group,
    frozen,
    get_world_size,
    join,
    parallel_mode,
    symmetric,
    wait_all,
)
from vitriton.parallel.group import ProcessGroup, Shard, get_rank
from vitriton.parallel.layers import full_shape, rank_slice, size_mismatch
from vitriton.parallel.weights import save_checkpoint


def to_transformers_names(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook: ``module.transformers_names`` (vitriton's name -> transformers') renamed."""
    for ours, theirs in module.transformers_names.items():
        if prefix + ours in state_dict:
            state_dict[prefix + theirs] = state_dict.pop(prefix + ours)


def from_transformers_names(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, errors
) -> None:
    """``load_state_dict`` pre-hook, the reverse of :func:`to_transformers_names`; vitriton's own names load as they
    are. A tensor given under neither name is reported missing under transformers' and keeps its value."""
    for ours, theirs in module.transformers_names.items():
        current = getattr(module, ours)
        if current is None or prefix + ours in state_dict:
            continue
        if prefix + theirs in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
        else:
            missing_keys.append(prefix + theirs)
            state_dict[prefix + ours] = current  # copied onto itself: unchanged, and not reported under our name


def rename_hooks(module: nn.Module) -> None:
    module.register_state_dict_post_hook(to_transformers_names)
    module.register_load_state_dict_pre_hook(from_transformers_names)


def normalized(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A tower's ``norm`` (a :class:`LayerNorm`, or a module a caller put in its place) of ``x``."""
    return norm(x)[0] if isinstance(norm, LayerNorm) else norm(x)


class LayerNorm(nn.Module):
    """LayerNorm that optionally adds a residual first: ``forward(x, residual) -> (normed, x + residual)``; or a
    per-column ``shift``, not returned: ``forward(x, shift=shift) -> (normed, x)``."""

    def __init__(self, prefix: str, weights: Weights, hidden_size: int, eps: float):
        super().__init__()
        self.weight = frozen(weights.get_tensor(join(prefix, "weight"), shape=(hidden_size,)))
        self.bias = frozen(weights.get_tensor(join(prefix, "bias"), shape=(hidden_size,)))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, *, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype != self.weight.dtype:
            # Only under autocast: a linear's low-precision output joins the residual stream, which stays in the
            # weights' dtype as it does in transformers under autocast (LayerNorm runs in fp32 there).
            x = x.to(self.weight.dtype)
        return layer_norm(x, self.weight, self.bias, self.eps, residual, shift=shift)


def attention_with_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, for calls that ask for the weights or train with attention dropout: masked
    scores are set to the dtype's minimum, so a query row with no key left is uniform over all keys, as
    transformers' eager path gives (the fused kernel and transformers' default sdpa path give that row zeros).
    Softmax in fp32; ``dropout`` then zeroes weights (and scales the rest) as transformers' eager path does, with
    the same draws from the same generator state, and the weights returned are those after it.

    Returns ``(out (B, S, H * D), weights (B, H, S, S))``.
    """
    batch, heads, seq, head_dim = q.shape
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = allowed_keys(seq, causal, key_padding_mask, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, seq, heads * head_dim)
    return out, weights


# transformers' q, k and v projections, in the order of the packed rows.
QKV_NAMES = ("q_proj", "k_proj", "v_proj")


def split_qkv(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook of :class:`Attention`: the packed ``qkv`` as transformers' ``q_proj``, ``k_proj``
    and ``v_proj`` (views of it: in-place changes reach the parameter)."""
    for kind in ("weight", "bias"):
        packed = state_dict.pop(f"{prefix}qkv.{kind}", None)
        if packed is not None:
            for name, part in zip(QKV_NAMES, packed.chunk(3), strict=True):
                state_dict[f"{prefix}{name}.{kind}"] = part


def pack_qkv(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, errors
) -> None:
    """``load_state_dict`` pre-hook of :class:`Attention`: transformers' ``q_proj``, ``k_proj`` and ``v_proj``
    packed into ``qkv``, this rank's heads of each under tensor parallelism (as ``QKVParallelLinear.load`` reads
    them). A part not given is reported missing and keeps its value; a state dict with vitriton's ``qkv`` and no
    part loads as it is."""
    group = module.out_proj.process_group
    for kind in ("weight", "bias"):
        current, packed = getattr(module.qkv, kind), f"{prefix}qkv.{kind}"
        keys = [f"{prefix}{name}.{kind}" for name in QKV_NAMES]
        if current is None or (packed in state_dict and not any(key in state_dict for key in keys)):
            continue
        parts = list(current.detach().chunk(3))
        for index, key in enumerate(keys):
            if key not in state_dict:
                missing_keys.append(key)
                continue
            full, local = state_dict.pop(key), parts[index]
            shard = rank_rows(local.shape[0], group)
            if tuple(full.shape) != full_shape(local, 0, shard.total):
                errors.append(size_mismatch(key, full.shape, full_shape(local, 0, shard.total)))
            else:
                parts[index] = rank_slice(full, local, 0, shard)
        state_dict[packed] = torch.cat(parts)


def rank_rows(rows: int, group: ProcessGroup | None) -> Shard:
    """This rank's block of ``rows`` rows of a tensor split evenly by rows over ``group`` (whole heads)."""
    world = get_world_size(group)
    start = get_rank(group) * rows
    return Shard(start, start + rows, rows * world)


def gather_heads(weights: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Attention weights of every rank's heads, in head order (each rank holds a contiguous block of heads)."""
    if get_world_size(group) == 1:
        return weights
    parts = [torch.empty_like(weights) for _ in range(get_world_size(group))]
    dist.all_gather(parts, weights.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class Attention(nn.Module):
    """Self-attention: packed column-parallel QKV -> flash attention -> row-parallel out projection. In training
    mode with the config's ``attention_dropout`` > 0 the attention runs transformers' eager formula with dropout on
    the weights (``attention_with_weights``); eval mode, or no dropout, keeps the fused kernel."""

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        self.dropout = getattr(config, "attention_dropout", 0.0)
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
        self.register_state_dict_post_hook(split_qkv)
        self.register_load_state_dict_pre_hook(pack_qkv)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        pending: list | None = None,
        symmetric_result: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(out, weights)``; weights (all heads, gathered) only with ``output_attentions``.
        ``pending``: the out projection's all-reduce is started, not waited for (``all_reduce``);
        ``symmetric_result``: see ``RowParallelLinear.forward``."""
        out, weights = self.attend(
            x, causal=causal, key_padding_mask=key_padding_mask, output_attentions=output_attentions
        )
        return self.out_proj(out, pending, symmetric_result), weights

    def attend(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything before the out projection: ``(heads (B, S, local heads * head_dim), weights or None)``."""
        q, k, v = self.qkv(x)
        dropout = self.dropout if self.training else 0.0
        if output_attentions or dropout:
            out, weights = attention_with_weights(
                q, k, v, scale=self.scale, causal=causal, key_padding_mask=key_padding_mask, dropout=dropout
            )
            return out, gather_heads(weights, self.out_proj.process_group) if output_attentions else None
        return attention(q, k, v, scale=self.scale, causal=causal, key_padding_mask=key_padding_mask), None


# transformers activations that are a fused one written another way (ACT2FN's gelu_new and gelu_fast are the tanh
# approximation, gelu_python the erf form): they run fused too.
FUSED_ALIASES = {"gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh", "gelu_python": "gelu"}


class MLP(nn.Module):
    """fc1 (column-parallel, activation fused into its epilogue) -> fc2 (row-parallel). The activation is also
    transformers' own ``ACT2FN`` module under transformers' name ``activation_fn``: one the GEMM epilogue does not
    have (relu, silu, ...) runs after fc1 as that module, with the tensors of one that has its own (prelu, xielu)
    read from the checkpoint; a fused one runs as the module only while it has hooks (neuron probes) or has been
    replaced, so those see what they see in transformers."""

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        act = config.hidden_act
        fused = FUSED_ALIASES.get(act, act) if isinstance(act, str) else None
        self.activation = fused if fused in ACTIVATIONS else None
        self.activation_fn = activation_module(act, join(prefix, "activation_fn"), weights)
        self.fused_fn = type(self.activation_fn)  # a module put in its place (nn.Identity()) runs as itself
        hidden, inner = config.hidden_size, config.intermediate_size
        if inner < 1:
            raise ValueError(
                f"intermediate_size is {inner}; vitriton's MLP needs at least 1 column (transformers' CLIP runs 0 as "
                f"fc2's bias alone)"
            )
        # Each rank's share of the inner dimension is padded to whole 16 bytes (``SHARD_MULTIPLE``): the padded
        # columns of fc1 are zero before the activation, and fc2's zero columns cancel whatever it makes of them.
        self.fc1 = ColumnParallelLinear.load(
            join(prefix, "fc1"), weights, in_features=hidden, out_features=inner, what="intermediate_size", pad=True
        )
        self.fc2 = RowParallelLinear.load(
            join(prefix, "fc2"), weights, in_features=inner, out_features=hidden, what="intermediate_size", pad=True
        )

    def forward(
        self, x: torch.Tensor, pending: list | None = None, symmetric_result: str | None = None
    ) -> torch.Tensor:
        return self.fc2(self.inner(x), pending, symmetric_result)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """fc1 and the activation: what fc2 takes."""
        fn = self.activation_fn
        if self.activation is not None and type(fn) is self.fused_fn and not (called_as_module(fn) or global_hooks()):
            return self.fc1(x, self.activation)
        return fn(self.fc1(x))


def activation_module(act, prefix: str, weights: Weights) -> nn.Module | Callable[[torch.Tensor], torch.Tensor]:
    """transformers' module for ``hidden_act`` (a name in ``ACT2FN``, or a callable as configs may hold). The
    tensors of an activation that has its own (prelu's slope, xielu's alphas) are read from ``prefix`` in the
    checkpoint, where transformers saves them: a trained value differs from a fresh module's. A tensor the module
    makes in a dtype of its own (xielu's bf16) keeps that dtype, as in transformers; the others take the model's."""
    if callable(act):
        return act
    if act not in ACT2FN:
        raise ValueError(f"hidden_act {act!r} is not one of transformers' activations ({', '.join(sorted(ACT2FN))})")
    module = ACT2FN[act]
    own = module.state_dict()
    if not own:
        return module
    loaded = {}
    for name, fresh in own.items():
        tensor = weights.get_tensor(join(prefix, name), shape=fresh.shape)
        explicit = fresh.is_floating_point() and fresh.dtype != torch.get_default_dtype()
        loaded[name] = tensor.to(fresh.dtype) if explicit else tensor
    module.load_state_dict(loaded, assign=True)
    return module.requires_grad_(False)


class EncoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: LN1 -> attention -> LN2 -> MLP. The encoder runs it on the ``(delta, residual)`` stream
    (``step``: the residual add fused into the next LayerNorm); called as a module it is transformers' layer,
    hidden states in and out, so forward hooks on it see what they see in transformers. It is transformers'
    ``GradientCheckpointingLayer``, so ``gradient_checkpointing_enable()`` (vitriton's models', or that of a
    transformers model holding a patched tower) switches it, and a checkpointed layer in training mode is
    called as a module (``Encoder.layer_hooks``), which recomputes it in backward."""

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
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        attentions: list | None = None,
        symmetric_result: tuple[str | None, str | None] = (None, None),
        **_,
    ) -> torch.Tensor:
        """transformers' ``CLIPEncoderLayer`` / ``SiglipEncoderLayer`` call: the layer's output hidden states.
        Masks come as ``key_padding_mask`` (batch, seq), 1 for the tokens to keep, and ``causal``, not as
        transformers' additive 4-d ``attention_mask``; the attention weights, when ``output_attentions``, are
        appended to ``attentions``."""
        if attention_mask is not None:
            raise ValueError(
                "vitriton's encoder layer takes key_padding_mask= (batch, seq; 1 keeps a token) and causal=, not "
                "transformers' 4-d additive attention_mask"
            )
        delta, residual, weights = self.step(
            hidden_states,
            None,
            causal=causal,
            key_padding_mask=key_padding_mask,
            output_attentions=output_attentions,
            symmetric_result=symmetric_result,
        )
        if attentions is not None:
            attentions.append(weights)
        return delta + residual

    def step(
        self,
        delta: torch.Tensor,
        residual: torch.Tensor | None,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        symmetric_result: tuple[str | None, str | None] = (None, None),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The layer on the ``(delta, residual)`` stream (the hidden state is their sum), as the encoder runs it.
        ``symmetric_result``: for the attention's and the MLP's reduce (``RowParallelLinear.forward``)."""
        normed, residual = self.layer_norm1(delta, residual)
        delta, weights = self.self_attn(
            normed,
            causal=causal,
            key_padding_mask=key_padding_mask,
            output_attentions=output_attentions,
            symmetric_result=symmetric_result[0],
        )
        delta, residual = self.mlp_block(delta, residual, symmetric_result=symmetric_result)
        return delta, residual, weights

    def accumulate(
        self,
        stream: torch.Tensor,
        shifts: tuple[torch.Tensor | None, torch.Tensor],
        *,
        owned: bool,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer on one rank's residual stream held without the out projection's and fc2's biases
        (``Encoder.forward_accumulated``): the hidden state before LN1 is ``stream + shifts[0]`` (None: no shift),
        before LN2 ``stream + shifts[1]``. Both projections add into the stream, the first in place only when the
        stream is ``owned`` (the encoder's, not its caller's). Returns ``(stream, attention weights or None)``."""
        normed, _ = self.layer_norm1(stream, shift=shifts[0])
        heads, weights = self.self_attn.attend(
            normed, causal=causal, key_padding_mask=key_padding_mask, output_attentions=output_attentions
        )
        stream = self.self_attn.out_proj.accumulate(heads, stream, in_place=owned)
        normed, _ = self.layer_norm2(stream, shift=shifts[1])
        return self.mlp.fc2.accumulate(self.mlp.inner(normed), stream, in_place=True), weights

    def attention_block(
        self, delta: torch.Tensor, residual: torch.Tensor | None, pending: list, symmetric_result=(None, None), **masks
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LN1 -> attention, its all-reduce left in ``pending``: the first half of ``forward``."""
        normed, residual = self.layer_norm1(delta, residual)
        return self.self_attn(normed, pending=pending, symmetric_result=symmetric_result[0], **masks)[0], residual

    def mlp_block(
        self,
        delta: torch.Tensor,
        residual: torch.Tensor,
        pending: list | None = None,
        symmetric_result=(None, None),
        **_,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LN2 -> MLP (its all-reduce left in ``pending`` when given): the second half of ``forward``."""
        normed, residual = self.layer_norm2(delta, residual)
        return self.mlp(normed, pending, symmetric_result[1]), residual


class EncoderOutput:
    """What :class:`Encoder` returns: the last hidden state as ``delta + residual`` (residual None: delta alone)
    or, from ``forward_accumulated``, as ``delta + shift``; the recorded hidden states in the order asked, and the
    attention weights of the layers that ran (or None)."""

    __slots__ = ("delta", "residual", "shift", "hidden_states", "attentions")

    def __init__(self, delta, residual, hidden_states, attentions, shift=None):
        self.delta, self.residual, self.shift = delta, residual, shift
        self.hidden_states, self.attentions = hidden_states, attentions

    def last(self) -> torch.Tensor:
        if self.shift is not None:
            return shifted(self.delta, self.shift)
        return self.delta if self.residual is None else self.delta + self.residual

    def normed(self, norm: nn.Module) -> torch.Tensor:
        """``norm`` of the last hidden state, the pending add fused into it (another module in the LayerNorm's
        place, ``nn.Identity()`` say, takes the last hidden state as transformers' would)."""
        if not isinstance(norm, LayerNorm):
            return norm(self.last())
        if self.shift is not None:
            return norm(self.delta, shift=self.shift)[0]
        return norm(self.delta, self.residual)[0]


def shifted(stream: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``stream + shift`` in the stream's dtype, one rounding (the shift may be wider)."""
    if autograd_records(stream, shift):
        return (stream + shift).to(stream.dtype)
    return torch.add(stream, shift, out=torch.empty_like(stream))


class Encoder(nn.Module):
    """The stack of layers. ``num_hidden_layers`` is the config's depth, by which negative feature-layer indices
    count; ``num_layers`` (at most that) is how many are built, for callers that never need the later ones."""

    layer_cls: type[EncoderLayer] = EncoderLayer

    def __init__(self, prefix: str, config, weights: Weights, num_layers: int | None = None):
        super().__init__()
        self.num_hidden_layers = config.num_hidden_layers
        built = self.num_hidden_layers if num_layers is None else num_layers
        self.layers = nn.ModuleList(self.layer_cls(join(prefix, f"layers.{i}"), config, weights) for i in range(built))
        self.chunks: int | None = None  # see overlap_chunks

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        depth: int,
        record: Sequence[int] | None = None,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> EncoderOutput:
        """Runs the first ``depth`` layers, recording the hidden states whose indices are in ``record``
        (0 = the input, i = the output of layer i, as transformers numbers them); hidden_states is None when
        ``record`` is, else a tuple (empty for an empty ``record``)."""
        chunks = self.overlap_chunks(hidden.shape[0])
        hooked = self.layer_hooks(depth)
        if chunks > 1 and record is None and not output_attentions and not any(hooked):
            return self.forward_overlapped(hidden, depth, chunks, causal=causal, key_padding_mask=key_padding_mask)
        masks = dict(causal=causal, key_padding_mask=key_padding_mask, output_attentions=output_attentions)
        if self.accumulates(hidden, depth, hooked):
            return self.forward_accumulated(hidden, depth, record, **masks)
        wanted = set(record or ())
        states = {0: hidden} if 0 in wanted else {}
        attentions = []
        delta, residual = hidden, None
        results = self.symmetric_results(depth, 1)
        for index in range(depth):
            layer = self.layers[index]
            if hooked[index]:
                # Through the module call, so its hooks run on hidden states as transformers' layers give them.
                hidden = delta if residual is None else delta + residual
                delta, residual = layer(hidden, attentions=attentions, symmetric_result=results[index], **masks), None
            else:
                delta, residual, weights = layer.step(delta, residual, symmetric_result=results[index], **masks)
                attentions.append(weights)
            if index + 1 in wanted:
                states[index + 1] = delta if residual is None else delta + residual
        return EncoderOutput(
            delta,
            residual,
            None if record is None else tuple(None if i is None else states[i] for i in record),
            tuple(attentions) if output_attentions else None,
        )

    def accumulates(self, hidden: torch.Tensor, depth: int, hooked: list[bool]) -> bool:
        """Whether ``forward_accumulated`` runs: on one rank (the tensor-parallel reduces need the deltas apart),
        outside autocast (the stream keeps the weights' dtype there, the GEMMs do not), and while neither a layer
        nor any module inside one is called as a module (hooks on the projections or the MLP see their calls
        only through ``EncoderLayer.step``). ``ACCUMULATE_RESIDUAL`` False turns it off (A/B runs)."""
        if not ACCUMULATE_RESIDUAL or depth == 0 or any(hooked):
            return False
        fc2 = self.layers[0].mlp.fc2
        if get_world_size(fc2.process_group) > 1 or torch.is_autocast_enabled(hidden.device.type):
            return False
        if hidden.dtype != fc2.weight.dtype:
            return False
        return not any(called_inside(layer) for layer in itertools.islice(self.layers, depth))  # layers: in hooked

    def forward_accumulated(
        self, hidden: torch.Tensor, depth: int, record: Sequence[int] | None, **masks
    ) -> EncoderOutput:
        """``forward`` on one rank's residual stream alone (``EncoderLayer.accumulate``): the out projections and
        fc2 add into it without their biases, whose running sums (fp32, one cumulative sum of them all per call, so
        biases changed in place count) are the shifts the LayerNorms add. Each LayerNorm reads one tensor and
        writes one, where ``step``'s reads two and writes two; the GEMMs read the stream as their C operand."""
        layers = list(itertools.islice(self.layers, depth))
        shifts = bias_sums(
            [p for layer in layers for p in (layer.self_attn.out_proj, layer.mlp.fc2)], hidden.shape[-1], hidden
        )
        wanted = set(record or ())
        states = {0: hidden} if 0 in wanted else {}
        attentions = []
        stream, shift = hidden, None
        for index, layer in enumerate(layers):
            stream, weights = layer.accumulate(stream, (shift, shifts[2 * index]), owned=index > 0, **masks)
            shift = shifts[2 * index + 1]
            attentions.append(weights)
            if index + 1 in wanted:
                states[index + 1] = shifted(stream, shift)
        return EncoderOutput(
            stream,
            None,
            None if record is None else tuple(None if i is None else states[i] for i in record),
            tuple(attentions) if masks["output_attentions"] else None,
            shift=shift,
        )

    def layer_hooks(self, depth: int) -> list[bool]:
        """Per layer of the first ``depth``, whether it must be called as a module: a forward or backward hook or
        pre-hook (its own, or a global one) must see it, its ``forward`` was replaced on the instance (as
        accelerate's hooks do), or it is checkpointed (:func:`checkpointed`). The other layers run their ``step``
        directly, without the module call's cost."""
        if global_hooks():
            return [True] * depth
        layers = itertools.islice(self.layers, depth)  # a slice of a ModuleList builds a new one
        if not torch.is_grad_enabled():  # nothing to recompute in backward: inference, the common case
            return [called_as_module(layer) for layer in layers]
        return [called_as_module(layer) or checkpointed(layer) for layer in layers]

    def symmetric_results(self, depth: int, chunks: int) -> list[tuple[str | None, str | None]]:
        """Per layer, what its attention's and MLP's reduces do with symmetric memory
        (``RowParallelLinear.forward``, ``vitriton.parallel.symmetric``): nothing when that is off, under
        torch.compile, or when the forward runs more than ``MAX_CHUNKS`` slices (the same on every rank); else
        "borrow" the reduced buffer, which the next LayerNorm consumes at once, except where something could keep
        it: "copy" for the last layer's MLP (its result leaves the encoder), and for every reduce while a forward
        hook or pre-hook is registered globally or on any module of the encoder."""
        if not symmetric.ENABLED or chunks > symmetric.MAX_CHUNKS or depth == 0 or torch.compiler.is_compiling():
            return [(None, None)] * depth
        hooked = bool(_global_forward_hooks or _global_forward_pre_hooks) or any(
            module._forward_hooks or module._forward_pre_hooks for module in self.modules()
        )
        mode = "copy" if hooked else "borrow"
        return [(mode, mode)] * (depth - 1) + [(mode, "copy")]

    def overlap_chunks(self, batch: int) -> int:
        """How many batch chunks a tensor-parallel forward interleaves (1: none). ``chunks`` set on the encoder
        overrides; by default 2 under tensor parallelism from batch 2 up, else 1 (and 1 under torch.compile)."""
        if torch.compiler.is_compiling():
            return 1  # dynamo traces collectives as functional ones, without async work handles to wait on
        if self.chunks is not None:
            return max(1, min(self.chunks, batch))
        group = self.layers[0].mlp.fc2.process_group if len(self.layers) else None
        return 2 if batch >= 2 and get_world_size(group) > 1 else 1

    def forward_overlapped(self, hidden: torch.Tensor, depth: int, chunks: int, **masks) -> EncoderOutput:
        """Tensor parallelism with its all-reduces overlapped: the batch runs as ``chunks`` slices, and each
        half-layer of one slice is issued while the previous slices' all-reduces are still running on NCCL's
        stream (the next slice's attention hides this slice's out-projection reduce; its MLP hides the
        next one's). The result equals ``forward``'s up to rounding: the GEMMs see half the rows and may pick
        other kernels (bitwise equal in the fp32 CPU tests, within the bf16 bound on GPUs)."""
        parts = hidden.chunk(chunks)
        mask = masks.pop("key_padding_mask")
        part_masks = [None] * len(parts) if mask is None else mask.chunk(chunks)
        deltas, residuals = list(parts), [None] * len(parts)
        pending = [[] for _ in parts]  # each slice's started, not yet waited for, all-reduces
        results = self.symmetric_results(depth, chunks)
        for layer, result in zip(self.layers[:depth], results, strict=True):
            for step in (layer.attention_block, layer.mlp_block):
                for i, part_mask in enumerate(part_masks):
                    wait_all(pending[i])
                    deltas[i], residuals[i] = step(
                        deltas[i], residuals[i], pending[i], result, key_padding_mask=part_mask, **masks
                    )
        for reduces in pending:
            wait_all(reduces)
        residual = None if depth == 0 else torch.cat(residuals)
        return EncoderOutput(torch.cat(deltas), residual, None, None)


def checkpointed(layer: EncoderLayer) -> bool:
    """Whether ``layer``, called with grad on, recomputes in backward (``GradientCheckpointingLayer.__call__``):
    gradient checkpointing is on for it and it is in training mode, as transformers' layers check. With grad off
    there is nothing to save, and the fused path runs (``Encoder.layer_hooks``)."""
    return layer.training and layer.gradient_checkpointing


# The single-rank forward on one residual stream (``Encoder.forward_accumulated``); False: the (delta, residual) pair.
ACCUMULATE_RESIDUAL = True


def bias_sums(projections: Sequence[RowParallelLinear], width: int, like: torch.Tensor) -> list[torch.Tensor]:
    """Per projection, the fp32 sum of its bias and those before it (None counts as zeros). While autograd records
    and a bias takes gradients, one add per row, as transformers' layers add them: a bias whose sums feed nothing
    the loss reads then keeps ``grad`` None, where one stacked cumulative sum would hand it zeros."""
    biases = [like.new_zeros(width) if p.bias is None else p.bias for p in projections]
    if not (torch.is_grad_enabled() and any(b.requires_grad for b in biases)):
        return list(torch.stack(biases).cumsum(0, dtype=torch.float32).unbind())
    return list(itertools.accumulate(b.float() for b in biases))


def check_feature_layers(feature_layers) -> list[int]:
    """``feature_layers`` as a list of ints: an int, or a non-empty sequence of ints (bools and strings are not)."""

    def is_index(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if is_index(feature_layers):
        return [feature_layers]
    if isinstance(feature_layers, Sequence) and not isinstance(feature_layers, str):
        bad = [value for value in feature_layers if not is_index(value)]
        if not bad and feature_layers:
            return list(feature_layers)
        if not feature_layers:
            raise ValueError("feature_layers is empty; give an int or a non-empty list of ints, e.g. -2 or [-2, -1]")
        raise TypeError(f"feature_layers holds {bad!r}; each entry must be an int layer index, e.g. [-2, -1]")
    raise TypeError(
        f"feature_layers={feature_layers!r} is a {type(feature_layers).__name__}; expected an int or a list of ints, "
        f"e.g. -2 or [-2, -1]"
    )


def resolve_feature_layers(feature_layers: int | Sequence[int], num_layers: int) -> list[int]:
    """Maps feature layer indices (negative allowed, as LLaVA's ``vision_feature_layer = -2``) to 0..num_layers."""
    resolved = []
    for index in check_feature_layers(feature_layers):
        if not -(num_layers + 1) <= index <= num_layers:
            raise ValueError(
                f"feature layer {index} is out of range: the encoder has {num_layers} layers, so hidden states are "
                f"indexed {-(num_layers + 1)}..{num_layers}"
            )
        resolved.append(index % (num_layers + 1))
    return resolved


def returned(output, return_dict: bool):
    """transformers' ``return_dict=False``: the output's non-None fields as a tuple (nested outputs too)."""
    return output if return_dict else output.to_tuple()


def compute_dtype(x: torch.Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the linears and attention run in: the autocast dtype of ``x``'s device when autocast is on
    there, else the weights' dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight_dtype


def interpreter_guard(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """The eager references for a bf16 forward on CPU under TRITON_INTERPRET=1: the interpreter cannot run bf16
    ``tl.dot`` and would return garbage."""
    if dtype == torch.bfloat16 and device.type == "cpu" and interpreting():
        return eager_mode()
    return contextlib.nullcontext()


class ModelAttributes:
    """What code around a transformers model reads off it, for vitriton's towers and model classes alike."""

    # transformers' gradient checkpointing, its own methods: they switch the encoder layers, which are its
    # GradientCheckpointingLayer, and call enable_input_require_grads (below) where the main input is input_ids.
    supports_gradient_checkpointing = True
    gradient_checkpointing_enable = PreTrainedModel.gradient_checkpointing_enable
    gradient_checkpointing_disable = PreTrainedModel.gradient_checkpointing_disable
    _set_gradient_checkpointing = PreTrainedModel._set_gradient_checkpointing
    is_gradient_checkpointing = PreTrainedModel.is_gradient_checkpointing
    disable_input_require_grads = PreTrainedModel.disable_input_require_grads

    def enable_input_require_grads(self) -> None:
        """Makes each tower's input embedding output require grad, so that a frozen model's hidden states do (for
        adapters, and for checkpointed layers to recompute), as transformers hooks the input embeddings of each
        of its models in the tree: a dual encoder's both towers, a tower's own."""

        def make_inputs_require_grads(module: nn.Module, inputs, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        embeddings = {
            id(m.get_input_embeddings()): m.get_input_embeddings() for m in self.modules() if isinstance(m, Tower)
        }
        self._require_grads_hooks = [e.register_forward_hook(make_inputs_require_grads) for e in embeddings.values()]

    @property
    def architecture(self) -> str:
        """The transformers class whose checkpoint ``save_pretrained`` writes: this class's name."""
        return type(self).__name__

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        *,
        safe_serialization: bool = True,
    ) -> None:
        """Writes config.json (the transformers config, with ``architectures`` and ``dtype`` set as transformers
        sets them) and the ``state_dict()`` (transformers' keys) as ``model.safetensors``, or shards above
        ``max_shard_size``, so ``transformers.<architecture>.from_pretrained`` and vitriton's load the directory.
        ``is_main_process``: whether this process writes; by default rank 0 of the default process group (every
        process when torch.distributed is not initialised). A tensor-parallel model raises: its ranks hold shards.
        ``safe_serialization`` changes nothing: transformers 5.17 writes safetensors whatever its value, as here."""
        if push_to_hub:
            self.push_to_hub()
        if parallel_mode(self) == "tensor":
            raise RuntimeError(
                f"save_pretrained of a tensor-parallel {type(self).__name__}: each rank holds a shard of the weights. "
                f"Load it without a process group, or with parallel='data', to save it"
            )
        for tower in self.modules():
            if isinstance(tower, Tower) and len(tower.encoder.layers) < tower.encoder.num_hidden_layers:
                raise RuntimeError(
                    f"save_pretrained of a {type(self).__name__} built with its first {len(tower.encoder.layers)} of "
                    f"{tower.encoder.num_hidden_layers} layers (feature_layers / num_layers): its checkpoint would "
                    f"lack the later layers that its config names, which transformers would initialise at random. "
                    f"Load it whole to save it"
                )
        if is_main_process is None:
            is_main_process = get_rank(default_group()) == 0
        if not is_main_process:
            return
        if state_dict is None:
            state_dict = self.state_dict()
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"save_directory {save_directory} is a file; pass a directory")
        os.makedirs(save_directory, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.architectures = [self.architecture]
        config.dtype = str(self.dtype).removeprefix("torch.")
        config.save_pretrained(save_directory)
        save_checkpoint(state_dict, save_directory, max_shard_size=max_shard_size)

    def push_to_hub(self, *args, **kwargs) -> str:
        """transformers' ``push_to_hub`` (and ``save_pretrained(push_to_hub=True)``), which vitriton does not
        implement: it raises, saying how to upload instead."""
        raise NotImplementedError(
            f"{type(self).__name__}.push_to_hub is not implemented: call model.save_pretrained(directory), then "
            f"upload the directory (huggingface_hub.upload_folder), or push the transformers model it came from"
        )

    @property
    def device(self) -> torch.device:
        """The device of the parameters, as transformers' ``model.device`` (e.g. ``inputs.to(model.device)``)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point parameter, as transformers' ``model.dtype``."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters held by this process (under tensor parallelism: this rank's shards), as transformers counts
        them; every parameter is frozen, so ``only_trainable`` counts those a caller unfroze."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, VocabParallelEmbedding | nn.Embedding)}
            skip |= {id(m.position_embedding) for m in self.modules() if hasattr(m, "position_embedding")}
        return sum(
            p.numel() for p in self.parameters() if id(p) not in skip and (p.requires_grad or not only_trainable)
        )


class Tower(ModelAttributes, nn.Module):
    """What the vision and text towers share: transformers' output options with their config defaults, the
    plan of which layers run and which hidden states are kept, and automatic CUDA graphs (``auto_graphs``,
    vitriton.graphs)."""

    config: object
    encoder: Encoder

    @property
    def architecture(self) -> str:
        """transformers 5's tower model of the same keys (``CLIPVisionTransformer`` -> ``CLIPVisionModel``)."""
        return type(self).__name__.replace("Transformer", "Model")

    def __init__(self):
        super().__init__()
        self.auto_graphs = AutoGraphs()
        self.auto_graphs.attach(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        graphs = self.__dict__.get("auto_graphs")
        if isinstance(graphs, AutoGraphs):
            # A copy or an unpickled tower: graphs and a handle of its own (a shallow copy shares the state dict,
            # and re-attaching the original's graphs would point its compiled calls at the copy).
            self.auto_graphs = AutoGraphs(graphs.enabled)
            self.auto_graphs.attach(self)

    @property
    def tensor_parallel(self) -> bool:
        """Whether any module (a layer, the token embedding of a tower built without layers) is sharded over a
        process group of more than one rank."""
        return any(get_world_size(getattr(module, "process_group", None)) > 1 for module in self.modules())

    def graph_context(self) -> tuple:
        """What a forward reads besides its arguments: the config's defaults for the output options, and
        whether ``eager_mode`` asks for the reference ops."""
        config = self.config
        matmul = torch.backends.cuda.matmul
        return (
            eager_override(),
            # The switches cuBLAS (fp32 and reduced-precision reductions) and SDPA (SigLIP's head) read per call.
            torch.get_float32_matmul_precision(),
            matmul.allow_bf16_reduced_precision_reduction,
            matmul.allow_fp16_reduced_precision_reduction,
            torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled(),
            torch.backends.cuda.cudnn_sdp_enabled(),
            config_flag(config, "output_hidden_states", False),
            config_flag(config, "output_attentions", False),
            config_flag(config, "return_dict", True),
        )

    def graph_tokens(self, arguments: dict) -> int | None:
        """Tokens a call keeps in a graph's outputs: batch x sequence for each hidden state it returns (the last,
        and those ``output_hidden_states`` or ``feature_layers`` ask for); None when its input is not the usual
        batch-first tensor or its options are wrong (the eager call raises the error)."""
        tokens = self.input_tokens(arguments)
        if tokens is None:
            return None
        try:
            record, *_ = self.options(
                arguments.get("output_hidden_states"),
                arguments.get("output_attentions"),
                arguments.get("return_dict"),
                arguments.get("feature_layers"),
            )
        except (TypeError, ValueError):
            return None
        return tokens * (1 + sum(index is not None for index in record or ()))

    def input_tokens(self, arguments: dict) -> int | None:
        """Tokens in a call's input (batch x sequence), or None when it is not the usual batch-first tensor."""
        raise NotImplementedError

    def options(
        self,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
        return_dict: bool | None,
        feature_layers: int | Sequence[int] | None,
    ) -> tuple[list[int | None] | None, int, bool, bool]:
        """Returns ``(record, depth, output_attentions, return_dict)``; ``record`` is None when no hidden states
        are asked for, else the hidden states' indices in the order returned (None: a place left None).

        With ``feature_layers``, hidden_states holds the requested layers in the order asked, and the layers after
        the deepest one are not run; unless that is the last layer, last_hidden_state is the deepest requested
        state (un-normalised) and pooler_output is None. ``output_hidden_states`` may be a list (tuple, set) of
        layer indices, as transformers 5.17 takes it (:func:`hidden_state_slots`).
        """
        config = self.config
        if output_hidden_states is None:
            output_hidden_states = config_flag(config, "output_hidden_states", False)
        if output_attentions is None:
            output_attentions = config_flag(config, "output_attentions", False)
        if return_dict is None:
            return_dict = config_flag(config, "return_dict", True)
        total = self.encoder.num_hidden_layers
        if feature_layers is not None:
            record = resolve_feature_layers(feature_layers, total)
            depth = max(record)
        else:
            record, depth = hidden_state_slots(output_hidden_states, total), total
        built = len(self.encoder.layers)
        if depth > built:
            raise ValueError(
                f"this tower was loaded with its first {built} of {total} layers, so it cannot run to layer {depth}; "
                f"load it with a larger num_layers (or without feature_layers / num_layers) to run the whole tower"
            )
        return record, depth, bool(output_attentions), bool(return_dict)

    @staticmethod
    def output(
        encoded: EncoderOutput, head: tuple[torch.Tensor, torch.Tensor | None] | None, return_dict: bool
    ) -> BaseModelOutputWithPooling | tuple:
        """transformers' output from the encoder's and the head's: without the head (a tower stopped early by
        ``feature_layers``), last_hidden_state is the deepest state run and pooler_output is None."""
        last_hidden_state, pooler_output = (encoded.last(), None) if head is None else head
        return Tower.assemble(last_hidden_state, pooler_output, encoded.hidden_states, return_dict, encoded.attentions)

    @staticmethod
    def assemble(
        last_hidden_state: torch.Tensor,
        pooler_output: torch.Tensor | None,
        hidden_states: tuple[torch.Tensor, ...] | None,
        return_dict: bool,
        attentions: tuple[torch.Tensor, ...] | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=pooler_output,
            hidden_states=hidden_states,
            attentions=attentions,
        )
        return returned(output, return_dict)


def hidden_state_slots(output_hidden_states, num_layers: int) -> list[int | None] | None:
    """Which hidden states ``output_hidden_states`` asks for, as transformers 5.17 reads it: None for no hidden
    states; for True, every layer's input and the last layer's output (nothing for a tower of no layers). A list,
    tuple or set of layer indices (0 = the first layer) asks for those layers' outputs alone: hidden_states then
    holds one place per layer, None where a layer was not asked for, and no embeddings state (an index outside
    0..num_layers - 1, negative ones too, matches no layer, and an empty list asks for none)."""
    if isinstance(output_hidden_states, list | tuple | set):  # the types transformers 5.17 reads as layer indices
        if not output_hidden_states:
            return None
        return [layer + 1 if layer in output_hidden_states else None for layer in range(num_layers)]
    if not output_hidden_states:
        return None
    return list(range(num_layers + 1)) if num_layers else []


# Where transformers' configs keep the output options a forward reads on every call: the instance's dict
# (output_attentions behind a property that returns ``_output_attentions``).
_CONFIG_KEYS = {"output_hidden_states": "output_hidden_states", "output_attentions": "_output_attentions",
                "return_dict": "return_dict"}  # fmt: skip


def config_flag(config: object, name: str, default: bool) -> bool:
    """``getattr(config, name, default)`` for an output option, read from the instance's dict where transformers
    keeps it. That skips the config classes' Python ``__getattribute__`` (two levels in transformers 5.17), and under
    torch.compile it makes the guard a dict lookup in C++ rather than an attribute read that runs that Python on
    every compiled call (three reads cost 13 us a call on this project's CPU). A config that does not hold the key
    there (another class, a renamed field) is read with getattr."""
    key = _CONFIG_KEYS[name]
    values = vars(config)  # not getattr(config, "__dict__"), which runs that Python
    return values[key] if key in values else getattr(config, name, default)


def pad_to_16_bytes(width: int) -> int:
    """Columns to add to a row of ``width`` 16-bit (or wider) elements so its length is a multiple of 16 bytes."""
    return -width % 8


class PatchEmbeddings(nn.Module):
    """Patch projection as one GEMM, optional class token, learned position table (interpolated for other sizes).

    transformers' strided convolution is a GEMM over non-overlapping patches: pixel_values is cut into one
    (channels * patch * patch) row per patch, and multiplied by the conv weight seen as (hidden, channels * patch *
    patch), a view of the parameter, which keeps the conv's shape. cuDNN ran that conv at ~30 TF/s on the H100
    (2.9 ms at ViT-L/14-336 batch 128 bf16), the patch copy and a cuBLAS GEMM in ~0.6 ms. With a class token each
    image's rows start with one zero row, so the GEMM writes the whole (batch, tokens, hidden) block and no
    ``torch.cat`` copies it again; the class token then overwrites that row.

    The position table is added in a pass of its own. Folding it into the next LayerNorm as a residual would save
    one of the four reads and writes of the tokens that the add and that LayerNorm make (two for CLIP's
    pre-LayerNorm, whose sum is not kept), but needs a residual broadcast over the batch in that kernel, and under
    autocast the table is not in the tokens' dtype.
    """

    transformers_names = {
        "patch_weight": "patch_embedding.weight",
        "patch_bias": "patch_embedding.bias",
        "position_embedding": "position_embedding.weight",
    }

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
        self._padded: torch.Tensor | None = None
        if not self.patch_weight.is_meta:
            self.gemm_weight()  # the parameter becomes a view of its padded GEMM operand now, not at a first call
        positions = (config.image_size // patch) ** 2 + (1 if class_token else 0)
        self.position_embedding = frozen(
            weights.get_tensor(join(prefix, "position_embedding.weight"), shape=(positions, hidden))
        )
        rename_hooks(self)

    def check(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values is a {type(pixel_values).__name__}; expected a (batch, 3, H, W) tensor")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be 4-d (batch, channels, height, width); got shape {tuple(pixel_values.shape)}"
            )
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            if pixel_values.shape[-1] == self.num_channels:
                raise ValueError(
                    f"pixel_values has shape {tuple(pixel_values.shape)}: the channel dimension looks last (NHWC); "
                    f"pass pixel_values.permute(0, 3, 1, 2) (batch, {self.num_channels}, height, width)"
                )
            raise ValueError(f"pixel_values has {channels} channels; the config expects {self.num_channels}")
        if height < self.patch_size or width < self.patch_size:
            # As transformers' convolution refuses it; a config whose image_size is below its patch_size gets here.
            raise ValueError(f"image size {height}x{width} is smaller than one {self.patch_size}-pixel patch")
        patches = (height // self.patch_size) * (width // self.patch_size)
        if interpolate_pos_encoding:
            if len(self.position_embedding) == (1 if self.class_embedding is not None else 0):
                raise ValueError(
                    f"the position table holds no patch position to interpolate: the config's image_size "
                    f"{self.image_size} is smaller than its patch_size {self.patch_size}"
                )
        elif self.class_embedding is not None and (height, width) != (self.image_size, self.image_size):
            # As transformers: CLIP's embeddings want the config's image size, SigLIP's only as many patches as its
            # position table holds, in any grid, the table added row by row (or a table of one position, added to
            # every patch); the bottom and right pixels that do not fill a whole patch are dropped.
            raise ValueError(
                f"image size {height}x{width} does not match the config's {self.image_size}x{self.image_size}; "
                f"pass interpolate_pos_encoding=True to run other sizes"
            )
        elif self.class_embedding is None and 1 != len(self.position_embedding) != patches:
            # Two comparisons, not ``not in (1, patches)``: dynamo decided that membership test wrongly once the
            # image size had become a symbolic shape (a valid image raised under torch.compile).
            raise ValueError(
                f"image size {height}x{width} gives {patches} patches of {self.patch_size} pixels; the position table "
                f"holds {len(self.position_embedding)} (the config's {self.image_size}x{self.image_size}): pass "
                f"interpolate_pos_encoding=True to run other sizes"
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

    def patches(self, pixel_values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int, int]:
        """``(rows, grid_h, grid_w)``: ``rows`` is (batch, tokens, channels * patch * patch) in ``dtype``, the patches
        in row-major grid order after a zero row per image when there is a class token. One copy, which also casts;
        the bottom and right pixels that do not fill a whole patch are dropped, as the strided convolution drops
        them."""
        batch, channels, height, width = pixel_values.shape
        patch = self.patch_size
        grid_h, grid_w = height // patch, width // patch
        grid = pixel_values[:, :, : grid_h * patch, : grid_w * patch]
        grid = grid.reshape(batch, channels, grid_h, patch, grid_w, patch).permute(0, 2, 4, 1, 3, 5)
        lead = 1 if self.class_embedding is not None else 0
        width = channels * patch * patch
        if autograd_records(pixel_values) or torch.jit.is_tracing():
            # Out of place, so that autograd records it (dynamo loses requires_grad through the in-place copy), and
            # so that a torch.jit.trace follows the batch size instead of baking the buffer's shape in.
            rows = grid.reshape(batch, grid_h * grid_w, width).to(dtype)
            return F.pad(rows, (0, pad_to_16_bytes(width), lead, 0)), grid_h, grid_w
        rows = pixel_values.new_empty((batch, lead + grid_h * grid_w, width + pad_to_16_bytes(width)), dtype=dtype)
        rows[:, :lead].zero_()
        rows[:, :, width:].zero_()
        rows[:, lead:, :width].unflatten(-1, (channels, patch, patch)).view(
            batch, grid_h, grid_w, channels, patch, patch
        ).copy_(grid)
        return rows, grid_h, grid_w

    @property
    def patch_embedding(self) -> nn.Module:
        """transformers' name of the patch projection, which its outer models' ``get_input_embeddings()`` reads
        (``CLIPVisionModelWithProjection`` of a patched model): here this module, whose weight is
        ``patch_weight``, as vitriton's own ``get_input_embeddings()`` gives it."""
        return self

    def gemm_weight(self) -> torch.Tensor:
        """The conv weight as the GEMM's (hidden, K) operand, K padded with zero columns to whole 16 bytes as the
        patch rows are: cuBLAS ran patch 14's K = 588 at 170 TF/s on the H100, against 493 at K = 592.

        The padded matrix is the parameter's storage: ``patch_weight`` is a view of its first K columns, so every
        in-place change of the weight (``copy_``, ``.data`` writes, ``load_state_dict``, under inference mode
        too) reaches the GEMM, and a CUDA graph that captured the padded matrix replays the current weight. When
        the parameter is given a new tensor (``.to()``, ``.half()``, ``param.data = t``), the padded storage is
        rebuilt from it on the next call."""
        weight = self.patch_weight
        # Shapes only: a view of a parameter re-pointed under inference_mode raises (no version counter).
        hidden, width = weight.shape[0], math.prod(weight.shape[1:])
        pad = pad_to_16_bytes(width)
        if pad == 0:
            return weight.reshape(hidden, width)
        if torch.compiler.is_compiling() or autograd_records(weight):
            return F.pad(weight.reshape(hidden, width), (0, pad))  # traced, or recorded by autograd
        padded = self._padded
        if padded is None or padded.data_ptr() != weight.data_ptr() or padded.dtype != weight.dtype:
            with torch.inference_mode(False), torch.no_grad():
                padded = F.pad(weight.detach().reshape(hidden, width), (0, pad))
                weight.data = padded[:, :width].view(weight.shape)
            self._padded = padded
        return padded

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        self.check(pixel_values, interpolate_pos_encoding)
        dtype = compute_dtype(pixel_values, self.patch_weight.dtype)
        rows, grid_h, grid_w = self.patches(pixel_values, dtype)
        _, weight, bias = autocast_args(rows, self.gemm_weight(), self.patch_bias)
        with interpreter_guard(dtype, rows.device):
            tokens = linear(rows, weight, bias)
        if self.class_embedding is not None:
            # expand_as: a torch.jit.trace then records the batch size as the input's, not as a constant.
            tokens[:, 0] = self.class_embedding.expand_as(tokens[:, 0])
        # Out of place: under autocast the tokens are in the autocast dtype and the sum in the table's, as in
        # transformers.
        return tokens + (self.positions(grid_h, grid_w) if interpolate_pos_encoding else self.position_embedding)


class TextEmbeddings(nn.Module):
    """Vocabulary-parallel token embedding plus a replicated learned position table.

    Ids are checked without waiting for the device: CPU ids in eager mode raise a ValueError before the lookup;
    CUDA ids (and any ids under torch.compile or in a fake-tensor run, which have no values to read) go through
    ``torch._assert_async``, which fails the next synchronising call with a message naming the problem.
    """

    transformers_names = {"position_embedding": "position_embedding.weight"}

    def __init__(self, prefix: str, config, weights: Weights):
        super().__init__()
        self.max_positions = config.max_position_embeddings
        self.token_embedding = VocabParallelEmbedding.load(
            join(prefix, "token_embedding"), weights, vocab_size=config.vocab_size, hidden_size=config.hidden_size
        )
        self.position_embedding = frozen(
            weights.get_tensor(
                join(prefix, "position_embedding.weight"), shape=(config.max_position_embeddings, config.hidden_size)
            )
        )
        rename_hooks(self)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the token table, read off the module in its place (``set_input_embeddings``, or transformers'
        code setting ``token_embedding``, may have put an ``nn.Embedding`` of another vocabulary there); None when
        that module does not say."""
        table = self.token_embedding
        if isinstance(table, VocabParallelEmbedding):
            return table.shard.total
        rows = getattr(table, "num_embeddings", None)
        if rows is None:  # a wrapper (a PEFT embedding, say): the rows of the table it holds
            weight = getattr(table, "weight", None)
            rows = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
        return rows

    def check(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor; got {input_ids.dtype}")
        seq = input_ids.shape[-1]
        if seq > self.max_positions:
            raise ValueError(f"text has {seq} tokens; the position table holds {self.max_positions}")
        vocab_size = self.vocab_size
        if vocab_size is not None:
            self.check_range(input_ids, vocab_size, "token id", f"the vocabulary of {vocab_size} tokens")
        if position_ids is not None:
            self.check_range(position_ids, self.max_positions, "position id", f"0..{self.max_positions - 1}")

    @staticmethod
    def check_range(ids: torch.Tensor, limit: int, what: str, allowed: str) -> None:
        if not ids.numel():
            return
        if ids.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(ids):
            low, high = ids.min().item(), ids.max().item()
            if low < 0 or high >= limit:
                raise ValueError(f"{what} {low if low < 0 else high} is outside {allowed}")
        else:
            torch._assert_async(((ids >= 0) & (ids < limit)).all(), f"a {what} is outside {allowed}")

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.check(input_ids, position_ids)
        tokens = self.token_embedding(input_ids)
        if position_ids is None:
            return tokens + self.position_embedding[: input_ids.shape[-1]]
        return tokens + F.embedding(position_ids, self.position_embedding)


class VisionTransformer(Tower):
    """The ViT trunk, read as timm's ``forward_features`` / ``forward_head``: patch embeddings -> (pre-norm) ->
    encoder -> head. Presets choose a class token and a pre-encoder LayerNorm (CLIP), which LayerNorm is applied
    to what after the encoder, and the pooling (CLS token, or SigLIP's attention-pooling head).

    Takes what transformers 5.17's ``CLIPVisionModel`` / ``SiglipVisionModel`` take (they are the towers that
    ``CLIPModel``, ``SiglipModel`` and LLaVA call), plus the keyword-only ``feature_layers``. ``output_attentions``
    runs that call's attention through transformers' eager formula to return the weights.
    """

    main_input_name = "pixel_values"
    class_token: bool = True
    conv_bias: bool = False
    pre_norm: bool = True
    # True: post_layernorm normalises the whole last hidden state (SigLIP); False: only the pooled CLS (CLIP).
    norm_all_tokens: bool = False
    encoder_cls: type[Encoder] = Encoder

    def __init__(self, prefix: str, config, weights: Weights, num_layers: int | None = None):
        super().__init__()
        self.config = config
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = PatchEmbeddings(
            join(prefix, "embeddings"), config, weights, class_token=self.class_token, conv_bias=self.conv_bias
        )
        self.pre_layrnorm = LayerNorm(join(prefix, "pre_layrnorm"), weights, hidden, eps) if self.pre_norm else None
        self.encoder = self.encoder_cls(join(prefix, "encoder"), config, weights, num_layers)
        # A truncated tower never reaches its head: do not load it.
        whole = len(self.encoder.layers) == config.num_hidden_layers
        self.post_layernorm = LayerNorm(join(prefix, "post_layernorm"), weights, hidden, eps) if whole else None
        self.head = self.build_head(join(prefix, "head"), config, weights) if whole else None

    def build_head(self, prefix: str, config, weights: Weights) -> nn.Module | None:
        return None

    def input_tokens(self, arguments: dict) -> int | None:
        pixels = arguments.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
            return None
        patch = self.config.patch_size
        return pixels.shape[0] * (pixels.shape[2] // patch) * (pixels.shape[3] // patch)

    @replayable
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = False,
        *,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        feature_layers: int | Sequence[int] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        record, depth, output_attentions, return_dict = self.options(
            output_hidden_states, output_attentions, return_dict, feature_layers
        )
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch, channels, height, width) tensor")
        hidden = self.embeddings(pixel_values, bool(interpolate_pos_encoding))
        dtype = compute_dtype(hidden, self.embeddings.patch_weight.dtype)
        with interpreter_guard(dtype, hidden.device):
            if self.pre_layrnorm is not None:
                hidden = normalized(self.pre_layrnorm, hidden)
            encoded = self.encoder(hidden, depth=depth, record=record, output_attentions=output_attentions)
            head = self.forward_head(encoded) if depth == self.encoder.num_hidden_layers else None
        return self.output(encoded, head, return_dict)

    def get_input_embeddings(self) -> nn.Module:
        """The patch-embedding module (weight ``patch_weight``), where transformers gives its ``Conv2d``."""
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        """transformers puts a new ``Conv2d`` in the patch embedding's place; here the patch embedding is a GEMM
        on ``patch_weight`` (kept padded for it), so a module cannot take its place: this raises, naming what
        works instead."""
        raise NotImplementedError(
            f"set_input_embeddings({type(value).__name__}) on {type(self).__name__}: vitriton's patch embedding is a "
            f"GEMM on the conv weight, not a module to replace. Copy a new weight of the same shape in place "
            f"(model.get_input_embeddings().patch_weight.copy_(conv.weight), or load_state_dict), or load a "
            f"checkpoint saved with the new convolution"
        )

    def forward_head(self, encoded: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(last_hidden_state, pooler_output)`` from the encoder's output."""
        if self.norm_all_tokens:
            last = encoded.normed(self.post_layernorm)
            return last, None if self.head is None else self.head(last)
        last = encoded.last()
        return last, normalized(self.post_layernorm, last[:, 0])


def text_rows(input_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids`` (..., seq) as (texts, seq); texts of no token raise, where the reshape would fail unnamed."""
    if input_ids.dim() == 0 or input_ids.shape[-1] == 0:
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, seq) token ids with at least one token"
        )
    return input_ids.reshape(-1, input_ids.shape[-1])


class TextTransformer(Tower):
    """The text trunk: token + position embeddings -> encoder -> final LayerNorm -> pooling preset.

    Takes what transformers 5.17's ``CLIPTextModel`` / ``SiglipTextModel`` take, plus the keyword-only
    ``feature_layers``; ``attention_mask`` is the tokenizer's 2-d (batch, seq) mask of 1s and 0s.
    """

    main_input_name = "input_ids"
    causal: bool = False
    encoder_cls: type[Encoder] = Encoder

    def __init__(self, prefix: str, config, weights: Weights, num_layers: int | None = None):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(join(prefix, "embeddings"), config, weights)
        self.encoder = self.encoder_cls(join(prefix, "encoder"), config, weights, num_layers)
        whole = len(self.encoder.layers) == config.num_hidden_layers
        self.final_layer_norm = (
            LayerNorm(join(prefix, "final_layer_norm"), weights, config.hidden_size, config.layer_norm_eps)
            if whole
            else None
        )

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define its pooling")

    def input_tokens(self, arguments: dict) -> int | None:
        ids = arguments.get("input_ids")
        return ids.numel() if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

    @replayable
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        feature_layers: int | Sequence[int] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        record, depth, output_attentions, return_dict = self.options(
            output_hidden_states, output_attentions, return_dict, feature_layers
        )
        if input_ids is None:
            raise ValueError("input_ids is required: a (batch, seq) tensor of token ids")
        input_ids = text_rows(input_ids)
        key_padding_mask = None if attention_mask is None else self.padding_mask(attention_mask, input_ids)
        if position_ids is not None:
            position_ids = position_ids.reshape(-1, position_ids.shape[-1])
        hidden = self.embeddings(input_ids, position_ids)
        dtype = compute_dtype(hidden, self.embeddings.position_embedding.dtype)
        with interpreter_guard(dtype, hidden.device):
            encoded = self.encoder(
                hidden,
                depth=depth,
                record=record,
                causal=self.causal,
                key_padding_mask=key_padding_mask,
                output_attentions=output_attentions,
            )
            head = self.forward_head(encoded, input_ids) if depth == self.encoder.num_hidden_layers else None
        return self.output(encoded, head, return_dict)

    def check_batch(self, input_ids=None, attention_mask=None, position_ids=None, *args, **kwargs) -> None:
        """The checks of token and position ids that depend on their values, on a whole batch: data parallelism
        runs them before splitting it, so a bad id in one rank's rows raises on every rank, not on that rank
        alone while the others wait for its outputs."""
        if isinstance(input_ids, torch.Tensor):
            ids = text_rows(input_ids)
            positions = None
            if isinstance(position_ids, torch.Tensor):
                positions = position_ids.reshape(-1, position_ids.shape[-1])
            self.embeddings.check(ids, positions)

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding, as transformers' text model gives it."""
        return self.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Puts ``value`` (an ``nn.Embedding``, as transformers' resizing of a vocabulary makes) in the token
        embedding's place; token ids are then checked against its ``num_embeddings``. Under tensor parallelism a
        full table on every rank serves, since its lookups need no reduce."""
        self.embeddings.token_embedding = value

    def forward_head(self, encoded: EncoderOutput, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = encoded.normed(self.final_layer_norm)
        return last, self.pool(last, input_ids)

    @staticmethod
    def padding_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The (batch, seq) bool mask of keys to attend to, from the tokenizer's mask."""
        if attention_mask.dim() == 4:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, a 4-d (batch, heads, query, key) mask; "
                f"pass the tokenizer's 2-d (batch, seq) mask of 1s and 0s (the causal part is built in)"
            )
        attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1])
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; input_ids has {tuple(input_ids.shape)}"
            )
        return attention_mask.to(torch.bool)


def normalize(embeds: torch.Tensor) -> torch.Tensor:
    return embeds / embeds.norm(p=2, dim=-1, keepdim=True)
