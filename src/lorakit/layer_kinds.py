"""What kind of layer a module is, and its weight as a dense (out, in) tensor: the one place that knows.

Adapters wrap three linear-like kinds that compute ``y = x W^T + b`` with ``W`` (out x in):

* ``nn.Linear``;
* GPT-2's ``transformers.pytorch_utils.Conv1D``, which stores its weight transposed, (in, out)
  (PEFT's ``fan_in_fan_out``);
* a 4-bit Linear (lorakit's :class:`~lorakit.quant.Linear4bit`, or any packed layer with ``in_features``,
  ``out_features`` and a ``dequantize()`` giving the (out, in) weight).

and, for LoRA only, ``nn.Embedding``, ``nn.Conv1d/2d/3d`` and ``nn.MultiheadAttention``.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # GPT-2 style layer that stores its weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the core works without it
    Conv1D = None


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def is_quantized_linear(module: nn.Module) -> bool:
    """A 4-bit (or other packed) Linear: has in/out features and a ``dequantize()`` giving the (out, in) weight."""
    return all(hasattr(module, a) for a in ("in_features", "out_features", "dequantize"))


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, GPT-2 ``Conv1D`` or a 4-bit Linear: what ``target_modules="all-linear"`` selects."""
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module) or is_quantized_linear(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a linear-like layer."""
    if is_gpt2_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def output_size(module: nn.Module) -> int | None:
    """Size of the last dimension of ``module``'s output (linear-like or embedding), else None."""
    if is_linear_like(module):
        return linear_features(module)[1]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a tensor in its stored layout (dequantized for a 4-bit layer)."""
    if is_quantized_linear(module):
        return module.dequantize()
    return module.weight


def adapter_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device for adapter weights over ``module``: float32 over 16-bit or 4-bit bases (PEFT's upcast).

    A 4-bit layer's ``weight`` is a descriptor with dtype and device, so nothing is dequantized here.
    """
    weight = getattr(module, "weight", None)
    if weight is None:
        weight = dense_weight(module)
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    return dtype, weight.device
