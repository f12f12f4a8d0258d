"""The base model an adapter is exported against: its llama.cpp architecture, tensor names and row layout.

llama.cpp names tensors by architecture (``blk.0.attn_q.weight`` for ``model.layers.0.self_attn.q_proj``);
gguf's :class:`~gguf.tensor_mapping.TensorNameMap` maps Hugging Face module names to them. Tensors keep the
Hugging Face (out, in) orientation (GGUF lists dimensions reversed: ``ne = [in, out]``), with one exception for
the ``llama`` architecture: llama.cpp's ``convert_hf_to_gguf.py`` stores ``attn_q`` / ``attn_k`` with the rows of
each head reordered for its rotary embedding (:func:`permute_rows`; transformers undoes it when it loads a GGUF),
so a row-space update (LoRA's ``B``, a merged delta, DoRA's magnitude) is reordered the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.export.errors import ExportError

# llama.cpp architecture -> whether attn_q / attn_k rows are permuted in the GGUF (convert_hf_to_gguf.py's
# LlamaModel.permute). Only these are exported: their linear weights need no other transformation.
ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}
# Hugging Face config model_type -> llama.cpp architecture (convert_hf_to_gguf.py converts Mistral as llama).
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass
class ExportBase:
    """What the export needs to know about the base model."""

    name: str  # as given (a path or a Hub id), for messages
    arch: str  # llama.cpp architecture name, e.g. "llama"
    n_head: int
    n_head_kv: int
    block_count: int
    tied_embeddings: bool  # no separate output.weight: the output head is token_embd
    gguf_path: Path | None = None  # the base GGUF file; None for a Hugging Face model
    shapes: dict[str, tuple[int, ...]] = field(
        default_factory=dict
    )  # GGUF tensor -> (out, in) (GGUF base only)
    _name_map: Any = None

    def tensor_name(self, module: str) -> str | None:
        """The GGUF weight tensor of a Hugging Face module path (``None`` when the architecture has none)."""
        import gguf

        if self._name_map is None:
            arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == self.arch)
            self._name_map = gguf.get_tensor_name_map(arch, self.block_count)
        mapped = self._name_map.get_name(module)
        return None if mapped is None else f"{mapped}.weight"

    def permute_heads(self, tensor_name: str) -> int | None:
        """The head count by which ``tensor_name``'s rows are permuted in the GGUF, or ``None``."""
        if not ARCHITECTURES[self.arch]:
            return None
        if tensor_name.endswith("attn_q.weight"):
            return self.n_head
        if tensor_name.endswith("attn_k.weight"):
            return self.n_head_kv
        return None


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face row order -> GGUF row order of a llama ``q_proj`` / ``k_proj`` (rows: axis 0).

    Within each head, llama.cpp interleaves the two halves of the rotary dimensions: row ``h * d + j * d/2 + i``
    (``d`` = head dim, ``j`` in {0, 1}, ``i < d/2``) goes to ``h * d + 2 i + j``.
    """
    head_dim = rows.shape[0] // n_head
    return rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_rows`: GGUF row order -> Hugging Face row order."""
    head_dim = rows.shape[0] // n_head
    return rows.reshape(n_head, head_dim // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def resolve_base(model: str | None, adapter_base: str | None) -> ExportBase:
    """``--model`` if given, else the adapter's recorded base, else the embedded SmolLM2 (a GGUF file)."""
    from lorakit.models.loading import resolve_source

    name = model or adapter_base
    source = resolve_source(name)
    if source.gguf_path is not None:
        return read_gguf_base(source.gguf_path, name or "smollm2")
    return read_hf_base(source.location, name or source.location)


def _field(reader, key: str, default: Any = None) -> Any:
    field_ = reader.fields.get(key)
    return default if field_ is None else field_.contents()


def _scalar(value: Any, key: str) -> int:
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise ExportError(
                f"the base GGUF's {key} differs per layer ({value}); such bases are not supported."
            )
        value = value[0]
    return int(value)


def read_gguf_base(path: Path, name: str) -> ExportBase:
    """Architecture, head counts and tensor shapes from a base GGUF file's metadata."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as error:
        raise ExportError(f"Could not read the base GGUF file {path}: {error}") from error
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    _check_arch(arch, f"the base GGUF {path}")
    n_head = _scalar(_field(reader, f"{arch}.attention.head_count"), "head_count")
    n_head_kv = _scalar(_field(reader, f"{arch}.attention.head_count_kv", n_head), "head_count_kv")
    shapes = {tensor.name: tuple(int(n) for n in reversed(tensor.shape)) for tensor in reader.tensors}
    return ExportBase(
        name=name,
        arch=arch,
        n_head=n_head,
        n_head_kv=n_head_kv,
        block_count=_scalar(_field(reader, f"{arch}.block_count"), "block_count"),
        tied_embeddings="output.weight" not in shapes,
        gguf_path=Path(path),
        shapes=shapes,
    )


def read_hf_base(location: str, name: str) -> ExportBase:
    """Architecture and head counts from a Hugging Face model's ``config.json`` (a folder or a Hub id)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(
            f"Could not read the config of the base model {name!r} ({error}). Pass the base with --model (a "
            "folder with config.json, or its .gguf file)."
        ) from error
    model_type = getattr(config, "model_type", None)
    arch = MODEL_TYPES.get(model_type)
    if arch is None:
        _check_arch(model_type, f"the base model {name!r} (model_type {model_type!r})")
    n_head = int(config.num_attention_heads)
    return ExportBase(
        name=name,
        arch=arch,
        n_head=n_head,
        n_head_kv=int(getattr(config, "num_key_value_heads", None) or n_head),
        block_count=int(config.num_hidden_layers),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def _check_arch(arch: Any, where: str) -> None:
    if arch not in ARCHITECTURES:
        raise ExportError(
            f"{where} has the architecture {arch!r}; lorakit exports GGUF files for "
            f"{', '.join(sorted(ARCHITECTURES))} models (Hugging Face model types "
            f"{', '.join(sorted(MODEL_TYPES))}), whose tensors llama.cpp converts without other rearrangement."
        )
