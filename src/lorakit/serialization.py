"""Adapter weights on disk, in PEFT's format: ``adapter_model.safetensors`` with PEFT's key names.

A parameter ``base_model.model.<path>.lora_A.<adapter>.weight`` of the wrapped model is saved as
``base_model.model.<path>.lora_A.weight`` (adapter name dropped); a DoRA magnitude
``...lora_magnitude_vector.<adapter>.weight`` as ``...lora_magnitude_vector``; a trained copy
``<path>.modules_to_save.<adapter>.<rest>`` under the original name ``<path>.<rest>``.
Loading is strict: every key the model expects must be in the file with the same shape, and no other key may be,
so a mismatched adapter fails loudly instead of silently loading nothing. Only safetensors is read unless the
caller explicitly allows a legacy ``.bin`` file, which is then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.modules_to_save import ModulesToSaveWrapper
from lorakit.tuner_layer import BaseTunerLayer

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def adapter_key_map(model: torch.nn.Module, adapter_name: str, bias: str = "none") -> dict[str, str]:
    """Map file key -> model state-dict key for everything adapter ``adapter_name`` saves.

    Each adapter layer says which of its tensors the adapter has and under which file keys
    (:meth:`~lorakit.tuner_layer.BaseTunerLayer.adapter_state_keys`); a ``modules_to_save`` copy is saved under
    the original module's names. ``bias`` adds the biases the adapter trains (``"all"`` or ``"lora_only"``).
    """
    mapping: dict[str, str] = {}
    adapted = set()
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, BaseTunerLayer):
            keys = module.adapter_state_keys(adapter_name)
            mapping.update({prefix + file_key: prefix + key for file_key, key in keys.items()})
            if keys:
                adapted.add(path)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            copy = module.modules_to_save[adapter_name]
            for rest in copy.state_dict():
                mapping[f"{prefix}{rest}"] = f"{prefix}modules_to_save.{adapter_name}.{rest}"
    if bias in ("all", "lora_only"):
        internal = set(adapter_state_keys(model))
        for key in model.state_dict():
            if not key.endswith("bias") or key in internal:
                continue
            owner = key[: -len(".base_layer.bias")] if key.endswith(".base_layer.bias") else None
            if bias == "all" or owner in adapted:
                mapping[key] = key
    return mapping


def adapter_state_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of every adapter's tensors and trained copies (and the frozen originals of those copies)."""
    keys = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_names:
                keys.extend(prefix + key for key in module.adapter_state_keys(name).values())
        elif isinstance(module, ModulesToSaveWrapper):
            keys.extend(f"{prefix}{key}" for key in module.state_dict())
    return keys


def embedding_state_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the input and output embeddings' base weights (PEFT's ``save_embedding_layers``)."""
    getters = [getattr(model, name, None) for name in ("get_input_embeddings", "get_output_embeddings")]
    layers = [getter() for getter in getters if callable(getter)]
    wanted = {id(getattr(layer, "base_layer", layer)) for layer in layers if layer is not None}
    prefixes = [f"{name}." for name, module in model.named_modules() if id(module) in wanted and name]
    internal = set(adapter_state_keys(model))
    return [
        key for key in model.state_dict() if any(key.startswith(p) for p in prefixes) and key not in internal
    ]


def save_adapter_weights(tensors: dict[str, torch.Tensor], directory: str | os.PathLike) -> Path:
    """Write ``adapter_model.safetensors`` atomically (temporary file in the same folder, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WEIGHTS_NAME
    contiguous = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    handle, tmp = tempfile.mkstemp(prefix=".adapter_model.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        save_file(contiguous, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_adapter_weights(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the adapter tensors of a folder; refuses pickle unless ``allow_pickle`` (then weights-only)."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"{path} is corrupt or truncated ({error}). Save the adapter again or re-download it."
            ) from None
    pickle_path = directory / PICKLE_WEIGHTS_NAME
    if pickle_path.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{directory} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which can run arbitrary code when "
                f"loaded. lorakit reads adapter weights from {WEIGHTS_NAME} only. If you trust the file, pass "
                f"allow_pickle=True (it is then read with torch.load(weights_only=True)), or convert it to "
                f"safetensors."
            )
        try:
            return torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises several types for unsafe or broken pickles
            raise ValueError(f"{pickle_path} could not be read as plain tensors: {error}") from None
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise FileNotFoundError(
        f"No {WEIGHTS_NAME} in {directory} (files there: {present or 'none'}); is this an adapter folder?"
    )


def load_into_model(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    adapter_name: str,
    bias: str = "none",
    source: str = "the adapter file",
) -> None:
    """Copy ``tensors`` (file keys) into adapter ``adapter_name`` of ``model``, strictly."""
    mapping = adapter_key_map(model, adapter_name, bias)
    state = model.state_dict()
    embeddings = None
    for saved_key in tensors:
        # PEFT also saves the full base embedding when an embedding is adapted (save_embedding_layers="auto"),
        # and both libraries save the input / output embeddings with save_embedding_layers=True.
        if saved_key in mapping or saved_key not in state:
            continue
        if embeddings is None:
            embeddings = set(embedding_state_keys(model))
        if saved_key.endswith(".base_layer.weight") or saved_key in embeddings:
            mapping = {**mapping, saved_key: saved_key}
    for saved_key, tensor in tensors.items():
        if saved_key not in mapping:
            example = next(iter(mapping), "(none)")
            raise ValueError(
                f"{source} has key {saved_key!r}, which matches no adapted module of this model "
                f"(the model expects keys like {example!r}). The adapter was made for a different model "
                f"or with different target_modules."
            )
        target = state[mapping[saved_key]]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"Shape mismatch for {saved_key!r}: {source} has {tuple(tensor.shape)} but the model expects "
                f"{tuple(target.shape)}. The adapter was trained on a base model of another size (or rank)."
            )
    missing = [k for k in mapping if k not in tensors and not k.endswith(".base_layer.weight")]
    if missing:
        raise ValueError(
            f"{source} lacks {len(missing)} tensor(s) the model expects, first {missing[0]!r}. "
            f"The file is incomplete or was written for another configuration."
        )
    with torch.no_grad():
        for saved_key, tensor in tensors.items():
            target = state[mapping[saved_key]]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
