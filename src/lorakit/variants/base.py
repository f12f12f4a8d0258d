"""The contract of a LoRA variant (one object per adapter and layer) and the row that lists it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class LoraVariant:
    """How one adapter departs from plain LoRA on one layer.

    The layer owns the LoRA factors (``lora_A``, ``lora_B``, ``scaling``, ``lora_dropout``) and gives a variant
    its helpers: ``base_weight()``, ``delta_weight(name)`` (``s B A`` in the base layout), ``_to_rows`` /
    ``_from_rows`` (a base-layout weight viewed as (out, rest)). A variant that adds weights puts them in its own
    containers on the layer (named in :attr:`containers`, so saving, loading and ``requires_grad`` find them).
    """

    name = "variant"
    label = "variant"  # how messages name it
    #: containers (attributes of the layer, keyed by adapter name) that hold this variant's extra weights
    containers: tuple[str, ...] = ()
    #: whether the adapter can serve rows of a mixed-adapter batch (``adapter_names=[...]``)
    supports_mixed_batch = False

    def init(self, layer, name: str) -> None:
        """Create the variant's extra weights for adapter ``name`` (its LoRA factors are initialised already)."""

    def forward(self, layer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the base output for ``x``) with adapter ``name``'s contribution."""
        raise NotImplementedError

    def merged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base-layout ``weight`` with the adapter folded in (``weight`` itself is not modified)."""
        raise NotImplementedError

    def unmerged_weight(self, layer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`merged_weight` on ``weight``."""
        raise NotImplementedError

    def state_keys(self, layer, name: str) -> dict[str, str]:
        """File key -> state-dict key (relative to the layer) of the variant's extra tensors."""
        return {}


@dataclass(frozen=True)
class VariantSpec:
    """One row of :data:`lorakit.variants.VARIANTS`: the config flag that turns it on and how to build it."""

    name: str
    config_flag: str
    factory: Callable[[object], LoraVariant]
    #: containers the variant keeps on every LoRA layer (empty until an adapter uses it), as PEFT's layers do
    containers: tuple[str, ...] = ()
