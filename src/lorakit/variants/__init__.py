"""LoRA variants: per-adapter strategy objects that change how one adapter computes, merges and unmerges.

A LoRA layer runs each adapter either as plain LoRA (``result + s B A x``, the layer's own code) or, when the
adapter has a variant, through that variant's object (PEFT's ``LoraVariant`` design): the layer's forward has one
branch, ``variant.forward(layer, name, x, result)`` or the plain update. A variant lives in its own module and
is listed once in :data:`VARIANTS`; see docs/methods.md, "Adding a LoRA variant", with DoRA as the example.
"""

from __future__ import annotations

from lorakit.variants.base import LoraVariant, VariantSpec
from lorakit.variants.dora import MAGNITUDE, DoraMagnitude, make_dora_variant

#: one row per variant: the config flag that turns it on, its factory ``(layer) -> LoraVariant`` and its
#: containers; the first row whose flag is true picks the variant of a new adapter.
VARIANTS: tuple[VariantSpec, ...] = (
    VariantSpec(name="dora", config_flag="use_dora", factory=make_dora_variant, containers=(MAGNITUDE,)),
)


def variant_containers() -> tuple[str, ...]:
    """The containers every LoRA layer holds for the variants (``lora_magnitude_vector``)."""
    return tuple(dict.fromkeys(c for spec in VARIANTS for c in spec.containers))


def variant_for(layer, flags: dict[str, bool]) -> LoraVariant | None:
    """The variant object for a new adapter on ``layer`` given its config flags (``{"use_dora": True}``), or None."""
    for spec in VARIANTS:
        if flags.get(spec.config_flag):
            return spec.factory(layer)
    return None


__all__ = ["VARIANTS", "DoraMagnitude", "LoraVariant", "VariantSpec", "variant_containers", "variant_for"]
