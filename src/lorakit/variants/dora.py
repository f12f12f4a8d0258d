"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5) as a LoRA variant.

The adapted weight is split into magnitude and direction, ``W' = m * (W0 + s BA) / ||W0 + s BA||``, with the norm
taken per output row (per output channel for convolutions, per embedding dimension for embeddings), ``m``
trainable and initialised to that norm, and the norm detached from the graph (section 4.3). The forward is then

    h = (m / n - 1) * (W0 x) + (m / n) * s * B A x + bias,    n = ||W0 + s BA||_row  (no gradient)

for Linear and convolutions, and ``(m / n) * (E[x] + s (BA)^T[x])`` for embeddings, as PEFT computes them.
The magnitude is stored as ``lora_magnitude_vector.<adapter>.weight`` (shape (out,), or (1, out, 1, ...) for a
convolution) and saved as ``...lora_magnitude_vector`` (PEFT's file key, without ``.weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora_ops import lora_update_
from lorakit.variants.base import LoraVariant

MAGNITUDE = "lora_magnitude_vector"


class DoraMagnitude(nn.Module):
    """The DoRA magnitude ``m`` (one value per output row), a module so its key is ``...<adapter>.weight``."""

    def __init__(self, norm: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norm.detach().clone())


def make_dora_variant(layer) -> LoraVariant:
    """The DoRA variant for ``layer``'s kind; a clear error where DoRA is not defined."""
    kind = getattr(layer, "kind", None)
    if kind == "linear":
        return DoraLinear()
    if kind == "embedding":
        return DoraEmbedding()
    if kind == "conv":
        groups = layer.base_layer.groups
        if groups > 1:
            raise ValueError(
                f"DoRA is not supported on a {type(layer.base_layer).__name__} with groups={groups}: the update is "
                f"not a grouped kernel, so the weight norm DoRA divides by is not defined. Use plain LoRA here."
            )
        return DoraConv()
    raise ValueError(
        f"{type(layer.base_layer).__name__} does not support DoRA; set use_dora=False for this layer."
    )


class DoraVariant(LoraVariant):
    """What DoRA does the same way on every layer kind: the magnitude, the row norm, merging and unmerging."""

    name = "dora"
    label = "DoRA"
    containers = (MAGNITUDE,)

    def __init__(self) -> None:
        self._merge_factor: torch.Tensor | None = None  # m / ||W0 + dW|| at merge time, to unmerge exactly

    def magnitude_shape(self, layer, norm: torch.Tensor) -> torch.Tensor:
        return norm

    def init(self, layer, name: str) -> None:
        with torch.no_grad():
            norm = self.row_norm(layer, name, layer.base_weight().float())
        dtype = layer._adapter_dtype_device()[0]
        layer.lora_magnitude_vector[name] = DoraMagnitude(self.magnitude_shape(layer, norm).to(dtype))

    def magnitude(self, layer, name: str) -> torch.Tensor:
        """``m`` as a flat (out,) vector (a conv's is stored (1, out, 1, ...))."""
        return layer.lora_magnitude_vector[name].weight.reshape(-1)

    def row_norm(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``||W0 + s BA||`` per output row, in float32."""
        combined = layer._to_rows(weight.float()) + layer._to_rows(layer.delta_weight(name).float())
        return torch.linalg.norm(combined, dim=1)

    def merged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        combined = layer._to_rows(weight.float()) + layer._to_rows(layer.delta_weight(name).float())
        factor = self.magnitude(layer, name).detach().float() / torch.linalg.norm(combined, dim=1)
        self._merge_factor = factor
        return layer._from_rows(combined * factor[:, None], weight).to(weight.dtype)

    def unmerged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = layer.delta_weight(name).float()
        rows = layer._to_rows(weight.float()) / self._merge_factor[:, None] - layer._to_rows(delta)
        self._merge_factor = None
        return layer._from_rows(rows, weight).to(weight.dtype)

    def state_keys(self, layer, name: str) -> dict[str, str]:
        return {MAGNITUDE: f"{MAGNITUDE}.{name}.weight"}

    def _scale(self, layer, name: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``m / n`` per output row, the norm without gradient."""
        with torch.no_grad():
            norm = self.row_norm(layer, name, weight).to(dtype)
        return self.magnitude(layer, name) / norm


class DoraLinear(DoraVariant):
    """DoRA over ``nn.Linear``, GPT-2 ``Conv1D`` and 4-bit Linear layers."""

    def forward(self, layer, name, x, result):
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        dropout = layer.lora_dropout[name]
        weight = layer.base_weight()
        bias = getattr(layer.base_layer, "bias", None)
        if isinstance(dropout, nn.Identity) or not layer.training:
            # undropped: the base output is known. (m/n - 1) W0 x + (m/n) s B A x = (m/n) W0 x - W0 x + ...,
            # so the result becomes (m/n) (result - bias) + bias, and the update goes through the fused
            # low-rank kernel with B scaled row-wise by m/n (m gets its gradient through both terms).
            scale = self._scale(layer, name, weight.to(lora_A.weight.dtype), lora_A.weight.dtype)
            base_out = result if bias is None else result - bias.to(result.dtype)
            scaled = base_out * scale.to(result.dtype)
            if bias is not None:
                scaled = scaled + bias.to(result.dtype)
            return lora_update_(scaled, x, lora_A.weight, scale[:, None] * lora_B.weight, layer.scaling[name])
        # dropout changed x: the base output must be computed again for the dropped input, without bias
        x_adapter = dropout(x.to(lora_A.weight.dtype))
        weight = weight.to(x_adapter.dtype)
        scale = self._scale(layer, name, weight, x_adapter.dtype)
        base_out = F.linear(x_adapter, layer._to_rows(weight))
        lora_out = lora_B(lora_A(x_adapter)) * layer.scaling[name]
        update = (scale - 1) * base_out + scale * lora_out
        return result + update.to(result.dtype)


class DoraEmbedding(DoraVariant):
    """DoRA over ``nn.Embedding``: rows are embedding dimensions, ``h = (m / n) (E[x] + s (BA)^T[x])``."""

    def forward(self, layer, name, x, result):
        update = layer.embedding_update(name, x)
        with torch.no_grad():
            norm = self.row_norm(layer, name, layer.base_layer.weight)
        scale = (self.magnitude(layer, name) / norm).to(result.dtype)
        return scale * result + scale * update.to(result.dtype)


class DoraConv(DoraVariant):
    """DoRA over ``nn.Conv1d/2d/3d`` (groups = 1): one magnitude per output channel, stored (1, out, 1, ...)."""

    def magnitude_shape(self, layer, norm):
        return norm.reshape(1, -1, *(1,) * layer.kernel_dims)  # PEFT's shape, also the shape in its files

    def forward(self, layer, name, x, result):
        base = layer.base_layer
        dropout = layer.lora_dropout[name]
        x_adapter = dropout(x.to(layer.lora_A[name].weight.dtype))
        weight = base.weight.to(x_adapter.dtype)
        scale = layer._per_channel(self._scale(layer, name, weight, x_adapter.dtype))
        if isinstance(dropout, nn.Identity) or not layer.training:
            base_out = result.to(x_adapter.dtype)
            if base.bias is not None:
                base_out = base_out - layer._per_channel(base.bias.to(x_adapter.dtype))
        else:  # dropout changed x: the base output for the dropped input, without bias
            base_out = base._conv_forward(x_adapter, weight, None)
        lora_out = layer.lora_B[name](layer.lora_A[name](x_adapter)) * layer.scaling[name]
        update = (scale - 1) * base_out + scale * lora_out
        return result + update.to(result.dtype)
