"""HF-style ``Cls.from_pretrained(path, ...)`` on every vitriton model class."""

from __future__ import annotations

import os


class PretrainedMixin:
    config_class: type
    # Which tower of a full CLIP/SigLIP checkpoint this class holds ("vision", "text"), or None for the full model.
    tower: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs):
        """Loads this class from a local checkpoint directory; a full CLIP/SigLIP checkpoint gives its tower.

        Keyword arguments are those of :func:`vitriton.from_pretrained`.
        """
        from vitriton.loading import from_pretrained

        return from_pretrained(path, expect=cls, **kwargs)
