"""Base models for fine-tuning: the embedded SmolLM2-135M-Instruct (GGUF, cached as safetensors), local folders,
``.gguf`` files and Hugging Face Hub ids. See docs/data.md ("Models")."""

from lorakit.models.embedded import DEFAULT_MODEL, embedded_gguf_path, is_default_model
from lorakit.models.errors import ModelLoadError, ModelNotFoundError
from lorakit.models.gguf_cache import cache_root, convert_gguf, ensure_converted, load_gguf
from lorakit.models.loading import ModelSource, load_model, load_tokenizer, model_folder, resolve_source

__all__ = [
    "DEFAULT_MODEL",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelSource",
    "cache_root",
    "convert_gguf",
    "embedded_gguf_path",
    "ensure_converted",
    "is_default_model",
    "load_gguf",
    "load_model",
    "load_tokenizer",
    "model_folder",
    "resolve_source",
]
