"""Errors raised while locating or loading a base model."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A path that should hold a model (folder or ``.gguf`` file) does not exist."""
