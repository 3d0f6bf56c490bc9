"""vitriton: Triton-accelerated, tensor-parallel CLIP and SigLIP encoders that load Hugging Face checkpoints."""

from vitriton.encoders import *  # noqa: F403
from vitriton.encoders import __all__ as _encoders
from vitriton.graphs import CUDAGraphRunner, enable_cuda_graphs
from vitriton.kernels import eager_mode
from vitriton.loading import from_pretrained, from_transformers
from vitriton.parallel import CheckpointError, Weights, init_distributed
from vitriton.patching import patch

__version__ = "0.1.0"

__all__ = [
    *_encoders,
    "CUDAGraphRunner",
    "CheckpointError",
    "Weights",
    "eager_mode",
    "enable_cuda_graphs",
    "from_pretrained",
    "from_transformers",
    "init_distributed",
    "patch",
]
