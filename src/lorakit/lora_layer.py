"""``LoraLayer``: the state and the forward that every LoRA layer kind shares.

For a base weight ``W0`` (out x in) a LoRA adapter adds a rank-r update (Hu et al. 2021, eq. 3)::

    h = W0 x + scaling * B A dropout(x),    A: r x in (kaiming-uniform),  B: out x r (zero)

with ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA, :func:`lorakit.config.lora_scaling`),
so the wrapped model starts exactly at the base model. Each adapter is plain LoRA or has a variant object
(:mod:`lorakit.variants`, e.g. DoRA) that computes, merges and unmerges it; the forward has one branch for that.

A layer kind (:mod:`lorakit.linear_layer`, :mod:`lorakit.embedding_layer`, :mod:`lorakit.conv_layers`,
:mod:`lorakit.mha_layer`) supplies its factors: ``_create_weights``, ``_init_weights``, ``delta_weight`` (``s B A``
in the base weight's layout), ``lora_update`` (the plain update of one adapter) and, where rows of a batch may use
different adapters, ``_mixed_batch_forward``. Parameter names (``lora_A.<adapter>.weight``, ...) are PEFT's.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from lorakit.config import lora_scaling
from lorakit.layer_kinds import adapter_dtype_device, dense_weight, is_quantized_linear
from lorakit.tuner_layer import BaseTunerLayer
from lorakit.variants import LoraVariant, variant_containers, variant_for


def init_factors(weight_A: torch.Tensor, weight_B: torch.Tensor, init: bool | str, r: int) -> None:
    """The data-free inits of ``A`` and ``B``: kaiming-uniform ``A`` (``"gaussian"``: normal, std ``1 / r``) and
    zero ``B``, so ``B A = 0`` at start; ``init=False`` leaves both as created (random, for tests of merging)."""
    if init is False:
        return
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(weight_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(weight_A, a=math.sqrt(5))
        nn.init.zeros_(weight_B)


class LoraLayer(BaseTunerLayer):
    """Adapters by name over a frozen ``base_layer``: ranks, scalings, dropouts, variants; merging; the forward."""

    method_label = "LoRA"
    kind = "lora"  # "linear", "embedding", "conv", "mha": which variants apply (see lorakit.variants)
    #: the kind's factor containers; variants add theirs (see :attr:`adapter_layer_names`)
    factor_names: tuple[str, ...] = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_variant: dict[str, LoraVariant] = {}
        for container in variant_containers():  # empty until an adapter uses the variant
            setattr(self, container, nn.ModuleDict())
        # Set for the duration of one forward by PeftModel(..., adapter_names=[...]): the adapter of each row.
        self.row_adapters: tuple[str, ...] | None = None

    # ----------------------------------------------------------------------------------- kind interface
    def _create_weights(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def _init_weights(self, name: str, init: bool | str, options: dict) -> None:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B A`` in the layout of the base weight."""
        raise NotImplementedError

    def lora_update(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + scaling * B A dropout(x)`` for adapter ``name`` (plain LoRA)."""
        raise NotImplementedError

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            "Mixed-adapter batches (adapter_names) are supported on Linear and Embedding layers only."
        )

    def _to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """View a base-layout weight as (out, rest) so that row norms are per output feature."""
        return weight

    def _from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows

    # -------------------------------------------------------------------------------------------- adapters
    @property
    def adapter_layer_names(self) -> tuple[str, ...]:
        """This layer's containers of adapter weights: its factors, then the variants' (PEFT's attribute)."""
        return (*self.factor_names, *variant_containers())

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def use_dora(self) -> dict[str, bool]:
        """PEFT's per-adapter DoRA flags."""
        return {name: getattr(self.lora_variant.get(name), "name", None) == "dora" for name in self.r}

    def adapter_state_keys(self, name: str) -> dict[str, str]:
        keys = super().adapter_state_keys(name)
        variant = self.lora_variant.get(name)
        if variant is not None:
            for container in variant.containers:
                keys = {k: v for k, v in keys.items() if not k.startswith(f"{container}.")}
            keys.update(variant.state_keys(self, name))
        return keys

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as a tensor (dequantized for 4-bit base layers)."""
        return dense_weight(self.base_layer)

    def _adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        if getattr(self.base_layer, "weight", None) is None:  # e.g. nn.MultiheadAttention: its in_proj weight
            weight = self.base_weight()
            return (
                weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
            ), weight.device
        return adapter_dtype_device(self.base_layer)

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        **options,
    ) -> None:
        """Add adapter ``name`` of rank ``r`` with scaling ``lora_scaling(lora_alpha, r, use_rslora)``.

        ``init`` is ``init_lora_weights``; ``options`` carry what some inits need (``loftq_config``).
        """
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}.")
        if name in self.r:
            raise ValueError(
                f"Adapter {name!r} already exists on this layer; delete it first or pick a new name."
            )
        variant = variant_for(self, {"use_dora": use_dora, **options})
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_scaling(lora_alpha, r, use_rslora)
        self.lora_dropout[name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        dtype, device = self._adapter_dtype_device()
        self._create_weights(name, r, dtype, device)
        self._init_weights(name, init, options)
        if variant is not None:
            self.lora_variant[name] = variant
            variant.init(self, name)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.lora_variant.pop(name, None)

    # --------------------------------------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base weight: ``W0 <- W0 + s BA`` (a variant: its own rule)."""
        if is_quantized_linear(self.base_layer):
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
        variant = self.lora_variant.get(name)
        if variant is not None:
            return variant.merged_weight(self, name, weight)
        return (weight.float() + self.delta_weight(name).float()).to(weight.dtype)

    def unmerge(self) -> None:
        """Subtract merged adapters again, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_layer.weight
            variant = self.lora_variant.get(name)
            if variant is not None:
                restored = variant.unmerged_weight(self, name, weight.data)
            else:
                restored = weight.data.float() - self.delta_weight(name).float()
            weight.data.copy_(restored.to(weight.dtype))

    def unwrap(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        """The base layer with the active adapters merged in (``merge``) or none; a 4-bit base is dequantized."""
        base = self.base_layer
        if not merge:
            if self.merged:
                self.unmerge()
            return base
        if not is_quantized_linear(base):
            self.merge(safe_merge=safe_merge)
            return base
        # 4-bit base: dequantize to the compute dtype and add the update there; re-quantizing would lose it.
        weight = base.dequantize()
        for name in self.active_adapters:
            if name in self.r:
                weight = self.merged_weight(name, weight)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError("Merging gives NaN or inf weights; the adapter is broken.")
        linear = base.to_linear(weight.dtype)  # the base layer's shape and bias, then the merged weight
        with torch.no_grad():
            linear.weight.copy_(weight)
        return linear

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output, plus the active adapters' updates unless disabled or already merged."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self.row_adapters is not None:
            self._check_mixed_batch(x)
            return self._mixed_batch_forward(x, result)
        for name in self._adapters_to_run():
            variant = self.lora_variant.get(name)
            if variant is None:
                result = self.lora_update(name, x, result)
            else:
                result = variant.forward(self, name, x, result)
        return result

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
        for name in set(self.row_adapters):
            variant = self.lora_variant.get(name)
            if variant is not None and not variant.supports_mixed_batch:
                raise ValueError(
                    f"Mixed-adapter batches are not supported with {variant.label} adapters ({name!r})."
                )

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"
