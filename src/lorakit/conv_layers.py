"""LoRA over ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``: one implementation for every kernel dimension.

The adapter is two convolutions applied in turn (LoRA, Hu et al. 2021, carried over to convolutions as in PEFT)::

    h = conv(x; W0) + scaling * B(A(dropout(x)))

``A`` maps ``in -> r`` with the base layer's kernel size, stride, padding, dilation and padding mode; ``B`` maps
``r -> out`` with a 1x1(x1) kernel and the base layer's ``groups``. With ``groups = 1`` the two compose into one
kernel, ``dW[o, i, k...] = scaling * sum_j B[o, j] A[j, i, k...]``, which merging adds to ``W0``.

With ``groups = g > 1`` (PEFT's behaviour): ``A`` is an ordinary conv over all input channels and ``B`` a grouped
1x1 conv, so ``r`` must be divisible by ``g``. The update mixes channels across groups, which a grouped kernel cannot
hold: it trains and runs, but it cannot be merged (``merge`` raises ``NotImplementedError``).

DoRA (Liu et al. 2024, eq. 5; PEFT's ``DoraConv*dLayer``): one magnitude per output channel, stored with shape
``(1, out, 1, ...)`` as in PEFT's files, and the norm of ``W0 + dW`` taken over all other dimensions, detached from
the graph (section 4.3)::

    h = (m / n - 1) * conv(x; W0) + (m / n) * scaling * B(A(x)) + bias,    n = ||W0 + dW||  per output channel

Where lorakit differs from PEFT 0.21.2 (weights and files are the same): ``A`` also copies the base's dilation and
padding mode, so a dilated conv works (PEFT's forward fails with a shape mismatch) and a ``padding_mode="reflect"``
conv gives the same output merged and unmerged (PEFT's unmerged adapter zero-pads). DoRA on a grouped conv is
refused: PEFT computes that norm from a wrongly shaped product of ``B`` and ``A``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.lora_layer import LoraLayer, init_factors


class _ConvNd(LoraLayer):
    """LoRA over a convolution of any kernel dimension (PEFT's ``_ConvNd``); subclasses fix ``conv_type``."""

    kind = "conv"
    conv_type: type[nn.Module] = nn.Conv2d

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, self.conv_type):
            raise TypeError(
                f"{type(self).__name__} wraps an {self.conv_type.__name__}, got {type(base_layer).__name__}."
            )
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.kernel_dims = base_layer.weight.dim() - 2
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        if base_layer.groups > 1:
            warnings.warn(
                f"LoRA adapter on a {type(base_layer).__name__} with groups={base_layer.groups}: it trains and "
                f"runs, but merging is not supported.",
                stacklevel=3,
            )

    def update_layer(
        self, name, r, lora_alpha, lora_dropout=0.0, init=True, use_rslora=False, use_dora=False, **options
    ):
        groups = self.base_layer.groups
        if r % groups != 0:
            raise ValueError(
                f"Targeting a {type(self.base_layer).__name__} with groups={groups} and rank {r}: the rank must be "
                f"divisible by groups (lora_B is a grouped conv). Choose another rank (rank_pattern can set it for "
                f"this layer) or do not target this layer."
            )
        super().update_layer(name, r, lora_alpha, lora_dropout, init, use_rslora, use_dora, **options)

    def _create_weights(self, name, r, dtype, device):
        base = self.base_layer
        ones = (1,) * self.kernel_dims
        self.lora_A[name] = self.conv_type(
            self.in_features,
            r,
            kernel_size=base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            padding_mode=base.padding_mode,
            bias=False,
            dtype=dtype,
            device=device,
        )
        self.lora_B[name] = self.conv_type(
            r,
            self.out_features,
            kernel_size=ones,
            stride=ones,
            groups=base.groups,
            bias=False,
            dtype=dtype,
            device=device,
        )

    def _init_weights(self, name, init, options=None):
        if init == "loftq":
            raise ValueError(
                f"LoftQ initialises Linear layers (it quantizes their weights); this target is a "
                f"{type(self.base_layer).__name__}. Leave it out of target_modules, or use init_lora_weights=True."
            )
        # PiSSA and OLoRA are defined for Linear layers; convolutions keep the default init, as in PEFT
        init_factors(self.lora_A[name].weight, self.lora_B[name].weight, init, self.r[name])

    def delta_weight(self, name):
        """``scaling * B A`` as a kernel of the base weight's shape (out, in, k...); groups = 1 only."""
        if self.base_layer.groups > 1:
            raise NotImplementedError(
                f"A LoRA update on a conv with groups={self.base_layer.groups} is not a grouped kernel: it has no "
                f"delta weight, and merging is not supported."
            )
        # A: (r, in, k...), B: (out, r, 1...); their product (out, in * prod(k)) is the kernel, flattened
        delta = self.lora_B[name].weight.flatten(1) @ self.lora_A[name].weight.flatten(1)
        return delta.reshape(self.base_layer.weight.shape) * self.scaling[name]

    def _to_rows(self, weight):
        return weight.reshape(weight.shape[0], -1)

    def _from_rows(self, rows, like):
        return rows.reshape(like.shape)

    def _per_channel(self, values: torch.Tensor) -> torch.Tensor:
        """(out,) values viewed to broadcast over a conv output, batched (N, out, ...) or not (out, ...)."""
        return values.reshape(-1, *(1,) * self.kernel_dims)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if self.base_layer.groups > 1:
            raise NotImplementedError(
                f"Merging is not supported for LoRA on conv layers with groups > 1 (this one has groups="
                f"{self.base_layer.groups}): the update mixes channels across groups, which the grouped base "
                f"kernel cannot hold. Keep the adapter unmerged, or use unload() to drop it."
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def lora_update(self, name, x, result):
        lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        update = lora_B(lora_A(dropout(x.to(lora_A.weight.dtype)))) * self.scaling[name]
        return result + update.to(result.dtype)


class Conv1d(_ConvNd):
    """LoRA over ``nn.Conv1d`` (A: kernel k, B: kernel 1)."""

    conv_type = nn.Conv1d


class Conv2d(_ConvNd):
    """LoRA over ``nn.Conv2d`` (A: kernel kh x kw, B: 1x1)."""

    conv_type = nn.Conv2d


class Conv3d(_ConvNd):
    """LoRA over ``nn.Conv3d`` (A: kernel kd x kh x kw, B: 1x1x1)."""

    conv_type = nn.Conv3d


CONV_LAYERS: dict[type[nn.Module], type[_ConvNd]] = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
