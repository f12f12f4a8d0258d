"""Finding the modules a config targets and swapping them for LoRA layers, in place.

Name matching follows PEFT: a list entry matches a module whose full name equals it or ends with ``.entry``; a
string is a regular expression that must match the whole name; ``"all-linear"`` is every Linear / Conv1D layer
except the output head. Unlike PEFT, a list entry that matches no module at all is an error that lists names that
do exist, so a typo never trains a model with no adapter in it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lorakit.config import TASK_HEAD_MODULES
from lorakit.layers import Conv1D, LoraLayer, is_supported, make_lora_layer
from lorakit.mha_layer import MultiheadAttention

ALL_LINEAR = "all-linear"
DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and trains a full copy per adapter (e.g. a classification head)."""

    def __init__(self, original_module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            return
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.modules_to_save[name].requires_grad_(True)
        self.original_module.requires_grad_(False)
        if self.active_adapter is None:
            self.active_adapter = name

    def set_adapter(self, names: str | list[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        chosen = [n for n in names if n in self.modules_to_save]
        if len(chosen) > 1:
            raise ValueError(f"Only one adapter can drive a modules_to_save module at a time, got {chosen}.")
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in chosen)
        self.active_adapter = chosen[0] if chosen else None

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        # Model code reads attributes of the wrapped head (e.g. ``score.weight``, ``lm_head.out_features``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original_module"), name)


# --------------------------------------------------------------------------------------------- name matching
def _layer_index(name: str, patterns: Iterable[str]) -> int | None:
    for pattern in patterns:
        match = re.match(rf"(?:.*\.)?{pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def name_matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: regex full match for a string, exact or ``.``-suffix match for a list."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _output_head_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {"lm_head"} & {name for name, _ in model.named_modules()}


def is_target(name: str, config, output_heads: set[str]) -> bool:
    """Whether module ``name`` gets an adapter under ``config`` (type checks are done by the caller)."""
    if config.exclude_modules and name_matches(name, config.exclude_modules):
        return False
    if config.target_modules == ALL_LINEAR:
        return name not in output_heads
    if not name_matches(name, config.target_modules):
        return False
    if config.layers_to_transform:
        patterns = config.layers_pattern or DEFAULT_LAYER_PATTERNS
        patterns = [patterns] if isinstance(patterns, str) else patterns
        index = _layer_index(name, patterns)
        return index is not None and index in config.layers_to_transform
    return True


def _is_linear_like(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Linear)
        or (Conv1D is not None and isinstance(module, Conv1D))
        or (hasattr(module, "dequantize") and hasattr(module, "in_features"))
    )


def find_targets(model: nn.Module, config) -> list[str]:
    """Full names of the modules ``config`` adapts; raises with a helpful message if the config is wrong."""
    if config.target_modules is None:
        raise ValueError(
            "target_modules is not set; name the layers to adapt, e.g. target_modules=['q_proj', 'v_proj'] "
            "or target_modules='all-linear'."
        )
    output_heads = _output_head_names(model)
    attention_outputs = _attention_out_projections(model)
    names, unsupported = [], []
    for name, module in model.named_modules():
        if not name or isinstance(module, ModulesToSaveWrapper) or _inside_wrapper(name):
            continue
        if not is_target(name, config, output_heads):
            continue
        if name in attention_outputs:
            _check_attention_out_projection(name, config, output_heads)
            continue
        if isinstance(module, LoraLayer):  # already wrapped: a further adapter goes on the same layer
            module = module.base_layer
        if config.target_modules == ALL_LINEAR:
            if _is_linear_like(module):
                names.append(name)
        elif is_supported(module):
            names.append(name)
        else:
            unsupported.append((name, type(module).__name__))
    if unsupported:
        name, kind = unsupported[0]
        raise TypeError(
            f"Target module {name!r} is a {kind}, which LoRA cannot wrap (supported: Linear, Conv1D, Embedding, "
            f"Conv1d/2d/3d, MultiheadAttention, 4-bit Linear). Target its layers instead, e.g. one of: "
            f"{_examples(model, 8, linear=True)}."
        )
    _check_every_target_exists(model, config)
    if not names:
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of the model. "
            f"Some module names that exist: {_examples(model, 12)}."
        )
    return names


def _attention_out_projections(model: nn.Module) -> set[str]:
    """Names of the ``out_proj`` of each (unwrapped) ``nn.MultiheadAttention``."""
    return {
        f"{name}.out_proj"
        for name, module in model.named_modules()
        if name and isinstance(module, nn.MultiheadAttention) and not _inside_wrapper(name)
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


def _inside_wrapper(name: str) -> bool:
    parts = name.split(".")
    return any(
        p in ("base_layer", "original_module", "modules_to_save") or p.startswith("lora_") for p in parts
    )


def _check_every_target_exists(model: nn.Module, config) -> None:
    if not isinstance(config.target_modules, list):
        return
    all_names = [n for n, _ in model.named_modules() if n and not _inside_wrapper(n)]
    for target in config.target_modules:
        if not any(name_matches(n, [target]) for n in all_names):
            raise ValueError(
                f"Target module {target!r} matches no module of the model. "
                f"Some module names that exist: {_examples(model, 12)}."
            )


def _check_every_module_to_save_exists(model: nn.Module, module_names: list[str]) -> None:
    optional = {head for heads in TASK_HEAD_MODULES.values() for head in heads}
    all_names = [n for n, _ in model.named_modules() if n and not _inside_wrapper(n)]
    for entry in module_names:
        if entry not in optional and not any(name_matches(n, [entry]) for n in all_names):
            raise ValueError(
                f"modules_to_save entry {entry!r} matches no module of the model. "
                f"Some module names that exist: {_examples(model, 12)}."
            )


def _examples(model: nn.Module, count: int, linear: bool = False) -> str:
    leaf_names = []
    for name, module in model.named_modules():
        if not name or _inside_wrapper(name) or (linear and not _is_linear_like(module)):
            continue
        short = name.split(".")[-1]
        if short not in leaf_names and not short.isdigit():
            leaf_names.append(short)
    return ", ".join(leaf_names[:count]) or "(none)"


def _pattern_value(name: str, patterns: dict, default):
    """Per-module override: exact name first, then a regex ``(.*\\.)?key$`` as in PEFT."""
    if name in patterns:
        return patterns[name]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def inject_adapter(model: nn.Module, config, adapter_name: str) -> list[str]:
    """Wrap (or extend) each targeted module with adapter ``adapter_name``; returns the adapted names."""
    names = find_targets(model, config)
    for name in names:
        module = model.get_submodule(name)
        r = _pattern_value(name, config.rank_pattern, config.r)
        alpha = _pattern_value(name, config.alpha_pattern, config.lora_alpha)
        if not isinstance(module, LoraLayer):
            wrapped = make_lora_layer(module, config.fan_in_fan_out)
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, wrapped)
            module = wrapped
        module.update_layer(
            adapter_name,
            r,
            alpha,
            config.lora_dropout,
            config.init_lora_weights,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
        )
    # Adapted layers found inside others' names (e.g. a ModuleList index) were replaced above.
    return names


def inject_modules_to_save(model: nn.Module, module_names: list[str] | None, adapter_name: str) -> list[str]:
    """Wrap each module named (suffix match) in ``module_names`` so it trains in full for this adapter.

    An entry that matches no module is an error, as for ``target_modules``, except the task heads lorakit and
    PEFT add by themselves (``classifier`` and ``score`` for sequence classification: a model has one of them).
    """
    if not module_names:
        return []
    _check_every_module_to_save_exists(model, module_names)
    wrapped = []
    for name, module in list(model.named_modules()):
        if not name or _inside_wrapper(name) or not name_matches(name, module_names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
        elif isinstance(module, LoraLayer):
            raise ValueError(f"Module {name!r} cannot be both a LoRA target and in modules_to_save.")
        else:
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))
        wrapped.append(name)
    return wrapped


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer, one nested in another (a MultiheadAttention's out_proj) before its owner.

    Inner first, so that a loop merging (or unmerging) layer by layer does the inner layer itself and its owner,
    which also drives it, finds it done. Loops over parameters see every adapter weight in its own layer.
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    names = {name for name, _ in layers}
    yield from sorted(layers, key=lambda item: -_owner_count(item[0], names))  # stable: model order otherwise


def _owner_count(name: str, layer_names: set[str]) -> int:
    """How many of ``layer_names`` contain module ``name``."""
    parts = name.split(".")
    return sum(".".join(parts[:i]) in layer_names for i in range(1, len(parts)))


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def replace_with_base(model: nn.Module, merge: bool, safe_merge: bool = False) -> nn.Module:
    """Remove every wrapper: LoRA layers become their base (merged or not); save-wrappers their trained copy."""
    layers = list(lora_layers(model))
    names = {name for name, _ in layers}
    for name, layer in layers:
        if _owner_count(name, names):
            continue  # its owner puts it back
        if isinstance(layer, MultiheadAttention):  # also puts its plain out_proj back
            replacement = layer.unwrap(merge=merge, safe_merge=safe_merge)
        elif merge:
            replacement = _merged_base(layer, safe_merge)
        else:
            if layer.merged:
                layer.unmerge()
            replacement = layer.base_layer
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, replacement)
    for name, wrapper in list(save_wrappers(model)):
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, wrapper.active_module())
    return model


def _merged_base(layer: LoraLayer, safe_merge: bool) -> nn.Module:
    base = layer.base_layer
    if not hasattr(base, "dequantize"):
        layer.merge(safe_merge=safe_merge)
        return base
    # 4-bit base: dequantize to the compute dtype and add the update there; re-quantizing would lose it.
    weight = base.dequantize()
    for name in layer.active_adapters:
        if name in layer.r:
            weight = layer.merged_weight(name, weight)
    if safe_merge and not torch.isfinite(weight).all():
        raise ValueError("Merging gives NaN or inf weights; the adapter is broken.")
    linear = nn.Linear(
        base.in_features,
        base.out_features,
        bias=base.bias is not None,
        dtype=weight.dtype,
        device=weight.device,
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias.to(weight.dtype))
    return linear
