"""Putting adapter layers into a model, and taking them out again: one path for every method.

A method describes its layers with a :class:`LayerFactory` (which modules it can wrap, how to wrap one, how to
add an adapter to a wrapped one); :func:`inject_adapter` finds the targets of a config (:mod:`lorakit.module_names`
has the matching rules) and wraps or extends them, and :func:`replace_with_base` swaps every adapter layer back
for what its :meth:`~lorakit.tuner_layer.BaseTunerLayer.unwrap` gives. Unlike PEFT, a ``target_modules`` entry
that matches no module at all is an error that lists names that do exist, so a typo never trains a model with no
adapter in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from lorakit import variants
from lorakit.layer_kinds import is_linear_like
from lorakit.layers import UNSUPPORTED_HELP, is_supported, make_lora_layer
from lorakit.lora_layer import LoraLayer
from lorakit.module_names import (
    ALL_LINEAR,
    DEFAULT_LAYER_PATTERNS,
    examples,
    get_submodule_parent,
    is_internal_name,
    is_target,
    name_matches,
    output_head_names,
    pattern_value,
)
from lorakit.modules_to_save import ModulesToSaveWrapper, inject_modules_to_save, save_wrappers
from lorakit.tuner_layer import BaseTunerLayer


@dataclass(frozen=True)
class LayerFactory:
    """How one method puts its layers into a model."""

    #: the method's layer type (a :class:`BaseTunerLayer`)
    layer_class: type
    #: whether the method can wrap this (unwrapped) module
    supports: Callable[[nn.Module], bool]
    #: a new layer around ``module`` (named ``name``) for ``config``
    wrap: Callable[[nn.Module, str, Any], nn.Module]
    #: add adapter ``adapter_name`` to ``layer`` (module ``name``) as ``config`` says
    add: Callable[[nn.Module, str, str, Any], None]
    #: the error text for a named target the method cannot wrap: ``(name, module, model) -> str``
    unsupported: Callable[[str, nn.Module, nn.Module], str]
    #: which modules ``target_modules="all-linear"`` selects
    all_linear: Callable[[nn.Module], bool] = is_linear_like


def _lora_unsupported(name: str, module: nn.Module, model: nn.Module) -> str:
    return (
        f"Target module {name!r} is a {type(module).__name__}, which LoRA cannot wrap ({UNSUPPORTED_HELP}). "
        f"Target its layers instead, e.g. one of: {examples(model, 8, linear=True)}."
    )


def _add_lora(layer: LoraLayer, adapter_name: str, name: str, config) -> None:
    # every variant's config flag (use_dora, ...) goes to the layer, which picks the variant (lorakit.variants)
    flags = {spec.config_flag: bool(getattr(config, spec.config_flag, False)) for spec in variants.VARIANTS}
    layer.update_layer(
        adapter_name,
        pattern_value(name, config.rank_pattern, config.r),
        pattern_value(name, config.alpha_pattern, config.lora_alpha),
        config.lora_dropout,
        config.init_lora_weights,
        use_rslora=config.use_rslora,
        loftq_config=getattr(config, "loftq_config", None),
        **flags,
    )


LORA_LAYERS = LayerFactory(
    layer_class=LoraLayer,
    supports=is_supported,
    wrap=lambda module, name, config: make_lora_layer(module, config.fan_in_fan_out),
    add=_add_lora,
    unsupported=_lora_unsupported,
)


# ------------------------------------------------------------------------------------------------- targets
def find_targets(model: nn.Module, config, factory: LayerFactory = LORA_LAYERS) -> list[str]:
    """Full names of the modules ``config`` adapts; raises with a helpful message if the config is wrong."""
    if config.target_modules is None:
        raise ValueError(
            "target_modules is not set; name the layers to adapt, e.g. target_modules=['q_proj', 'v_proj'] "
            "or target_modules='all-linear'."
        )
    output_heads = output_head_names(model)
    attention_outputs = _attention_out_projections(model)
    names, unsupported = [], []
    for name, module in model.named_modules():
        if not name or isinstance(module, ModulesToSaveWrapper) or is_internal_name(name):
            continue
        if not is_target(name, config, output_heads):
            continue
        if name in attention_outputs:
            _check_attention_out_projection(name, config, output_heads)
            continue
        if isinstance(module, BaseTunerLayer):  # already wrapped: a further adapter goes on the same layer
            _check_same_method(name, module, factory)
            module = module.base_layer
        if config.target_modules == ALL_LINEAR:
            if factory.all_linear(module) and factory.supports(module):
                names.append(name)
        elif factory.supports(module):
            names.append(name)
        else:
            unsupported.append((name, module))
    if unsupported:
        raise TypeError(factory.unsupported(*unsupported[0], model))
    _check_every_target_exists(model, config)
    if not names:
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of the model. "
            f"Some module names that exist: {examples(model, 12)}."
        )
    return names


def _check_same_method(name: str, layer: BaseTunerLayer, factory: LayerFactory) -> None:
    mine = factory.layer_class.method_label
    if layer.method_label != mine:
        raise ValueError(
            f"{name!r} already holds a {layer.method_label} adapter; {mine} and {layer.method_label} adapters "
            f"cannot share a layer (nor a model)."
        )


def _attention_out_projections(model: nn.Module) -> set[str]:
    """Names of the ``out_proj`` of each (unwrapped) ``nn.MultiheadAttention``."""
    return {
        f"{name}.out_proj"
        for name, module in model.named_modules()
        if name and isinstance(module, nn.MultiheadAttention) and not is_internal_name(name)
    }


def _check_attention_out_projection(name: str, config, output_heads: set[str]) -> None:
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj``: a LoRA layer there would
    never run. Its attention module's LoRA layer adapts it; targeting it alone is an error ("all-linear" skips it).
    """
    attention = name.rpartition(".")[0]
    if config.target_modules == ALL_LINEAR or is_target(attention, config, output_heads):
        return
    raise ValueError(
        f"Target module {name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight without "
        f"calling it, so a LoRA layer there would never run. Target the attention module {attention!r} instead: "
        f"LoRA on it adapts both in_proj and out_proj."
    )


