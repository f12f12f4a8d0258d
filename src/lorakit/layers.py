"""LoRA layers: each wraps the original module as ``base_layer`` and holds its adapters by name.

For a base weight ``W0`` (out x in) a LoRA adapter adds a rank-r update (Hu et al. 2021, eq. 3)::

    h = W0 x + scaling * B A dropout(x),    A: r x in (kaiming-uniform),  B: out x r (zero)

so the wrapped model starts exactly at the base model. With DoRA (Liu et al. 2024, eq. 5) the adapted weight is
``W' = m * (W0 + s BA) / ||W0 + s BA||`` with the norm per output row, ``m`` trainable and initialised to
``||W0||``, and the norm detached from the graph (section 4.3), which gives the forward

    h = (m / n - 1) * (W0 x) + (m / n) * s * B A x + bias,    n = ||W0 + s BA||_row  (no gradient)

Parameter names (``lora_A.<adapter>.weight``, ``lora_embedding_A.<adapter>``, ``lora_magnitude_vector.<adapter>.weight``)
are PEFT's, so state dicts convert to PEFT's files by dropping the adapter name. The convolution layers live in
:mod:`lorakit.conv_layers` and the ``nn.MultiheadAttention`` layer in :mod:`lorakit.mha_layer`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora_ops import lora_update_, mixed_batch_update_, stack_adapters

try:  # GPT-2 style layer that stores its weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the core works without it
    Conv1D = None

# Names of the sub-modules that hold adapter weights; everything else in a LoraLayer is the frozen base.
ADAPTER_ATTRIBUTES = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "lora_E",  # AdaLoRA singular values (lorakit.adalora)
    "adapter_down",
    "adapter_up",  # bottleneck Adapter projections (lorakit.adapter)
)


class DoraMagnitude(nn.Module):
    """The DoRA magnitude ``m`` (one value per output row), a module so its key is ``...<adapter>.weight``."""

    def __init__(self, norm: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norm.detach().clone())


class LoraLayer(nn.Module):
    """Common state of a wrapped layer: adapters by name, which are active, which are merged."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._dora_merge_factor: dict[str, torch.Tensor] = {}
        # Set for the duration of one forward by PeftModel(..., adapter_names=[...]): the adapter of each row.
        self.row_adapters: tuple[str, ...] | None = None

    # ----------------------------------------------------------------------------------- subclass interface
    def _create_weights(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def _init_weights(self, name: str, init: bool | str) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B A`` in the layout of the base weight."""
        raise NotImplementedError

    def _to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """View a base-layout weight as (out, rest) so that row norms are per output feature."""
        return weight

    def _from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows

    # -------------------------------------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """PEFT's ``BaseTunerLayer.adapter_layer_names``: this layer's containers of adapter weights."""
        return tuple(name for name in ADAPTER_ATTRIBUTES if isinstance(getattr(self, name, None), nn.Module))

    @property
    def other_param_names(self) -> tuple[str, ...]:
        """PEFT's ``other_param_names``: per-adapter attributes that are not weights (dicts keyed by adapter)."""
        names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "ranknum")
        return tuple(name for name in names if hasattr(self, name))

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as a tensor (dequantized for 4-bit base layers)."""
        base = self.base_layer
        if hasattr(base, "dequantize"):
            return base.dequantize()
        return base.weight

    def _adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        # A 4-bit layer's ``weight`` is a descriptor with dtype and device: no need to dequantize here.
        weight = getattr(self.base_layer, "weight", None)
        if weight is None:
            weight = self.base_weight()
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        return dtype, weight.device

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init: bool | str,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``name`` of rank ``r``; scaling = alpha/r, or alpha/sqrt(r) with rsLoRA."""
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}.")
        if name in self.r:
            raise ValueError(
                f"Adapter {name!r} already exists on this layer; delete it first or pick a new name."
            )
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout[name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        dtype, device = self._adapter_dtype_device()
        self._create_weights(name, r, dtype, device)
        self._init_weights(name, init)
        self.use_dora[name] = use_dora
        if use_dora:
            self._create_dora_magnitude(name)
        if not self.active_adapters:
            self.active_adapters = [name]

    def _create_dora_magnitude(self, name: str) -> None:
        with torch.no_grad():
            norm = self._dora_row_norm(name, self.base_weight().float())
        self.lora_magnitude_vector[name] = DoraMagnitude(norm.to(self._adapter_dtype_device()[0]))

    def _dora_row_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``||W0 + s BA||`` per output row, in float32."""
        combined = self._to_rows(weight.float()) + self._to_rows(self.delta_weight(name).float())
        return torch.linalg.norm(combined, dim=1)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"Adapter {name!r} is merged into the base weights; unmerge it before deleting.")
        for attribute in (*ADAPTER_ATTRIBUTES, "lora_dropout"):
            container = getattr(self, attribute, None)
            if container is not None and name in container:
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_dora):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` active; only active adapters' weights require grad."""
        names = [names] if isinstance(names, str) else list(names)
        for attribute in ADAPTER_ATTRIBUTES:
            container = getattr(self, attribute, None)
            if container is None:
                continue
            for key in container:
                item = container[key]
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                for param in params:
                    param.requires_grad_(key in names)
        self.active_adapters = names

    # --------------------------------------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold ``W0 <- W0 + s BA`` (DoRA: ``W0 <- m/||W0 + s BA|| * (W0 + s BA)``) into the base weight."""
        if hasattr(self.base_layer, "dequantize"):
            raise ValueError(
                "Cannot merge into a 4-bit base layer in place (re-quantizing would lose the update); "
                "use merge_and_unload(), which returns the dequantized model with the update added."
            )
        for name in adapter_names or self.active_adapters:
            if name not in self.r:
                continue
            if name in self.merged_adapters:
                warnings.warn(f"Adapter {name!r} is already merged; not merging it twice.", stacklevel=3)
                continue
            weight = self.base_layer.weight
            merged = self.merged_weight(name, weight.data)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging adapter {name!r} gives NaN or inf weights; the adapter is broken.")
            weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with adapter ``name`` added (does not modify ``weight``)."""
        delta = self.delta_weight(name)
        if not self.use_dora.get(name):
            return (weight.float() + delta.float()).to(weight.dtype)
        combined = self._to_rows(weight.float()) + self._to_rows(delta.float())
        # flattened: a conv's magnitude is stored (1, out, 1, ...)
        magnitude = self.lora_magnitude_vector[name].weight.detach().float().reshape(-1)
        factor = magnitude / torch.linalg.norm(combined, dim=1)
        self._dora_merge_factor[name] = factor
        return self._from_rows(combined * factor[:, None], weight).to(weight.dtype)

    def unmerge(self) -> None:
        """Subtract merged adapters again, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_layer.weight
            delta = self.delta_weight(name).float()
            if self.use_dora.get(name):
                factor = self._dora_merge_factor.pop(name)
                rows = self._to_rows(weight.data.float()) / factor[:, None] - self._to_rows(delta)
                restored = self._from_rows(rows, weight.data)
            else:
                restored = weight.data.float() - delta
            weight.data.copy_(restored.to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output, plus the active adapters' updates unless disabled or already merged."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        return self._add_adapters(x, result)

    def _add_adapters(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the base output for input ``x``) plus the updates of the active adapters."""
        raise NotImplementedError

    def _adapters_to_run(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.r]

    def _check_mixed_batch(self, x: torch.Tensor) -> None:
        if self.training:
            raise ValueError(
                "adapter_names (one adapter per batch row) is for inference; call model.eval() first."
            )
        if len(self.row_adapters) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(self.row_adapters)} entries but the batch has {x.shape[0]} rows; "
                f"give one adapter name (or '__base__') per row."
            )
        if any(self.use_dora.get(n) for n in self.row_adapters):
            raise ValueError("Mixed-adapter batches are not supported with DoRA adapters.")

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear, a 4-bit Linear or a GPT-2 ``Conv1D`` (whose weight is stored (in, out))."""
    if Conv1D is not None and isinstance(layer, Conv1D):
        return tuple(layer.weight.shape)
    return layer.in_features, layer.out_features


class Linear(LoraLayer):
    """LoRA over ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored (in, out): ``fan_in_fan_out``) or a 4-bit Linear."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_weights(self, name, r, dtype, device):
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)

    def _init_weights(self, name, init):
        if init is False:
            return  # nn.Linear's own random init for both: a non-zero update, for tests of merging
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)

    def delta_weight(self, name):
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _to_rows(self, weight):
        return weight.T if self.fan_in_fan_out else weight

    def _from_rows(self, rows, like):
        return rows.T if self.fan_in_fan_out else rows

    def _add_adapters(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_batch_forward(x, result)
        for name in self._adapters_to_run():
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dropout = self.lora_dropout[name]
            if self.use_dora.get(name):
                x_adapter = dropout(x.to(lora_A.weight.dtype))
                undropped = isinstance(dropout, nn.Identity) or not self.training
                update = self._dora_update(name, x_adapter, result if undropped else None)
                result = result + update.to(result.dtype)
            else:
                p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
                result = lora_update_(
                    result, x, lora_A.weight, lora_B.weight, self.scaling[name], p, self.training
                )
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        self._check_mixed_batch(x)
        wanted = set(self.row_adapters)
        names = sorted(n for n in self.r if n in wanted)
        if not names:
            return result
        weights = {n: (self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n]) for n in names}
        # Rebuilt per call on purpose: a stack cached on the layer is allocated mid-forward and outlives it,
        # which pins glibc's heap and raised the mixed batch's peak resident memory by 0.5 GB (medium model).
        stacked = stack_adapters(weights, names)
        return mixed_batch_update_(result, x, self.row_adapters, names, stacked)

    def _dora_update(self, name: str, x: torch.Tensor, base_result: torch.Tensor | None) -> torch.Tensor:
        """``(m/n - 1) W0 x + (m/n) s B A x`` with ``n`` the detached row norm of ``W0 + s BA``."""
        weight = self.base_weight().to(x.dtype)
        with torch.no_grad():
            norm = self._dora_row_norm(name, weight).to(x.dtype)
        scale = self.lora_magnitude_vector[name].weight / norm
        if base_result is None:
            base_out = F.linear(x, self._to_rows(weight))
        else:
            base_out = base_result.to(x.dtype)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base_out = base_out - bias.to(x.dtype)
        lora_out = self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]
        return (scale - 1) * base_out + scale * lora_out


class Embedding(LoraLayer):
    """LoRA over ``nn.Embedding``: ``E' = E + scaling * (B A)^T`` with A (r x vocab) and B (dim x r).

    As in PEFT, A starts at zero and B normal (the reverse of Linear), so the update is zero at start.
    """

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_weights(self, name, r, dtype, device):
        self.lora_embedding_A[name] = nn.Parameter(
            torch.randn(r, self.in_features, dtype=dtype, device=device)
        )
        self.lora_embedding_B[name] = nn.Parameter(
            torch.randn(self.out_features, r, dtype=dtype, device=device)
        )

    def _init_weights(self, name, init):
        if init is False:
            return
        with torch.no_grad():
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def delta_weight(self, name):
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def _to_rows(self, weight):
        return weight.T  # rows = embedding dimensions, as PEFT's DoRA for embeddings

    def _from_rows(self, rows, like):
        return rows.T

    def _embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            input_ids,
            weight,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def _add_adapters(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None:
            return result + self._mixed_batch_update(x).to(result.dtype)
        for name in self._adapters_to_run():
            embedding_A = self.lora_embedding_A[name]
            update = (self._embed(x, embedding_A.T) @ self.lora_embedding_B[name].T) * self.scaling[name]
            if self.use_dora.get(name):
                with torch.no_grad():
                    norm = self._dora_row_norm(name, self.base_layer.weight)
                scale = (self.lora_magnitude_vector[name].weight / norm).to(result.dtype)
                result = scale * result + scale * update.to(result.dtype)
            else:
                result = result + update.to(result.dtype)
        return result

    def _mixed_batch_update(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-row adapter: gather each token's row of ``A^T`` from the row's adapter, then one ``bmm`` with B."""
        self._check_mixed_batch(input_ids)
        names = sorted(n for n in set(self.row_adapters) if n in self.r)
        dtype = self._adapter_dtype_device()[0]
        batch = input_ids.shape[0]
        if not names:
            return torch.zeros(*input_ids.shape, self.out_features, dtype=dtype, device=input_ids.device)
        max_r = max(self.r[n] for n in names)
        tables = input_ids.new_zeros((len(names) + 1, self.in_features, max_r), dtype=dtype)
        stacked_B = input_ids.new_zeros((len(names) + 1, self.out_features, max_r), dtype=dtype)
        for slot, name in enumerate(names):
            tables[slot, :, : self.r[name]] = self.lora_embedding_A[name].T
            stacked_B[slot, :, : self.r[name]] = self.lora_embedding_B[name] * self.scaling[name]
        slot_of = {name: slot for slot, name in enumerate(names)}
        index = torch.tensor([slot_of.get(n, len(names)) for n in self.row_adapters], device=input_ids.device)
        ids = input_ids.reshape(batch, -1)
        after_A = tables[index[:, None], ids]  # (batch, tokens, r)
        update = torch.bmm(after_A, stacked_B[index].transpose(1, 2))
        return update.reshape(*input_ids.shape, self.out_features)


def is_supported(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention))
        or (Conv1D is not None and isinstance(module, Conv1D))
        or is_quantized_linear(module)
    )


