"""The four hot-path ops the encoders call, one submodule each: ``attention``, ``layernorm``, ``linear`` and
``qkv``. Each runs a Triton kernel on CUDA and an eager reference on CPU; import an op from its submodule
(``from vitriton.kernels.attention import attention``)."""

from vitriton.kernels._dispatch import eager_mode, interpreting, use_triton

__all__ = ["eager_mode", "interpreting", "use_triton"]