def _check_every_target_exists(model: nn.Module, config) -> None:
    if not isinstance(config.target_modules, list):
        return
    all_names = [n for n, _ in model.named_modules() if n and not is_internal_name(n)]
    for target in config.target_modules:
        if not any(name_matches(n, [target]) for n in all_names):
            raise ValueError(
                f"Target module {target!r} matches no module of the model. "
                f"Some module names that exist: {examples(model, 12)}."
            )


# ----------------------------------------------------------------------------------------------- injecting
def inject_adapter(
    model: nn.Module, config, adapter_name: str, factory: LayerFactory = LORA_LAYERS
) -> dict[str, nn.Module]:
    """Wrap (or extend) each targeted module with adapter ``adapter_name``; returns name -> adapter layer."""
    layers = {}
    for name in find_targets(model, config, factory):
        module = model.get_submodule(name)
        if not isinstance(module, factory.layer_class):
            wrapped = factory.wrap(module, name, config)
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, wrapped)
            module = wrapped
        factory.add(module, adapter_name, name, config)
        layers[name] = module
    return layers


def tuner_layers(model: nn.Module, layer_class: type = BaseTunerLayer) -> Iterator[tuple[str, nn.Module]]:
    """Every adapter layer (of ``layer_class``), one nested in another (a MultiheadAttention's out_proj) first.

    Inner first, so that a loop merging (or unmerging) layer by layer does the inner layer itself and its owner,
    which also drives it, finds it done. Loops over parameters see every adapter weight in its own layer.
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, layer_class)]
    names = {name for name, _ in layers}
    yield from sorted(layers, key=lambda item: -_owner_count(item[0], names))  # stable: model order otherwise


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer (see :func:`tuner_layers`)."""
    return tuner_layers(model, LoraLayer)


def _owner_count(name: str, layer_names: set[str]) -> int:
    """How many of ``layer_names`` contain module ``name``."""
    parts = name.split(".")
    return sum(".".join(parts[:i]) in layer_names for i in range(1, len(parts)))


# ----------------------------------------------------------------------------------------------- unloading
def replace_with_base(model: nn.Module, merge: bool, safe_merge: bool = False) -> nn.Module:
    """Remove every wrapper: adapter layers become their base (merged or not); save-wrappers their trained copy."""
    layers = list(tuner_layers(model))
    names = {name for name, _ in layers}
    for name, layer in layers:
        if _owner_count(name, names):
            continue  # its owner puts it back
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, layer.unwrap(merge=merge, safe_merge=safe_merge))
    for name, wrapper in list(save_wrappers(model)):
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, wrapper.active_module())
    return model


__all__ = [
    "ALL_LINEAR",
    "DEFAULT_LAYER_PATTERNS",
    "LORA_LAYERS",
    "LayerFactory",
    "ModulesToSaveWrapper",
    "find_targets",
    "get_submodule_parent",
    "inject_adapter",
    "inject_modules_to_save",
    "is_target",
    "lora_layers",
    "name_matches",
    "replace_with_base",
    "save_wrappers",
    "tuner_layers",
]
