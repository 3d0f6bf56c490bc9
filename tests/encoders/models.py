"""Small random transformers CLIP/SigLIP models saved as checkpoints, shared by the encoder and parallel tests.

Sizes are odd on purpose: head_dim 72 (vision) and 80 (text), 26 and 25 vision tokens, 11 text tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

CLIP_VISION = dict(
    hidden_size=144, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2, image_size=40, patch_size=8
)
CLIP_TEXT = dict(
    hidden_size=160,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=99,
    max_position_embeddings=16,
    eos_token_id=98,
    bos_token_id=97,
    pad_token_id=0,
)
SIGLIP_VISION = dict(
    hidden_size=144, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2, image_size=35, patch_size=7
)
SIGLIP_TEXT = dict(
    hidden_size=160,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=99,
    max_position_embeddings=16,
    projection_size=144,
    eos_token_id=98,
    bos_token_id=97,
    pad_token_id=0,
)


def perturb_vectors(model: torch.nn.Module) -> torch.nn.Module:
    """transformers initialises biases to 0 and LayerNorms to (1, 0), which hides bugs in how they are applied (a
    row-parallel bias added on every rank leaves such a model's outputs unchanged); random offsets expose them."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and "logit" not in name:
                parameter.add_(torch.randn_like(parameter), alpha=0.05)
    return model


def clip_model(**text_overrides) -> CLIPModel:
    torch.manual_seed(0)
    config = CLIPConfig(text_config={**CLIP_TEXT, **text_overrides}, vision_config=CLIP_VISION, projection_dim=48)
    return perturb_vectors(CLIPModel(config).eval())


def siglip_model() -> SiglipModel:
    torch.manual_seed(1)
    config = SiglipConfig(text_config=SIGLIP_TEXT, vision_config=SIGLIP_VISION)
    model = perturb_vectors(SiglipModel(config).eval())
    with torch.no_grad():  # transformers initialises these to zero; random values exercise the logits formula
        model.logit_scale.fill_(1.3)
        model.logit_bias.fill_(-0.7)
    return model


def save(model: torch.nn.Module, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def pixels(batch: int, size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def text(batch: int, seq: int, vocab: int = 99, eos: int = 98, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ending in eos, with their attention mask; row lengths differ."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 3, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        length = seq - (row * 3) % (seq - 2)
        ids[row, length - 1] = eos
        ids[row, length:] = 0
        mask[row, length:] = 0
    return ids, mask
