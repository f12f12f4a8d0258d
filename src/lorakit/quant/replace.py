"""Swap a model's Linear layers for frozen NF4 :class:`Linear4bit` layers, in place (QLoRA §3-4).

Embeddings, norms and every module named in ``skip_modules`` (by default the output head ``lm_head``) keep their
precision: the paper quantizes the linear layers of the transformer blocks only. A layer whose weight is shared
with another module (a tied output head) is never quantized, since that would untie it and save nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn as nn

from lorakit.layer_kinds import is_gpt2_conv1d
from lorakit.quant.linear4bit import Linear4bit

__all__ = ["dequantize_model", "quantize_model", "quantized_layers", "resolve_compute_dtype"]

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_compute_dtype(value: str | torch.dtype) -> torch.dtype:
    """``torch.bfloat16``/``"bf16"``/``"bfloat16"`` etc. to a torch dtype; raises for anything else."""
    if isinstance(value, torch.dtype) and value in _DTYPE_NAMES.values():
        return value
    if isinstance(value, str) and value.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.lower().removeprefix("torch.")]
    raise ValueError(f"Unknown compute dtype {value!r}; use one of 'bfloat16', 'float16', 'float32'.")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """True if one of ``patterns`` is a dotted sub-path of ``name`` ("lm_head", "down_proj", "layers.0.mlp")."""
    dotted = f".{name}."
    return any(f".{pattern.strip('.')}." in dotted for pattern in patterns)


def _shared_weights(model: nn.Module) -> set[int]:
    """``id`` of every parameter that more than one module holds (tied weights)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def _quantizable(module: nn.Module) -> bool:
    # nn.MultiheadAttention reads its out_proj.weight directly instead of calling it: leave that one alone.
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module)


def _to_4bit(module: nn.Module, compute_dtype: torch.dtype, blocksize: int) -> Linear4bit:
    if is_gpt2_conv1d(module):  # y = x W + b with W (in, out)
        return Linear4bit.from_weight(
            module.weight.T, module.bias, compute_dtype=compute_dtype, blocksize=blocksize
        )
    return Linear4bit.from_linear(module, compute_dtype=compute_dtype, blocksize=blocksize)


def quantize_model(
    model: nn.Module,
    *,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    skip_modules: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
) -> nn.Module:
    """Replace every ``nn.Linear`` (and transformers ``Conv1D``) in ``model`` by a frozen NF4 ``Linear4bit``.

    Args:
        model: any ``nn.Module``; modified in place and returned. Quantization runs on each layer's device.
        compute_dtype: dtype the 4-bit weights are decoded to for the matmuls (bf16 as in the paper; fp32 is
            faster on most CPUs). Also accepts "bf16", "float32", ...
        skip_modules: names kept in full precision; each matches as a dotted part of a module's name, so
            "lm_head" skips the output head and "mlp" every MLP projection.
        blocksize: weights per absmax block (64 in QLoRA).

    Layers already quantized are left as they are; a layer whose weight is shared with another module
    (tied embeddings) is skipped with a warning. Must run before LoRA adapters are added.
    ``model.lorakit_quantization`` records the settings.
    """
    compute_dtype = resolve_compute_dtype(compute_dtype)
    skip_modules = [skip_modules] if isinstance(skip_modules, str) else list(skip_modules)
    if any(hasattr(module, "base_layer") for module in model.modules()):
        raise ValueError(
            "The model already has LoRA layers; quantize the base model first, then call get_peft_model on it."
        )
    shared = _shared_weights(model)
    replaced = 0
    for name, module in list(model.named_modules()):
        if not name or not _quantizable(module) or _matches(name, skip_modules):
            continue
        if id(module.weight) in shared:
            logger.warning(
                "Not quantizing %s: its weight is shared with another module (tied weights).", name
            )
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _to_4bit(module, compute_dtype, blocksize))
        replaced += 1
    logger.info("Quantized %d linear layers to NF4 (compute dtype %s).", replaced, compute_dtype)
    model.lorakit_quantization = {
        "method": "nf4",
        "double_quant": True,
        "blocksize": blocksize,
        "absmax_blocksize": 256,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "skip_modules": skip_modules,
    }
    return model


def quantized_layers(model: nn.Module) -> dict[str, Linear4bit]:
    """Name -> layer for every :class:`Linear4bit` in ``model``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, Linear4bit)}


def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every ``Linear4bit`` by an ``nn.Linear`` holding its dequantized weight (default: compute dtype).

    The result is the quantized model's function in full-size layers (it does not recover the original weights).
    """
    dtype = None if dtype is None else resolve_compute_dtype(dtype)
    for name, layer in quantized_layers(model).items():
        if not name:
            raise ValueError("The model is itself a Linear4bit; call its to_linear() instead.")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.to_linear(dtype))
    if hasattr(model, "lorakit_quantization"):
        del model.lorakit_quantization
    return model