def is_quantized_linear(module: nn.Module) -> bool:
    """A 4-bit (or other packed) Linear: has in/out features and a ``dequantize()`` giving the (out, in) weight."""
    return all(hasattr(module, a) for a in ("in_features", "out_features", "dequantize"))


def make_lora_layer(module: nn.Module, fan_in_fan_out: bool) -> LoraLayer:
    """Pick the wrapper for ``module``'s type (PEFT's dispatch); raises for types LoRA cannot wrap."""
    # Imported here: those modules build on LoraLayer, so importing them at the top would be circular.
    from lorakit.conv_layers import CONV_LAYERS
    from lorakit.mha_layer import MultiheadAttention

    if Conv1D is not None and isinstance(module, Conv1D):
        return Linear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Linear):
        if fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out=True but the target is nn.Linear; using fan_in_fan_out=False.", stacklevel=3
            )
        return Linear(module, fan_in_fan_out=False)
    if is_quantized_linear(module):
        return Linear(module, fan_in_fan_out=False)
    if isinstance(module, nn.Embedding):
        return Embedding(module)
    for conv_type, layer_cls in CONV_LAYERS.items():
        if isinstance(module, conv_type):
            return layer_cls(module)
    if isinstance(module, nn.MultiheadAttention):
        return MultiheadAttention(module)
    raise TypeError(
        f"{type(module).__name__} is not a layer LoRA can wrap; supported: nn.Linear, transformers Conv1D, "
        f"nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention and lorakit's 4-bit Linear. Target its Linear "
        f"sub-layers instead."
    )


def __getattr__(name: str):
    # The conv layers moved to lorakit.conv_layers; ``from lorakit.layers import Conv2d`` keeps working.
    if name in ("Conv1d", "Conv2d", "Conv3d"):
        from lorakit import conv_layers

        return getattr(conv_layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
