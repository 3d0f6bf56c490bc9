"""The four hot-path ops the encoders call; each runs a Triton kernel on CUDA and an eager reference on CPU."""

from vitriton.kernels._dispatch import eager_mode, interpreting, use_triton
from vitriton.kernels.attention import attention, attention_reference
from vitriton.kernels.layernorm import layer_norm, layer_norm_reference
from vitriton.kernels.linear import ACTIVATIONS, linear, linear_reference
from vitriton.kernels.qkv import qkv_projection, qkv_projection_reference

__all__ = [
    "ACTIVATIONS",
    "attention",
    "attention_reference",
    "eager_mode",
    "interpreting",
    "layer_norm",
    "layer_norm_reference",
    "linear",
    "linear_reference",
    "qkv_projection",
    "qkv_projection_reference",
    "use_triton",
]
