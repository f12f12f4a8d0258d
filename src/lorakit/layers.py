"""Which LoRA layer wraps which module: PEFT's first-match dispatch, as one explicit table.

Each kind lives in its own module over the shared :class:`~lorakit.lora_layer.LoraLayer`:

=====================================================  ==============================================
base module                                            LoRA layer
=====================================================  ==============================================
GPT-2 ``Conv1D`` (weight stored (in, out))             :class:`~lorakit.linear_layer.Linear` (``fan_in_fan_out``)
``nn.Linear``, lorakit's 4-bit ``Linear4bit``          :class:`~lorakit.linear_layer.Linear`
``nn.Embedding``                                       :class:`~lorakit.embedding_layer.Embedding`
``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``          :mod:`lorakit.conv_layers`
``nn.MultiheadAttention``                              :class:`~lorakit.mha_layer.MultiheadAttention`
=====================================================  ==============================================

Variants (DoRA) are not layer types: they are per-adapter objects (:mod:`lorakit.variants`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

from lorakit.conv_layers import Conv1d, Conv2d, Conv3d
from lorakit.embedding_layer import Embedding
from lorakit.layer_kinds import Conv1D, is_gpt2_conv1d, is_quantized_linear, linear_features
from lorakit.linear_layer import Linear
from lorakit.lora_layer import LoraLayer
from lorakit.mha_layer import MultiheadAttention
from lorakit.variants import DoraMagnitude


def _linear(module: nn.Module, fan_in_fan_out: bool) -> LoraLayer:
    if fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out=True but the target is nn.Linear; using fan_in_fan_out=False.", stacklevel=4
        )
    return Linear(module, fan_in_fan_out=False)


#: (does this module match?, how to wrap it) -- the first match wins
DISPATCH: tuple[tuple[Callable[[nn.Module], bool], Callable[[nn.Module, bool], LoraLayer]], ...] = (
    (is_gpt2_conv1d, lambda module, _: Linear(module, fan_in_fan_out=True)),
    (lambda module: isinstance(module, nn.Linear), _linear),
    (is_quantized_linear, lambda module, _: Linear(module, fan_in_fan_out=False)),
    (lambda module: isinstance(module, nn.Embedding), lambda module, _: Embedding(module)),
    (lambda module: isinstance(module, nn.Conv1d), lambda module, _: Conv1d(module)),
    (lambda module: isinstance(module, nn.Conv2d), lambda module, _: Conv2d(module)),
    (lambda module: isinstance(module, nn.Conv3d), lambda module, _: Conv3d(module)),
    (lambda module: isinstance(module, nn.MultiheadAttention), lambda module, _: MultiheadAttention(module)),
)

UNSUPPORTED_HELP = (
    "supported: nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention and "
    "lorakit's 4-bit Linear"
)


def is_supported(module: nn.Module) -> bool:
    """Whether a LoRA layer can wrap ``module``."""
    return any(matches(module) for matches, _ in DISPATCH)


def make_lora_layer(module: nn.Module, fan_in_fan_out: bool = False) -> LoraLayer:
    """The LoRA layer for ``module``'s type (the first matching row of :data:`DISPATCH`); raises otherwise."""
    for matches, wrap in DISPATCH:
        if matches(module):
            return wrap(module, fan_in_fan_out)
    raise TypeError(
        f"{type(module).__name__} is not a layer LoRA can wrap; {UNSUPPORTED_HELP}. Target its Linear sub-layers "
        f"instead."
    )


__all__ = [
    "DISPATCH",
    "Conv1D",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "DoraMagnitude",
    "Embedding",
    "Linear",
    "LoraLayer",
    "MultiheadAttention",
    "is_quantized_linear",
    "is_supported",
    "linear_features",
    "make_lora_layer",
]
