"""Module names: which modules a config targets, and which names are adapter internals.

Name matching follows PEFT: a list entry matches a module whose full name equals it or ends with ``.entry``; a
string is a regular expression that must match the whole name; ``"all-linear"`` is every Linear / Conv1D layer
except the output head. ``layers_to_transform`` keeps the modules of the listed layer indices only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from lorakit.layer_kinds import is_linear_like

ALL_LINEAR = "all-linear"
DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")
# Name parts inside adapter wrappers: the wrapped module, trained copies, and the adapters' own containers.
WRAPPER_PARTS = frozenset(
    {"base_layer", "original_module", "modules_to_save", "ranknum"}
    | {"adapter_down", "adapter_up", "adapter_act", "adapter_dropout"}  # the bottleneck Adapter's containers
)


def is_internal_name(name: str) -> bool:
    """Whether module ``name`` lies inside an adapter wrapper (its base layer, a trained copy, an adapter weight)."""
    return any(p in WRAPPER_PARTS or p.startswith("lora_") for p in name.split("."))


def name_matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: regex full match for a string, exact or ``.``-suffix match for a list."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _layer_index(name: str, patterns: Iterable[str]) -> int | None:
    for pattern in patterns:
        match = re.match(rf"(?:.*\.)?{pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (``get_output_embeddings()``, else a module named ``lm_head``)."""
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
    if getattr(config, "layers_to_transform", None):
        patterns = config.layers_pattern or DEFAULT_LAYER_PATTERNS
        patterns = [patterns] if isinstance(patterns, str) else patterns
        index = _layer_index(name, patterns)
        return index is not None and index in config.layers_to_transform
    return True


def pattern_value(name: str, patterns: dict, default):
    """Per-module override (``rank_pattern``, ``alpha_pattern``): exact name first, then ``(.*\\.)?key$`` as PEFT."""
    if name in patterns:
        return patterns[name]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def examples(model: nn.Module, count: int, linear: bool = False) -> str:
    """Up to ``count`` distinct short module names of ``model`` (only linear-like ones with ``linear``)."""
    leaf_names = []
    for name, module in model.named_modules():
        if not name or is_internal_name(name) or (linear and not is_linear_like(module)):
            continue
        short = name.split(".")[-1]
        if short not in leaf_names and not short.isdigit():
            leaf_names.append(short)
    return ", ".join(leaf_names[:count]) or "(none)"
